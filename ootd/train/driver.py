"""Ray Train fine-tuning driver: splits and datasets, the DDP TorchTrainer, resume, export of the best checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ootd.train.checkpoint import HISTORY_FILE, SCORE, STATE_FILE
from ootd.train.worker import LoopSettings, train_loop_per_worker

if TYPE_CHECKING:
    import ray.data
    from ray.train import Result
    from ray.train.torch import TorchTrainer

    from ootd.config import Config

__all__ = ["TrainData", "build_trainer", "export_best", "prepare_data", "run_training", "train_loop_per_worker"]

log = logging.getLogger(__name__)

# Ray Data work feeding training (parquet reads, the split filter) is light and must never wait for a CPU: the
# training workers may hold every CPU of the cluster (2 workers x 1 CPU on 2 cores), which would starve it forever.
_DATA_CPUS = 0
# Rows per record batch read from a parquet file (a cached ViT-B k=2 row is ~300 KiB).
_ROWS_PER_READ = 64


@dataclass(frozen=True)
class TrainData:
    """Where the training rows come from and what they hold.

    Attributes:
        source: "cache" (boundary activations, see `ootd.train.feature_cache`) or "images" (crop bytes).
        path: the cache directory or the crops table folder.
        payload: the column holding each row's input ("features" or "crop").
        shape: one row's activation shape (cache only).
        labels: the label map: sorted styles present in the train split; label i is labels[i].
        styles: every labelled style (validation labels index this list).
        counts: labelled rows per split.
        groups: image id → its near-duplicate group's representative, for grouped rows only (they share its split).
        fingerprint: weights fingerprint of the backbone the rows were made for.
    """

    source: str
    path: str
    payload: str
    shape: tuple[int, ...] | None
    labels: list[str]
    styles: list[str]
    counts: dict[str, int]
    fingerprint: str
    groups: dict[str, str] = dataclasses.field(default_factory=dict)


def prepare_data(config: Config, crops_dir: str | Path, workdir: str | Path) -> TrainData:
    """Checks the splits, builds the label map and (with `train.feature_cache`) the activation cache.

    Only `image_id` and `style` of the crops table are read on the driver; images stay in Ray Data.

    Raises:
        FileNotFoundError: no crops table at `crops_dir`.
        ValueError: fewer than two styles to train on, or an empty validation split.
    """
    from ootd.splits import group_split_of
    from ootd.tables import crops_snapshot, read_columns
    from ootd.train.feature_cache import build_feature_cache, probe_encoder

    crops_dir = Path(crops_dir).resolve()
    crops_snapshot(crops_dir)  # a clear error when there is no crops table
    table = read_columns(crops_dir, ["image_id", "style", "near_dup_of"])
    ids, styles = table["image_id"], table["style"]
    groups = {i: g for i, g in zip(ids, table["near_dup_of"], strict=True) if g}
    tcfg = config.train
    splits = [group_split_of(i, groups.get(i), tcfg.val_fraction, tcfg.test_fraction) for i in ids]
    labelled = [(s, sp) for s, sp in zip(styles, splits, strict=True) if s is not None]
    counts = {name: sum(1 for _, sp in labelled if sp == name) for name in ("train", "val", "test")}
    labels = sorted({s for s, sp in labelled if sp == "train"})
    if len(labels) < 2:
        raise ValueError(
            f"{crops_dir}: the train split holds {len(labels)} style(s) among {counts['train']} labelled crops; "
            "contrastive training needs at least two styles (unlabelled crops never train)"
        )
    val_styles = [s for s, sp in labelled if sp == "val"]
    if not any(val_styles.count(s) >= 2 for s in set(val_styles)):
        raise ValueError(
            f"{crops_dir}: the validation split ({counts['val']} of {len(labelled)} labelled crops, "
            f"train.val_fraction={tcfg.val_fraction}) has no style with two crops, so retrieval cannot be scored; "
            "raise train.val_fraction or add photos"
        )
    log.info("labelled crops per split %s; %d styles train: %s", counts, len(labels), ", ".join(labels))
    probe = probe_encoder(config.model, config.model.unlocked_blocks)
    common = {"labels": labels, "styles": sorted({s for s, _ in labelled}), "counts": counts, "groups": groups}
    if not tcfg.feature_cache:
        return TrainData("images", str(crops_dir), "crop", None, fingerprint=probe["fingerprint"], **common)
    cache = build_feature_cache(config, crops_dir, workdir, probe=probe)
    return TrainData("cache", str(cache.path), "features", cache.shape, fingerprint=cache.fingerprint, **common)


def split_dataset(data: TrainData, split: str, config: Config) -> ray.data.Dataset:
    """The rows of one split as a lazy Ray Dataset with columns `label` and the payload column.

    Its source is the list of parquet files, each read (row group by row group) inside a zero-CPU map task:
    `ray.data.read_parquet` would list files in a task that needs a whole CPU, which never comes while the
    training workers hold every CPU of a small cluster.
    """
    import ray

    files = sorted(str(p) for p in Path(data.path).rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files under {data.path}")
    columns = ["image_id", "style", data.payload] + (["error"] if data.source == "cache" else [])
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    # Workers re-read these every epoch: their progress bars would bury rank 0's per-epoch log in the driver.
    ds.context.enable_progress_bars = False
    return ds.map_batches(
        _read_split,
        fn_kwargs={
            "columns": columns,
            "split": split,
            "payload": data.payload,
            "labels": data.labels if split == "train" else data.styles,
            "val_fraction": config.train.val_fraction,
            "test_fraction": config.train.test_fraction,
            "groups": data.groups,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=_DATA_CPUS,
    )


def _read_split(
    batch: dict[str, np.ndarray],
    columns: list[str],
    split: str,
    payload: str,
    labels: list[str],
    val_fraction: float,
    test_fraction: float,
    groups: dict[str, str],
) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    from ootd.splits import group_split_of

    index = {style: i for i, style in enumerate(labels)}
    for path in batch["file"]:
        with pq.ParquetFile(str(path)) as parquet:
            for record_batch in parquet.iter_batches(batch_size=_ROWS_PER_READ, columns=columns):
                rows = record_batch.to_pydict()
                errors = rows.get("error")
                keep = [
                    i
                    for i, (image_id, style) in enumerate(zip(rows["image_id"], rows["style"], strict=True))
                    if style in index
                    and (errors is None or errors[i] is None)
                    and group_split_of(image_id, groups.get(image_id), val_fraction, test_fraction) == split
                ]
                if keep:
                    yield {
                        "label": np.array([index[rows["style"][i]] for i in keep], dtype=np.int64),
                        payload: np.array([rows[payload][i] for i in keep], dtype=object),
                    }


def build_trainer(config: Config, data: TrainData, *, storage_path: str | Path) -> TorchTrainer:
    """The TorchTrainer: `train.num_workers` DDP workers, checkpoints ranked by validation mAP@10.

    A run directory `<storage_path>/<train.run_name>` that already holds checkpoints is resumed from the latest.

    Args:
        config: the resolved config.
        data: from `prepare_data`.
        storage_path: Ray Train storage (absolute local path, or shared storage on a multi-node cluster).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ootd.placement import gpu_requested

    tcfg = config.train
    p = min(tcfg.styles_per_batch, len(data.labels))
    if p < tcfg.styles_per_batch:
        log.warning("train.styles_per_batch=%d but only %d styles train: using %d", tcfg.styles_per_batch, p, p)
    tcfg = dataclasses.replace(tcfg, styles_per_batch=p)
    batch = p * tcfg.images_per_style
    # Cached views are rows of their own; from images each epoch draws one fresh view per crop.
    train_rows = data.counts["train"] * (tcfg.augment_views if data.source == "cache" else 1)
    steps_per_epoch = max(1, train_rows // (tcfg.num_workers * batch))
    settings = LoopSettings(
        model=config.model,
        train=tcfg,
        source=data.source,
        payload=data.payload,
        shape=data.shape,
        labels=tuple(data.labels),
        fingerprint=data.fingerprint,
        steps_per_epoch=steps_per_epoch,
    )
    use_gpu = gpu_requested(config)
    return TorchTrainer(
        train_loop_per_worker,
        # Ray Train wants a dict here; the frozen dataclass inside pickles to every worker as it is.
        train_loop_config={"settings": settings},
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": tcfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=tcfg.run_name,
            storage_path=str(storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=tcfg.checkpoints_to_keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
        ),
        datasets={"train": split_dataset(data, "train", config), "val": split_dataset(data, "val", config)},
        # Validation runs on rank 0 over the whole split; only training rows are sharded.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def export_best(result: Result, config: Config, workdir: str | Path) -> tuple[Path, str, dict]:
    """Exports the best checkpoint (validation mAP@10) as a model dir `<workdir>/models/<new version>`.

    Returns:
        (model dir, model version, the best epoch's metrics).

    Raises:
        RuntimeError: when the run has no checkpoint or its backbone cannot be rebuilt identically.
    """
    import torch

    from ootd.model.encoder import build_encoder, new_model_version, weights_fingerprint
    from ootd.train.checkpoint import load_trainable, shipped_weights

    ranked = [(ckpt, metrics) for ckpt, metrics in (result.best_checkpoints or []) if SCORE in metrics]
    if not ranked:
        raise RuntimeError(f"training run at {result.path} reported no checkpoint to export")
    checkpoint, metrics = max(ranked, key=lambda pair: pair[1][SCORE])
    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)
    encoder = build_encoder(config.model)
    if weights_fingerprint(encoder) != state["fingerprint"]:
        raise RuntimeError(f"backbone {config.model.backbone!r} does not rebuild to the weights the run trained on")
    encoder.freeze(config.model.unlocked_blocks)
    load_trainable(encoder, shipped_weights(state))
    version = new_model_version()
    metrics = {key: value for key, value in metrics.items() if not key.startswith("_")}
    model_dir = encoder.export(
        Path(workdir) / "models" / version,
        version=version,
        labels=state["labels"],
        metrics=metrics,
        config=config,
        unlocked_blocks=config.model.unlocked_blocks,
    )
    log.info("exported epoch %s (%s=%.4f) to %s", metrics.get("epoch"), SCORE, metrics[SCORE], model_dir)
    return Path(model_dir), version, metrics


def run_training(config: Config, crops_dir: str | Path, *, workdir: str | Path) -> dict[str, Any]:
    """Fine-tunes on a crops table and exports the best model; re-running the same run name resumes it.

    Needs a connected Ray cluster (`ray.init` is the caller's job).

    Args:
        config: the resolved config.
        crops_dir: the crops table folder written by ingest.
        workdir: root of derived artefacts (feature cache, Ray Train storage by default, models).

    Returns:
        `model_dir`, `version`, `metrics` (best epoch), `history` (every epoch of the run), `run_dir`,
        `feature_cache` (or None); also written to `<run_dir>/summary.json` beside the resolved `config.yaml`.
    """
    from ootd.config import save_config

    workdir = Path(workdir).resolve()
    storage = Path(config.train.storage_path or workdir / "ray_results")
    storage = storage if "://" in str(storage) else storage.resolve()
    run_dir = storage / config.train.run_name
    data = prepare_data(config, crops_dir, workdir)
    if "://" not in str(run_dir):
        save_config(config, run_dir / "config.yaml")
    result = build_trainer(config, data, storage_path=storage).fit()
    if result.error is not None:
        raise RuntimeError(f"training run {run_dir} failed") from result.error
    model_dir, version, metrics = export_best(result, config, workdir)
    history: list[dict] = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as ckpt_dir:
            history = json.loads((Path(ckpt_dir) / HISTORY_FILE).read_text())
    summary = {
        "model_dir": str(model_dir),
        "version": version,
        "metrics": metrics,
        "history": history,
        "run_dir": str(run_dir),
        "feature_cache": data.path if data.source == "cache" else None,
    }
    if "://" not in str(run_dir):
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
