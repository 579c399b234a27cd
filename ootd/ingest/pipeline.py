"""Ray Data ingest: list photos, hash and dedup, decode, detect garments in an actor pool, write crops/errors tables.

Two passes over the inputs keep memory flat and dedup exact:

1. **Hash** (Ray tasks): each file is read, hashed (sha256 = image id) and its header probed (format, pixel
   limit) without decoding; only small rows (source, style, id or error) come back to the driver. The driver
   already holds the input list (paths), so one 64-char id per input keeps it at the same order of memory and
   lets it choose the kept source of each id (the lexicographically smallest) without a shuffle. Image bytes
   never leave the workers, and duplicates are never decoded or run through the detector.
2. **Crop** (streaming): unique ids only, read again and decoded by Ray tasks, detected and cropped in an actor
   pool (`DetectCrop`, weights loaded once per actor), written by one writer actor (`WriteTables`) as parquet
   files of at most `ROWS_PER_FILE` rows. Decoding overlaps detection; only a few batches of pixels are in
   flight at a time.

Every file is written under a temporary name and renamed once complete (Ray's `write_parquet` writes in place,
so a killed job could leave a half-written file): an interrupted run leaves only complete files. Re-running
skips sources already in either table and ids already in `crops/`; new files carry a new run id and old files
are never rewritten. An error is final for its source: to retry failed inputs, delete the `errors/` files.
The stages themselves live in `ootd.ingest.stages`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ootd.decode import IMAGE_EXTENSIONS
from ootd.ingest.stages import DetectCrop, WriteTables, decode_batch, hash_batch, stats_row
from ootd.placement import device_gpus
from ootd.tables import CROPS_DIR, ERRORS_DIR, count_rows, read_columns, schemas, write_table

if TYPE_CHECKING:
    from ootd.config import Config

SUMMARY_FILE, CONFIG_FILE = "ingest_summary.json", "config.yaml"
ROWS_PER_FILE = 1024  # crops are <= crop_max_side JPEGs (~20-60 kB): tens of MB per file
# Largest block of the hash pass: one task's share of a large ingest stays cheap to retry and spreads out.
HASH_ROWS_PER_BLOCK = 256
# Largest block of the crop pass, in detector batches: each block becomes one actor task, so small blocks keep
# the actors evenly loaded up to the last image (a 30-image block left one actor idle for seconds at the end).
CROP_BATCHES_PER_BLOCK = 2
# Decode tasks and the writer reserve little CPU so they are scheduled beside detector actors that hold whole
# cores: decoding overlaps detection instead of waiting for a free core.
DECODE_NUM_CPUS, WRITE_NUM_CPUS = 0.25, 0.1


@dataclass(frozen=True)
class Input:
    """One listed input: where the photo is and its style label (None when unlabeled)."""

    source: str
    style: str | None


def list_inputs(source: str | Path) -> list[Input]:
    """Lists the photos of a style folder or a manifest, sorted by source (paths only, nothing is opened).

    A folder holds one sub-folder per style (the sub-folder name is the style; files directly in the folder are
    unlabeled); files are picked by image extension, case-insensitively, hidden files and folders skipped. A
    manifest is a .csv or .parquet with a `path` column (relative paths resolve against the manifest's folder)
    and an optional `style` column.

    Args:
        source: a folder or a manifest file.

    Raises:
        FileNotFoundError: when the source does not exist.
        ValueError: for an unsupported source, a manifest without `path`, or no inputs at all.
    """
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"ingest source not found: {source}")
    if root.is_dir():
        inputs = _list_folder(root)
        empty = f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}"
    elif root.suffix.lower() in (".csv", ".parquet"):
        inputs = _read_manifest(root)
        empty = f"manifest {root} has no rows"
    else:
        raise ValueError(f"ingest source must be a folder or a .csv/.parquet manifest, got {source}")
    if not inputs:
        raise ValueError(empty)
    return sorted(inputs, key=lambda item: item.source)


def _list_folder(root: Path) -> list[Input]:
    inputs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        style = rel.parts[0] if rel.parts else None
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                inputs.append(Input(os.path.abspath(os.path.join(dirpath, name)), style))
    return inputs


def _read_manifest(path: Path) -> list[Input]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path) if path.suffix.lower() == ".parquet" else pacsv.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for unreadable manifests
        raise ValueError(f"cannot read manifest {path}: {exc}") from exc
    columns = table.column_names
    if "path" not in columns:
        hint = " (url inputs are not supported: download them first and list local paths)" if "url" in columns else ""
        raise ValueError(f"manifest {path} needs a `path` column, has {columns}{hint}")
    paths = table.column("path").to_pylist()
    styles = table.column("style").to_pylist() if "style" in columns else [None] * len(paths)
    inputs = []
    for row, (item, style) in enumerate(zip(paths, styles, strict=True)):
        style = None if style is None or str(style).strip() == "" else str(style)
        if item is None or str(item).strip() == "":
            # Kept as an input so it lands in the errors table under its row number instead of vanishing.
            inputs.append(Input(f"{path}#row={row}", style))
            continue
        full = Path(str(item)).expanduser()
        inputs.append(Input(os.path.abspath(full if full.is_absolute() else path.parent / full), style))
    return inputs


def read_done(out_dir: str | Path) -> tuple[set[str], set[str]]:
    """Sources and image ids already finished in `out_dir` (only the id/source columns are read).

    Args:
        out_dir: an ingest output folder.

    Returns:
        (sources in crops/ or errors/, image ids in crops/).
    """
    crops = read_columns(Path(out_dir) / CROPS_DIR, ["source", "image_id"])
    errors = read_columns(Path(out_dir) / ERRORS_DIR, ["source"])
    return set(crops["source"]) | set(errors["source"]), set(crops["image_id"])


def run_ingest(config: Config, source: str | Path, out_dir: str | Path, *, limit: int | None = None) -> dict:
    """Runs the ingest pipeline on the connected Ray cluster and writes the crops and errors tables.

    Args:
        config: the resolved config (data and detect sections are used).
        source: a style folder or a manifest (see `list_inputs`).
        out_dir: output folder: `crops/`, `errors/`, `ingest_summary.json`, `config.yaml`.
        limit: only the first `limit` inputs (in source order).

    Returns:
        The summary also written to `ingest_summary.json`: inputs, skipped (finished by an earlier run),
        duplicates, rows, errors, errors_by_stage, per_style, fallback_rate, seconds (wall), hash_seconds (wall
        of the hash pass), busy_seconds (summed time inside decode/detect/crop), crops_total, files.
        Always inputs == skipped + duplicates + rows + errors.

    Raises:
        FileNotFoundError: when the source does not exist (nothing is written then).
        ValueError: for an unusable source or limit (nothing is written then).
    """
    import pyarrow as pa
    import ray

    from ootd.config import save_config

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    started = time.perf_counter()
    out = Path(out_dir)
    inputs = list_inputs(source)[:limit]
    done_sources, done_ids = read_done(out)
    todo = [item for item in inputs if item.source not in done_sources]
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG_FILE)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    data, detect = config.data, config.detect
    limits = {"max_bytes": data.max_image_bytes, "max_pixels": data.max_image_pixels}

    unique, hash_errors, duplicates = _hash_and_dedup(todo, done_ids, data.num_blocks, limits)
    hash_seconds = time.perf_counter() - started
    totals = _Totals()
    if hash_errors:
        table = pa.Table.from_pylist(hash_errors, schema=schemas()["errors"])
        totals.add(stats_row(errors_by_stage=Counter(e["stage"] for e in hash_errors),
                             files=[str(write_table(table, out / ERRORS_DIR, run_id))]))  # fmt: skip
    if unique:
        items = [{"image_id": key, "source": src, "style": style} for key, (src, style) in unique.items()]
        ds = (
            ray.data.from_items(items, override_num_blocks=_blocks(
                len(items), data.num_blocks, CROP_BATCHES_PER_BLOCK * detect.batch_size))
            .map_batches(decode_batch, fn_kwargs=limits, batch_size=detect.batch_size, batch_format="pyarrow",
                         num_cpus=DECODE_NUM_CPUS)
            .map_batches(DetectCrop, batch_size=detect.batch_size, batch_format="pyarrow",
                         fn_constructor_kwargs={"detect": detect, "crop_max_side": data.crop_max_side,
                                                "threads": max(1, round(detect.num_cpus))},
                         compute=ray.data.ActorPoolStrategy(size=detect.concurrency), num_cpus=detect.num_cpus,
                         num_gpus=device_gpus(detect.device))
            .map_batches(WriteTables, fn_constructor_kwargs={"out_dir": str(out.resolve()), "run_id": run_id},
                         batch_size=ROWS_PER_FILE, batch_format="pyarrow", num_cpus=WRITE_NUM_CPUS,
                         compute=ray.data.ActorPoolStrategy(size=1))
        )  # fmt: skip
        # Only the writer's one-row counts reach the driver; crops stay on the workers and on disk.
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for stats in batch.column("stats").to_pylist():
                totals.add(json.loads(stats))
    summary = totals.summary(run_id=run_id, source=str(source), out=str(out), inputs=len(inputs),
                             skipped=len(inputs) - len(todo), duplicates=duplicates)  # fmt: skip
    summary["hash_seconds"] = round(hash_seconds, 3)  # wall time of listing + the hash/dedup pass
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["crops_total"] = count_rows(out / CROPS_DIR)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _hash_and_dedup(
    todo: list[Input], done_ids: set[str], num_blocks: int, limits: dict[str, int]
) -> tuple[dict[str, tuple[str, str | None]], list[dict], dict[str, Any]]:
    """Pass 1: hashes every input with Ray tasks and keeps the smallest source of each new id.

    Returns:
        (id -> (kept source, style), error rows, {"count": duplicates, "examples": [[duplicate, kept], ...]}).
    """
    import ray

    unique: dict[str, tuple[str, str | None]] = {}
    errors: list[dict] = []
    dropped: list[tuple[str, str]] = []  # (duplicate source, its image id)
    if todo:
        items = [{"source": i.source, "style": i.style} for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=_blocks(len(items), num_blocks, HASH_ROWS_PER_BLOCK))
        ds = ds.map_batches(hash_batch, fn_kwargs=limits, batch_format="pyarrow")
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                key = row["image_id"]
                if row["stage"] is not None:
                    errors.append({"source": row["source"], "stage": row["stage"], "error": row["error"]})
                elif key in done_ids:
                    dropped.append((row["source"], key))
                elif key in unique:
                    # Blocks finish in any order; keeping the smallest source makes the choice deterministic.
                    pair = sorted([unique[key], (row["source"], row["style"])], key=lambda item: item[0])
                    unique[key] = pair[0]
                    dropped.append((pair[1][0], key))
                else:
                    unique[key] = (row["source"], row["style"])
    examples = sorted([dup, unique[key][0] if key in unique else f"earlier run: {key}"] for dup, key in dropped)
    return unique, errors, {"count": len(dropped), "examples": examples[:10]}


def _blocks(rows: int, num_blocks: int, rows_per_block: int) -> int:
    """At least `data.num_blocks` blocks (never more than rows), each of at most `rows_per_block` inputs."""
    return min(rows, max(num_blocks, -(-rows // rows_per_block)))


class _Totals:
    """Sums the writer's counts into the run summary."""

    def __init__(self) -> None:
        self.rows = self.fallback = 0
        self.per_style: Counter = Counter()
        self.errors_by_stage: Counter = Counter()
        self.busy: Counter = Counter()
        self.files: list[str] = []

    def add(self, stats: dict[str, Any]) -> None:
        self.rows += stats["rows"]
        self.fallback += stats["fallback"]
        self.per_style.update(stats["per_style"])
        self.errors_by_stage.update(stats["errors_by_stage"])
        self.busy.update(stats["busy_seconds"])
        self.files.extend(stats["files"])

    def summary(self, *, duplicates: dict[str, Any], **head: Any) -> dict[str, Any]:
        return {
            **head,
            "duplicates": duplicates["count"],
            "rows": self.rows,
            "errors": sum(self.errors_by_stage.values()),
            "errors_by_stage": dict(sorted(self.errors_by_stage.items())),
            "per_style": dict(sorted(self.per_style.items())),
            "fallback_rate": round(self.fallback / self.rows, 4) if self.rows else 0.0,
            "duplicate_examples": duplicates["examples"],
            "busy_seconds": {k: round(v, 3) for k, v in sorted(self.busy.items())},
            "files": sorted(self.files),
        }
