"""Ray Data job that computes the frozen trunk's activations at the train boundary once and keeps them as fp16."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ootd.decode import decode_crop
from ootd.logs import quiet_libraries
from ootd.model.encoder import build_encoder, weights_fingerprint
from ootd.placement import gpu_requested
from ootd.tables import crops_snapshot, read_columns
from ootd.train.augment import BOX_JITTER, views_of

if TYPE_CHECKING:
    import pyarrow as pa

    from ootd.config import Config, ModelConfig

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 2: a `view` column (augmented views of training crops, `ootd.train.augment`); 3: rows shuffled
MANIFEST = "cache.json"


@dataclass(frozen=True)
class FeatureCache:
    """A finished cache directory and what it holds.

    Attributes:
        path: the cache directory (`<workdir>/feature_cache/<key>`), parquet parts plus `cache.json`.
        key: hash of backbone weights, unlocked blocks, preprocessing and the crops snapshot.
        shape: shape of one row's activations (tokens × width for k ≥ 1, feature_dim for k = 0).
        rows: rows cached: one per labelled crop and augmented view.
        errors: crops that could not be decoded (kept as rows with an `error` and no features).
        unlocked_blocks: the boundary: activations entering the first of the top k blocks.
        fingerprint: weights fingerprint of the encoder that produced it.
        reused: True when an existing cache was found instead of computed.
    """

    path: Path
    key: str
    shape: tuple[int, ...]
    rows: int
    errors: int
    unlocked_blocks: int
    fingerprint: str
    reused: bool = False


def cache_key(backbone: str, unlocked_blocks: int, fingerprint: str, preprocess: dict, snapshot: list,
              views: dict) -> str:  # fmt: skip
    """The cache directory name: any change to weights, boundary, preprocessing, crops or views gives a new one."""
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "backbone": backbone,
            "unlocked_blocks": unlocked_blocks,
            "fingerprint": fingerprint,
            "preprocess": preprocess,
            "crops": snapshot,
            "views": views,
        },
        sort_keys=True,
        default=str,
    )
    return f"k{unlocked_blocks}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def decode_features(blobs: Sequence[bytes], shape: Sequence[int]) -> np.ndarray:
    """Stacks cached fp16 rows into one (N, *shape) float16 array.

    Raises:
        ValueError: when a row does not hold exactly one array of `shape`.
    """
    expected = int(np.prod(shape)) * 2
    out = np.empty((len(blobs), *shape), dtype=np.float16)
    for i, blob in enumerate(blobs):
        if blob is None or len(blob) != expected:
            got = None if blob is None else len(blob)
            raise ValueError(f"cached row {i} holds {got} bytes, expected {expected} for fp16 {tuple(shape)}")
        out[i] = np.frombuffer(blob, dtype=np.float16).reshape(shape)
    return out


def _schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("image_id", pa.string()), ("style", pa.string()), ("view", pa.int16()),
                      ("features", pa.binary()), ("error", pa.string())])  # fmt: skip


@dataclass(frozen=True)
class ViewPlan:
    """Which crops get augmented views: those of the train split (validation and test are scored on view 0).

    Attributes:
        train_views: views per training crop, the crop itself included (1: no augmentation).
        val_fraction: the split's fractions, as `train.val_fraction` / `train.test_fraction`.
        test_fraction: see `val_fraction`.
        box_jitter: largest move of a box side in a view (`train.augment_box_jitter`).
    """

    train_views: int = 1
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    box_jitter: float = BOX_JITTER

    def views_for(self, image_id: str, near_dup_of: str | None) -> int:
        """How many views to cache for one crop."""
        from ootd.splits import group_split_of

        if self.train_views <= 1:
            return 1
        split = group_split_of(image_id, near_dup_of, self.val_fraction, self.test_fraction)
        return self.train_views if split == "train" else 1


class BoundaryFeatures:
    """Ray Data actor: loads the encoder once, turns crop bytes (and their augmented views) into boundary
    activations (fp16 bytes), one row per view."""

    def __init__(self, model: ModelConfig, unlocked_blocks: int, fingerprint: str, device: str = "cpu",
                 plan: ViewPlan | None = None):  # fmt: skip
        import pyarrow
        import torch

        quiet_libraries()
        self.torch, self.pa = torch, pyarrow
        self.schema = _schema()
        self.device = device
        self.plan = plan or ViewPlan()
        self.unlocked_blocks = unlocked_blocks
        self.encoder = build_encoder(model).to(device).eval()
        got = weights_fingerprint(self.encoder)
        if got != fingerprint:
            raise RuntimeError(
                f"backbone {model.backbone!r} built with weights {got} in the cache actor but {fingerprint} on the "
                "driver: its initialisation is not reproducible, so cached activations would not match training"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids, styles, views, errors, images = [], [], [], [], []
        groups = batch.get("near_dup_of", [None] * len(batch["image_id"]))
        for image_id, style, crop, group in zip(batch["image_id"], batch["style"], batch["crop"], groups,
                                                strict=True):  # fmt: skip
            if style is None:
                continue  # unlabelled crops never train
            try:
                crop_views = views_of(decode_crop(crop), image_id, self.plan.views_for(image_id, group),
                                      self.plan.box_jitter)
                error = None
            except Exception as exc:  # a corrupt crop loses only itself
                crop_views, error = [None], f"crop does not decode: {type(exc).__name__}: {exc}"
            for view, image in enumerate(crop_views):
                ids.append(image_id)
                styles.append(style)
                views.append(view)
                images.append(image)
                errors.append(error)
        blobs = [None] * len(ids)
        good = [i for i, image in enumerate(images) if image is not None]
        if good:
            with self.torch.inference_mode():
                pixels = self.encoder.preprocess([images[i] for i in good]).to(self.device)
                feats = self.encoder.boundary_features(pixels, self.unlocked_blocks)
            feats = feats.to("cpu", self.torch.float16).numpy()
            for row, i in enumerate(good):
                blobs[i] = feats[row].tobytes()
        # An explicit schema: an all-null `error` column would otherwise be written with Arrow's null type.
        table = {"image_id": ids, "style": styles, "view": views, "features": blobs, "error": errors}
        return self.pa.table(table, schema=self.schema)


def probe_encoder(model: ModelConfig, unlocked_blocks: int) -> dict[str, Any]:
    """Builds the encoder once on the caller to learn its fingerprint, preprocessing and boundary shape.

    Raises:
        ModelNotAvailable: when the backbone's weights are not on this machine (before any Ray work starts).
    """
    import torch
    from PIL import Image

    encoder = build_encoder(model).eval()
    encoder.freeze(unlocked_blocks)
    with torch.inference_mode():
        pixels = encoder.preprocess([Image.new("RGB", (32, 48), (127, 127, 127))])
        shape = tuple(encoder.boundary_features(pixels, unlocked_blocks).shape[1:])
    return {
        "unlocked_blocks": unlocked_blocks,
        "fingerprint": weights_fingerprint(encoder),
        "preprocess": dict(encoder.preprocess_cfg),
        "shape": shape,
        "feature_dim": encoder.feature_dim,
        "embed_dim": encoder.embed_dim,
    }


def build_feature_cache(
    config: Config,
    crops_dir: str | Path,
    workdir: str | Path,
    *,
    unlocked_blocks: int | None = None,
    probe: dict[str, Any] | None = None,
) -> FeatureCache:
    """Computes (or finds) the boundary-activation cache of every labelled crop.

    Runs a Ray Data pipeline: read the crops table → one seeded shuffle → actor pool (`BoundaryFeatures`, one
    encoder per actor) → parquet under `<workdir>/feature_cache/<key>`. The directory appears atomically (written
    under a temp name, then renamed), so an interrupted run leaves no half cache and a finished one is reused by
    every later run.

    Args:
        config: the resolved config (model section; train.num_workers/cpus_per_worker size the actor pool).
        crops_dir: the crops table folder written by ingest.
        workdir: root of derived artefacts.
        unlocked_blocks: the boundary; default `config.model.unlocked_blocks`.
        probe: `probe_encoder` output when the caller already has it.
    """
    import ray

    k = config.model.unlocked_blocks if unlocked_blocks is None else unlocked_blocks
    snapshot = crops_snapshot(crops_dir)
    if probe is None or probe.get("unlocked_blocks") != k:
        probe = probe_encoder(config.model, k)
    tcfg = config.train
    plan = ViewPlan(tcfg.augment_views, tcfg.val_fraction, tcfg.test_fraction, tcfg.augment_box_jitter)
    key = cache_key(config.model.backbone, k, probe["fingerprint"], probe["preprocess"], snapshot, asdict(plan))
    root = Path(workdir) / "feature_cache"
    final = root / key
    if (final / MANIFEST).exists():
        cache = read_cache(final)
        log.info("feature cache %s reused (%d rows)", final, cache.rows)
        return FeatureCache(**{**asdict(cache), "path": final, "reused": True})

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    use_gpu = gpu_requested(config)
    started = time.monotonic()
    try:
        files = [str(Path(crops_dir).resolve() / name) for name, _ in snapshot]  # exactly what the key hashed
        columns = ["image_id", "style", "crop"] + (["near_dup_of"] if "near_dup_of" in _columns(files) else [])
        # Ingest writes crops in source order, so a style's crops sit together (runs of ~150 rows in the demo's
        # table) and the trainer's local shuffle (then 256 rows) could not mix them: its class-balanced batcher
        # dropped ~45 % of each epoch waiting for all styles. One seeded shuffle of the crops (small JPEGs) here
        # leaves the cache in random order; a crop's views stay together, which the trainer's 2,048-row local
        # shuffle spreads out, varying the order per epoch.
        ds = ray.data.read_parquet(files).select_columns(columns).random_shuffle(seed=0)
        ds = ds.map_batches(
            BoundaryFeatures,
            fn_constructor_kwargs={
                "model": config.model,
                "unlocked_blocks": k,
                "fingerprint": probe["fingerprint"],
                "device": "cuda" if use_gpu else "cpu",
                "plan": plan,
            },
            batch_size=max(8, config.train.styles_per_batch * config.train.images_per_style),
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.train.num_workers),
            num_cpus=config.train.cpus_per_worker,
            num_gpus=1 if use_gpu else 0,
        )
        ds.write_parquet(str(tmp))
        tmp.mkdir(parents=True, exist_ok=True)  # no labelled crops: Ray writes no file at all
        rows, errors = _count_rows(tmp)
        manifest = {
            "format": CACHE_FORMAT,
            "key": key,
            "backbone": config.model.backbone,
            "unlocked_blocks": k,
            "fingerprint": probe["fingerprint"],
            "preprocess": probe["preprocess"],
            "shape": list(probe["shape"]),
            "dtype": "float16",
            "rows": rows,
            "errors": errors,
            "views": asdict(plan),
            "crops": {"dir": str(Path(crops_dir).resolve()), "files": snapshot},
            "seconds": round(time.monotonic() - started, 2),
        }
        # The manifest is written last: a directory without it is never trusted.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MANIFEST).exists():
                raise
            log.info("another job finished feature cache %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = read_cache(final)
    log.info("feature cache %s built: %d rows, %d errors, shape %s", final, cache.rows, cache.errors, cache.shape)
    return cache


def read_cache(path: str | Path) -> FeatureCache:
    """Reads a finished cache's manifest.

    Raises:
        FileNotFoundError: when `path` is not a finished cache.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{path} is not a finished feature cache (no {MANIFEST})")
    meta = json.loads(manifest_path.read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: cache format {meta.get('format')}, this ootd reads {CACHE_FORMAT}; delete it")
    return FeatureCache(
        path=path,
        key=meta["key"],
        shape=tuple(meta["shape"]),
        rows=meta["rows"],
        errors=meta["errors"],
        unlocked_blocks=meta["unlocked_blocks"],
        fingerprint=meta["fingerprint"],
    )


def _columns(files: list[str]) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_schema(files[0]).names) if files else set()


def _count_rows(path: Path) -> tuple[int, int]:
    # Only the small `error` column is read back, never the activations.
    errors = read_columns(path, ["error"])["error"]
    return len(errors), sum(e is not None for e in errors)
