"""Held-out evaluation: colour histogram and frozen backbone vs fine-tuned model, crop vs whole photo; report, plots."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ootd.evaluate.metrics import color_histogram
from ootd.evaluate.report import (
    baseline_findings,
    markdown_report,
    markdown_table,
    plot_precision,
    plot_style_matrices,
)

if TYPE_CHECKING:
    from ootd.config import Config
    from ootd.model.encoder import StyleEncoder

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# (name, model, image kind) in report order. The baselines the fine-tuning must beat (DESIGN §8): a colour histogram
# of the crop (no learning at all) and the frozen backbone it was fine-tuned from; beside them the same architecture
# frozen at its random init, what the backbone's pretraining is worth (only for a backbone with a RANDOM_TWINS entry).
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("histogram_crop", "histogram", "crop"),
    ("frozen_random_crop", "random", "crop"),
    ("frozen_crop", "frozen", "crop"),
    ("frozen_whole", "frozen", "whole"),
    ("finetuned_crop", "finetuned", "crop"),
    ("finetuned_whole", "finetuned", "whole"),
)
HISTOGRAM_BINS = 8  # per RGB channel: 8x8x8 = 512-d
_NEEDED = ("image_id", "source", "style", "crop")
_SKIPPED_EXAMPLES = 20


@dataclass
class _EvalSet:
    """Rows that decoded in both forms, their embedding per variant, and what was left out."""

    styles: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    embeddings: dict[str, list[np.ndarray]] = field(default_factory=dict)  # variant → its batches, VARIANTS order
    skipped: list[dict[str, str]] = field(default_factory=list)


def evaluate(
    model_dir: str | Path,
    crops_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "test",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    baseline_backbone: str | None = None,
    config: Config | None = None,
    batch_size: int = 32,
    precision: str = "fp32",
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Scores a fine-tuned model against two baselines on one split, for outfit crops and whole photos.

    Every labelled crops-table row whose image id falls in `split` (`ootd.splits.split_of`) is embedded five
    ways: an 8x8x8 RGB colour histogram of the stored outfit crop (no learning), pooled backbone features of the
    backbone the model was fine-tuned from (rebuilt fresh, not the tuned trunk) and the fine-tuned 128-d
    embedding, the last two each for the outfit crop and for the decoded source photo. A row whose crop or photo
    cannot be read is left out of all variants (so they compare the same images) and listed under `skipped`.
    When the fine-tuned crop embedding does not beat a baseline on mAP@10 the report and the returned
    `warnings` say so (`findings`).

    Writes to `out_dir`: `metrics.json`, `report.md`, `style_matrix.png`, `precision_at_k.png`, `config.yaml`.

    Args:
        model_dir: a model dir exported by training.
        crops_dir: the crops table folder written by ingest.
        out_dir: where the report goes (created; files in it are replaced).
        split: `train`, `val` or `test`.
        val_fraction: `train.val_fraction` the model was trained with.
        test_fraction: `train.test_fraction` the model was trained with.
        baseline_backbone: backbone name for the frozen baseline; default: the one recorded in the model dir.
        config: the resolved config to save next to the report; default: the model's recorded config.
        batch_size: images per forward pass.
        precision: `fp32` or `bf16`.
        device: torch device; default `cuda` when available, else `cpu`.
        progress: show a tqdm progress bar.

    Returns:
        JSON-able summary: `out_dir`, `files`, `n_images`, `variants` (metrics per variant, no matrices),
        `findings` (baselines the fine-tuned model failed to beat), `warnings` (data warnings plus the findings),
        `skipped`, `table` (markdown) and `report` (the whole report.md text).

    Raises:
        ValueError: for a bad split or when the split has too few labelled images to evaluate.
        FileNotFoundError: when the crops table is missing (a missing source photo only skips its row).
        ootd.encoder.ModelNotAvailable: when the model dir or the baseline backbone cannot be loaded.
    """
    from ootd.config import DataConfig
    from ootd.model.backbones import RANDOM_TWINS
    from ootd.model.export import load
    from ootd.tables import crops_files

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    files = crops_files(crops_dir)
    selected, warnings = select_split(files, split, val_fraction, test_fraction)
    model_dir = Path(model_dir).expanduser().absolute()
    tuned = load(model_dir, device=_device(device))
    meta = json.loads((model_dir / "ootd_model.json").read_text())
    baseline_name = baseline_backbone or str(meta.get("backbone") or "")
    frozen = frozen_baseline(model_dir, backbone=baseline_name, device=str(tuned.device))
    twin = RANDOM_TWINS.get(baseline_name)
    untrained = frozen_baseline(model_dir, backbone=twin, device=str(tuned.device)) if twin else None
    data_cfg = config.data if config is not None else DataConfig()
    evalset = _embed_split(files, selected, tuned, frozen, untrained, batch_size, precision, progress, data_cfg)
    if evalset.skipped:  # the final counts decide; the early check only avoided embedding a hopeless split
        warnings = _check_size(
            Counter(evalset.styles), split, "after leaving out unreadable rows", len(evalset.skipped)
        )

    classes = _style_order(evalset.styles, tuned.labels)
    variants = {
        name: _score(np.concatenate(evalset.embeddings[name]), evalset.styles, classes)
        for name, _, _ in VARIANTS if name in evalset.embeddings
    }
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "model_dir": str(model_dir),
        "model_version": tuned.version,
        "baseline_backbone": baseline_name,
        "random_backbone": twin,
        "crops_dir": str(Path(crops_dir).expanduser().absolute()),
        "split": split,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "n_images": len(evalset.styles),
        "styles": classes,
        "counts": {style: Counter(evalset.styles)[style] for style in classes},
        "embedding_dims": {"histogram": HISTOGRAM_BINS**3, "frozen": frozen.feature_dim, "finetuned": tuned.embed_dim},
        "warnings": warnings,
        "findings": baseline_findings(variants),
        "skipped": {"count": len(evalset.skipped), "examples": evalset.skipped[:_SKIPPED_EXAMPLES]},
    }
    written = {
        "metrics": out / "metrics.json",
        "report": out / "report.md",
        "style_matrix": plot_style_matrices(variants, classes, header, out / "style_matrix.png"),
        "precision_at_k": plot_precision(variants, header, out / "precision_at_k.png"),
        "config": _save_config(config, meta, out / "config.yaml", val_fraction, test_fraction),
    }
    table = markdown_table(variants)
    report = markdown_report(table, variants, header, written)
    written["metrics"].write_text(json.dumps(_json_safe({**header, "variants": variants}), indent=2))
    written["report"].write_text(report)
    summary_variants = {name: {k: v for k, v in m.items() if k != "style_matrix"} for name, m in variants.items()}
    for finding in header["findings"]:
        log.warning(finding)
    return _json_safe(
        {
            **header,
            "warnings": [*warnings, *header["findings"]],
            "out_dir": str(out),
            "files": {key: str(path) for key, path in written.items()},
            "variants": summary_variants,
            "table": table,
            "report": report,
        }
    )


def select_split(
    files: list[Path], split: str, val_fraction: float, test_fraction: float
) -> tuple[dict[str, str], list[str]]:
    """Image id → style of the labelled rows in `split`, reading only the id and style columns.

    Returns:
        (selected ids in first-seen order, warnings about styles with fewer than 2 images).

    Raises:
        ValueError: for a table without the needed columns, or a split too small to evaluate.
    """
    import pyarrow.dataset as ds

    from ootd.splits import group_split_of
    from ootd.tables import read_files_columns

    dataset = ds.dataset([str(f) for f in files], format="parquet")
    # Near-duplicate groups share their representative's split (files from before the column read as none).
    table = read_files_columns(files, ["image_id", "near_dup_of"])
    groups = {i: g for i, g in zip(table["image_id"], table["near_dup_of"], strict=True) if g}
    missing = [c for c in _NEEDED if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"crops table {files[0].parent} lacks columns {missing} (has {dataset.schema.names})")
    selected: dict[str, str] = {}
    labelled = 0
    for batch in dataset.to_batches(columns=["image_id", "style"], batch_size=8192):
        for image_id, style in zip(
            batch.column("image_id").to_pylist(), batch.column("style").to_pylist(), strict=True
        ):
            if style is None or not str(style).strip() or not isinstance(image_id, str):
                continue
            labelled += 1
            try:
                in_split = group_split_of(image_id, groups.get(image_id), val_fraction, test_fraction) == split
            except ValueError:
                log.warning("crops table row with malformed image id %r left out", image_id)
                continue
            if in_split:
                selected.setdefault(image_id, str(style).strip())
    if labelled == 0:
        raise ValueError(f"crops table {files[0].parent} has no labelled rows (style is empty everywhere)")
    warnings = _check_size(Counter(selected.values()), split, f"(val_fraction={val_fraction}, "
                           f"test_fraction={test_fraction}; {labelled} labelled rows in the table)", 0)  # fmt: skip
    return selected, warnings


def _check_size(counts: Counter, split: str, context: str, skipped: int) -> list[str]:
    """Raises when fewer than 2 styles have 2+ images; otherwise warns about styles with fewer than 2."""
    usable = sorted(style for style, n in counts.items() if n >= 2)
    if len(usable) < 2:
        found = ", ".join(f"{s}={n}" for s, n in sorted(counts.items())) or "none"
        extra = f"; {skipped} rows could not be read" if skipped else ""
        raise ValueError(
            f"split {split!r} is too small to evaluate {context}: labelled images per style: {found}{extra}. "
            "Retrieval needs at least 2 images in each of at least 2 styles; use a larger split fraction "
            "(train.test_fraction / train.val_fraction, the same values training used) or add photos."
        )
    thin = sorted(style for style, n in counts.items() if n < 2)
    if not thin:
        return []
    message = (
        f"split {split!r} has fewer than 2 images for {', '.join(thin)}: those images only act as distractors "
        "(they have no same-style match to find), so their styles are not scored as queries"
    )
    log.warning(message)
    return [message]


def frozen_baseline(model_dir: str | Path, *, backbone: str | None = None, device: str = "cpu") -> StyleEncoder:
    """A fresh encoder on the backbone the model was fine-tuned from: the untouched trunk, not the tuned one.

    It is built exactly as training built its starting point (`ootd.feature_cache.build_encoder`, fixed init
    seed; `tiny` loads its committed pretrained trunk, `tiny-random` is seeded), so either tiny backbone matches.

    Args:
        model_dir: the exported model dir (its `ootd_model.json` names the backbone and records the config).
        backbone: a different backbone name to compare against instead.
        device: torch device.

    Raises:
        ootd.encoder.ModelNotAvailable: when the backbone's weights are not on this machine.
        ValueError: when the model dir records no backbone and none is given.
    """
    import dataclasses

    from ootd.config import ModelConfig
    from ootd.model.encoder import build_encoder

    meta = json.loads((Path(model_dir) / "ootd_model.json").read_text())
    recorded = ((meta.get("config") or {}).get("model") or {}) if isinstance(meta.get("config"), dict) else {}
    name = backbone or meta.get("backbone") or recorded.get("backbone")
    if not name:
        raise ValueError(f"{model_dir} records no backbone; pass baseline_backbone (e.g. hf-hub:Marqo/...)")
    allow_download = bool(recorded.get("allow_download", False))
    # At the input size the model was fine-tuned at (`model.image_size`), as training started from it.
    model = dataclasses.replace(ModelConfig(), backbone=str(name), unlocked_blocks=0, allow_download=allow_download,
                                image_size=int(recorded.get("image_size") or 0))
    return build_encoder(model).to(device).eval()


def _embed_split(
    files: list[Path],
    selected: dict[str, str],
    tuned: StyleEncoder,
    frozen: StyleEncoder,
    untrained: StyleEncoder | None,
    batch_size: int,
    precision: str,
    progress: bool,
    data_cfg: Any,
) -> _EvalSet:
    """Streams the selected rows from the table in batches and embeds each batch every variant's way (without an
    `untrained` encoder, its variant is left out)."""
    from tqdm.auto import tqdm

    result = _EvalSet()
    seen: set[str] = set()
    variants = [v for v in VARIANTS if untrained is not None or v[1] != "random"]
    desc = f"evaluate: embedding {len(variants)} variants"
    bar = tqdm(total=len(selected), desc=desc, unit="img", disable=not progress)
    try:
        for rows in _selected_rows(files, selected, max(batch_size, 16)):
            crops, wholes, kept = [], [], []
            for row in rows:
                if row["image_id"] in seen:
                    continue  # one row per image, even if a table holds a duplicate
                seen.add(row["image_id"])
                images = _decode_row(row, data_cfg, result.skipped)
                if images is not None:
                    crops.append(images[0])
                    wholes.append(images[1])
                    kept.append(row)
            bar.update(len(rows))
            if not kept:
                continue
            for name, model_kind, image_kind in variants:
                images = crops if image_kind == "crop" else wholes
                if model_kind == "histogram":
                    vectors = histograms(images)
                elif model_kind in ("frozen", "random"):
                    encoder = frozen if model_kind == "frozen" else untrained
                    vectors = encoder.embed_features(images, batch_size=batch_size, precision=precision)
                else:
                    vectors = tuned.embed(images, batch_size=batch_size, precision=precision)
                result.embeddings.setdefault(name, []).append(vectors)
            result.styles += [selected[row["image_id"]] for row in kept]
            result.image_ids += [row["image_id"] for row in kept]
    finally:
        bar.close()
    return result


def histograms(images: list[Any], bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """The colour-histogram baseline's vectors (N, bins**3) for PIL images (`metrics.color_histogram`)."""
    if not images:
        return np.zeros((0, bins**3), dtype=np.float32)
    rows = [color_histogram(np.asarray(image.convert("RGB")), bins) for image in images]
    return np.stack(rows).astype(np.float32)


def _selected_rows(files: list[Path], selected: dict[str, str], batch_rows: int) -> Iterator[list[dict]]:
    """Rows of the selected ids only: crop bytes of other splits are filtered out while scanning."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    dataset = ds.dataset([str(f) for f in files], format="parquet")
    wanted = pc.field("image_id").isin(list(selected))
    for batch in dataset.to_batches(columns=list(_NEEDED), filter=wanted, batch_size=batch_rows):
        if batch.num_rows:
            yield batch.to_pylist()


def _decode_row(row: dict, data_cfg: Any, skipped: list[dict[str, str]]) -> tuple[Any, Any] | None:
    """(crop, whole photo) as upright RGB images, or None after recording why the row is left out."""
    from ootd.decode import InputError, decode, read_file

    try:
        if not row["crop"]:
            raise InputError("crop", "empty crop bytes in the crops table")
        crop = decode(row["crop"], data_cfg.max_image_pixels)
        whole = decode(read_file(row["source"] or "", data_cfg.max_image_bytes), data_cfg.max_image_pixels)
        return crop, whole
    except InputError as exc:
        skipped.append(
            {"image_id": row["image_id"], "source": str(row["source"]), "stage": exc.stage, "error": str(exc)}
        )
        log.warning("evaluation leaves out %s: %s", row["source"], exc)
        return None


def _style_order(styles: list[str], model_labels: list[str]) -> list[str]:
    """Styles present in the evaluation set: canonical order (model labels, then STYLES), unknown ones last."""
    from ootd.styles import STYLES

    present = set(styles)
    order = [s for s in dict.fromkeys([*model_labels, *STYLES]) if s in present]
    return order + sorted(present - set(order))


def _score(embeddings: np.ndarray, styles: list[str], classes: list[str]) -> dict[str, Any]:
    """Retrieval metrics, silhouette and the style matrix of one variant."""
    from ootd.evaluate.metrics import matrix_summary, retrieval_metrics, silhouette, style_matrix

    scores: dict[str, Any] = dict(retrieval_metrics(embeddings, styles))
    scores["n_queries"] = int(scores["n_queries"])
    scores["silhouette"] = silhouette(embeddings, styles) if len(set(styles)) < len(styles) else None
    matrix = style_matrix(embeddings, styles, classes)
    scores.update(matrix_summary(matrix))
    scores["dim"] = int(embeddings.shape[1])
    scores["style_matrix"] = matrix.tolist()
    return scores


def _save_config(config: Config | None, meta: dict, path: Path, val_fraction: float, test_fraction: float) -> Path:
    """The config next to the report: the one given, else the model's recorded one, with the split used."""
    import yaml

    from ootd.config import Config as ConfigTree
    from ootd.config import config_to_dict

    if config is not None:
        tree = config_to_dict(config)
    elif isinstance(meta.get("config"), dict):
        tree = json.loads(json.dumps(meta["config"]))
    else:
        tree = config_to_dict(ConfigTree())
        tree["model"]["backbone"] = str(meta.get("backbone") or tree["model"]["backbone"])
    tree.setdefault("train", {}).update(val_fraction=val_fraction, test_fraction=test_fraction)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _json_safe(value: Any) -> Any:
    """NaN/inf become null and numpy scalars plain numbers, so the JSON is valid everywhere."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
