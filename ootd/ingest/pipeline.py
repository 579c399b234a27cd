"""Ray Data ingest: list photos, read or download them, hash and dedup, group near duplicates, detect, crop, write.

Two passes over the inputs keep memory flat and dedup exact:

1. **Hash** (Ray tasks for paths and filesystem URIs; `FetchHash` actors for URLs): each input is read or
   downloaded, hashed (sha256 = image id, plus the perceptual hashes of `ootd.ingest.near_dup`) and its header
   probed; only small rows (source, style, id, hashes or error) come back to the driver. The driver already holds
   the input list, so one id per input keeps it at the same order of memory and lets it choose the kept source of
   each id (the lexicographically smallest) without a shuffle. Downloaded bytes wait, content-addressed, in
   `downloads/` (URL → id recorded in `fetched/`); image bytes never reach the driver.
   A small driver step then groups near duplicates over the new hashes and those of earlier runs (read from the
   crops table's hash columns only, no crops), giving each new row its `near_dup_of`.
2. **Crop** (streaming): unique ids only, read again (downloads from `downloads/`) and decoded by Ray tasks,
   detected and cropped in an actor pool (`DetectCrop`, weights loaded once per actor), written by one writer
   actor (`WriteTables`) as parquet files of at most `ROWS_PER_FILE` rows. Decoding overlaps detection; only a
   few batches of pixels are in flight at a time.

Every file is written under a temporary name and renamed once complete (Ray's `write_parquet` writes in place,
so a killed job could leave a half-written file): an interrupted run leaves only complete files. Re-running
skips sources already in the crops table or with a final error, and ids already in `crops/`; a URL fetched
before is not fetched again (its id comes from `fetched/`, its bytes from `downloads/` if still there). Errors
are final for their source, except download failures marked `transient` (timeouts, 429, 5xx after the retries),
which the next run retries: their old error rows are then dropped from the earlier errors files, the only files
ingest ever rewrites. The stages themselves live in `ootd.ingest.stages`.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ootd.ingest.near_dup import PHash, assign_near_dups
from ootd.ingest.sources import Input, list_inputs
from ootd.ingest.stages import DetectCrop, FetchHash, WriteTables, decode_batch, hash_batch, stats_row
from ootd.placement import device_gpus, resolve_device
from ootd.tables import (
    CROPS_DIR,
    ERRORS_DIR,
    FETCHED_DIR,
    NEAR_DUP_COLUMNS,
    count_rows,
    parquet_files,
    read_columns,
    schemas,
    write_file,
    write_table,
)

if TYPE_CHECKING:
    from ootd.config import Config

__all__ = ["Input", "list_inputs", "read_done", "run_ingest"]  # Input and list_inputs live in ootd.ingest.sources

SUMMARY_FILE, CONFIG_FILE = "ingest_summary.json", "config.yaml"
DETECTOR_DIGEST_FILE = "detector.sha256"  # the detector weights the crops were cut with, by content
DOWNLOADS_DIR = "downloads"  # downloaded bytes between the two passes; removed when a run completes
ROWS_PER_FILE = 1024  # crops are <= crop_max_side JPEGs (~20-60 kB): tens of MB per file
# Largest block of the hash pass: one task's share of a large ingest stays cheap to retry and spreads out.
HASH_ROWS_PER_BLOCK = 256
FETCHED_ROWS_PER_FILE = 4096  # fetched/ records (URL, id, hashes: ~0.5 kB each) buffered per file
# URLs per download batch, per thread of an actor: small enough that one slow host holds back few others.
FETCH_ROWS_PER_THREAD = 4
# Largest block of the crop pass, in detector batches: each block becomes one actor task, so small blocks keep
# the actors evenly loaded up to the last image (a 30-image block left one actor idle for seconds at the end).
CROP_BATCHES_PER_BLOCK = 2
# Decode tasks and the writer reserve little CPU so they are scheduled beside detector actors that hold whole
# cores: decoding overlaps detection instead of waiting for a free core. Downloads mostly wait on the network.
DECODE_NUM_CPUS, WRITE_NUM_CPUS, FETCH_NUM_CPUS = 0.25, 0.1, 0.25
_HASH_COLUMNS = ["phash", "phash_mirror", "phash_windows"]


@dataclass
class Done:
    """What earlier runs left in an output folder (only id/source/flag columns are read)."""

    sources: set[str] = field(default_factory=set)  # in crops/ or with a final error
    ids: set[str] = field(default_factory=set)  # image ids in crops/
    transient: set[str] = field(default_factory=set)  # sources whose only outcome is a transient error
    fetched: dict[str, dict[str, Any]] = field(default_factory=dict)  # URL -> its fetched/ row (id, hashes)


def read_state(out_dir: str | Path) -> Done:
    """Reads what earlier runs finished in `out_dir`.

    Args:
        out_dir: an ingest output folder.
    """
    out = Path(out_dir)
    crops = read_columns(out / CROPS_DIR, ["source", "image_id"])
    errors = read_columns(out / ERRORS_DIR, ["source", "transient"])
    final = {s for s, t in zip(errors["source"], errors["transient"], strict=True) if not t}
    done = Done(sources=set(crops["source"]) | final, ids=set(crops["image_id"]))
    done.transient = {s for s, t in zip(errors["source"], errors["transient"], strict=True) if t} - done.sources
    fetched = read_columns(out / FETCHED_DIR, ["source", "image_id", *_HASH_COLUMNS])
    for i, url in enumerate(fetched["source"]):
        done.fetched[url] = {c: fetched[c][i] for c in fetched}  # later files (runs) win: names sort by time
    return done


def read_done(out_dir: str | Path) -> tuple[set[str], set[str]]:
    """Sources and image ids already finished in `out_dir` (only the id/source columns are read).

    Args:
        out_dir: an ingest output folder.

    Returns:
        (sources in crops/ or with a final error in errors/, image ids in crops/).
    """
    done = read_state(out_dir)
    return done.sources, done.ids


# The settings that decide what a crop is: a resumed ingest must not mix crops cut two ways.
_CROP_SETTINGS = {
    "detect": ("weights", "class_ids", "conf", "relative_conf", "iou", "imgsz", "pad", "min_box_size",
               "flip_average"),
    "data": ("crop_max_side",),
}  # fmt: skip


def check_crop_settings(out_dir: str | Path, config: Config) -> None:
    """Refuses to resume into an output folder whose crops were cut with other crop settings.

    Ingest skips photos already in `crops/`, so a second run with, say, another `detect.conf` would silently keep
    the first run's crops beside its own. The folder's `config.yaml` records the settings of the run that wrote it,
    and `detector.sha256` its detector weights' content (a retrained detector copied over the same file name).

    Raises:
        ValueError: `out_dir` holds crops and its recorded crop settings or detector weights differ from `config`'s.
    """
    from ootd.config import load_config

    out = Path(out_dir)
    recorded = out / CONFIG_FILE
    if not recorded.is_file() or not read_state(out).ids:
        return
    before = load_config(recorded)
    changed = []
    for section, keys in _CROP_SETTINGS.items():
        for key in keys:
            old, new = getattr(getattr(before, section), key), getattr(getattr(config, section), key)
            if old != new:
                changed.append(f"{section}.{key} {old!r} -> {new!r}")
    digest_file = out / DETECTOR_DIGEST_FILE
    if digest_file.is_file() and digest_file.read_text().strip() != _detector_digest(config):
        changed.append(f"the content of the detector weights {config.detect.weights!r}")
    if changed:
        raise ValueError(f"{out} holds crops cut with other settings ({'; '.join(changed)}); resuming would mix "
                         f"the two: ingest into a new output folder, or remove {out / CROPS_DIR} to cut them again")


def _detector_digest(config: Config) -> str:
    """What `detector.sha256` records: the weights' sha256, or "missing" (the detect stage then reports them)."""
    from ootd.detect.yolo import weights_sha256

    return weights_sha256(config.detect.weights) or "missing"


def run_ingest(config: Config, source: str | Path, out_dir: str | Path, *, limit: int | None = None) -> dict:
    """Runs the ingest pipeline on the connected Ray cluster and writes the crops and errors tables.

    Args:
        config: the resolved config (data and detect sections are used).
        source: a style folder or a manifest (see `list_inputs`).
        out_dir: output folder: `crops/`, `errors/`, `ingest_summary.json`, `config.yaml`, `detector.sha256` (and
            for URL inputs `fetched/`, plus `downloads/` while a run is unfinished).
        limit: only the first `limit` inputs (in source order).

    Returns:
        The summary also written to `ingest_summary.json`: inputs, skipped (finished by an earlier run),
        duplicates, rows, errors, errors_by_stage, transient_errors, retried (transient failures of earlier runs
        tried again), downloads (fetched, reused), near_duplicates (new rows with a `near_dup_of`), per_style,
        fallback_rate, seconds (wall), hash_seconds (wall of the hash pass and grouping), busy_seconds (summed
        time inside decode/detect/crop), crops_total, files. Always inputs == skipped + duplicates + rows + errors.

    Raises:
        FileNotFoundError: when the source does not exist (nothing is written then).
        ValueError: for an unusable source, limit or allowed network, or an `out_dir` holding crops cut with
            other crop settings (`check_crop_settings`); nothing is written then.
    """
    import pyarrow as pa

    from ootd.config import save_config

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    started = time.perf_counter()
    out = Path(out_dir)
    inputs = list_inputs(source)[:limit]
    if any(item.kind == "url" for item in inputs):
        from ootd.ingest.download import Fetcher, FetchPolicy

        Fetcher(FetchPolicy.from_config(config.data)).close()  # a bad data.allowed_private_networks fails here
    check_crop_settings(out, config)
    done = read_state(out)
    todo = [item for item in inputs if item.source not in done.sources]
    retried = {item.source for item in todo if item.source in done.transient}
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG_FILE)
    (out / DETECTOR_DIGEST_FILE).write_text(_detector_digest(config) + "\n")
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    data = config.data
    limits = {"max_bytes": data.max_image_bytes, "max_pixels": data.max_image_pixels}
    staging = str((out / DOWNLOADS_DIR).resolve())

    hashed = _hash_pass(config, todo, done, out, run_id, staging)
    unique, hash_errors, duplicates = _dedup(hashed.rows, done.ids)
    near = _group_near_dups(unique, out, data.near_dup_threshold)
    hash_seconds = time.perf_counter() - started
    totals = _Totals()
    if hash_errors:
        table = pa.Table.from_pylist(hash_errors, schema=schemas()["errors"])
        totals.add(stats_row(errors_by_stage=Counter(e["stage"] for e in hash_errors),
                             files=[str(write_table(table, out / ERRORS_DIR, run_id))]))  # fmt: skip
    if unique:
        items = [{"image_id": key, "source": row["source"], "style": row["style"], "near_dup_of": near[key],
                  **{c: row[c] for c in _HASH_COLUMNS}} for key, row in unique.items()]  # fmt: skip
        for batch in _crop_pass(config, items, limits, staging, out, run_id):
            for stats in batch.column("stats").to_pylist():
                totals.add(json.loads(stats))
    _supersede_transient(out, run_id, retried)
    shutil.rmtree(out / DOWNLOADS_DIR, ignore_errors=True)  # every URL of this run is now in a table or a dup
    summary = totals.summary(run_id=run_id, source=str(source), out=str(out), inputs=len(inputs),
                             skipped=len(inputs) - len(todo), duplicates=duplicates)  # fmt: skip
    summary["transient_errors"] = sum(1 for e in hash_errors if e["transient"])
    summary["retried"] = len(retried)
    summary["downloads"] = {"fetched": hashed.fetched, "reused": hashed.reused}
    summary["near_duplicates"] = sum(rep is not None for rep in near.values())
    summary["hash_seconds"] = round(hash_seconds, 3)  # wall time of listing + the hash/dedup/grouping pass
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["crops_total"] = count_rows(out / CROPS_DIR)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class _Hashed:
    rows: list[dict[str, Any]] = field(default_factory=list)
    fetched: int = 0  # URLs downloaded by this run
    reused: int = 0  # URLs whose id (and bytes) an earlier run had fetched


def _hash_pass(config: Config, todo: list[Input], done: Done, out: Path, run_id: str, staging: str) -> _Hashed:
    """Pass 1 over paths/URIs (tasks) and URLs (download actors); records each successful download in fetched/."""
    import ray

    data = config.data
    limits = {"max_bytes": data.max_image_bytes, "max_pixels": data.max_image_pixels}
    result = _Hashed()
    local = [{"source": i.source, "style": i.style} for i in todo if i.kind != "url"]
    urls = []
    for item in (i for i in todo if i.kind == "url"):
        record = done.fetched.get(item.source)
        if record and (record["image_id"] in done.ids or _staged(staging, record["image_id"])):
            # Fetched before: its id decides (a duplicate of a finished row, or bytes still staged).
            result.rows.append({**record, "source": item.source, "style": item.style, "stage": None,
                                "error": None, "transient": None})  # fmt: skip
            result.reused += 1
        else:
            urls.append({"source": item.source, "style": item.style})
    if local:
        ds = ray.data.from_items(local, override_num_blocks=_blocks(len(local), data.num_blocks, HASH_ROWS_PER_BLOCK))
        ds = ds.map_batches(hash_batch, fn_kwargs=limits, batch_format="pyarrow")
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            result.rows.extend(batch.to_pylist())
    if urls:
        import pyarrow as pa

        from ootd.ingest.download import FetchPolicy

        actors = data.download_actors
        threads = -(-data.download_concurrency // actors)
        per_batch = threads * FETCH_ROWS_PER_THREAD
        ds = ray.data.from_items(urls, override_num_blocks=_blocks(len(urls), data.num_blocks, per_batch))
        ds = ds.map_batches(FetchHash, batch_format="pyarrow", num_cpus=FETCH_NUM_CPUS, batch_size=per_batch,
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            fn_constructor_kwargs={"policy": FetchPolicy.from_config(data), "threads": threads,
                                                   "per_host": max(1, data.download_per_host // actors),
                                                   "staging": staging, "max_pixels": data.max_image_pixels})
        pending: list[dict[str, Any]] = []
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = batch.to_pylist()
            result.rows.extend(rows)
            result.fetched += len(rows)
            pending += [{c: r[c] for c in ("source", "image_id", *_HASH_COLUMNS)} for r in rows if r["stage"] is None]
            # Recorded as they arrive (a killed run keeps most of what it downloaded), in files of useful size.
            if len(pending) >= FETCHED_ROWS_PER_FILE:
                write_table(pa.Table.from_pylist(pending, schema=_fetched_schema()), out / FETCHED_DIR, run_id)
                pending = []
        if pending:
            write_table(pa.Table.from_pylist(pending, schema=_fetched_schema()), out / FETCHED_DIR, run_id)
    return result


def _fetched_schema() -> Any:
    """fetched/ rows: URL, image id and the perceptual hashes (a reused download needs no second decode)."""
    hashed = schemas()["hashed"]
    return schemas()["fetched"].append(hashed.field("phash")).append(hashed.field("phash_mirror")).append(
        hashed.field("phash_windows"))


def _staged(staging: str, key: str) -> bool:
    from ootd.ingest.stages import staged_path

    return staged_path(staging, key).is_file()


def _dedup(rows: list[dict[str, Any]], done_ids: set[str]) -> tuple[dict[str, dict], list[dict], dict[str, Any]]:
    """Keeps the smallest source of each new id; errors and duplicates aside.

    Returns:
        (id -> kept hash row, error rows, {"count": duplicates, "examples": [[duplicate, kept], ...]}).
    """
    unique: dict[str, dict[str, Any]] = {}
    errors: list[dict] = []
    dropped: list[tuple[str, str]] = []  # (duplicate source, its image id)
    for row in rows:
        key = row["image_id"]
        if row["stage"] is not None:
            errors.append({"source": row["source"], "stage": row["stage"], "error": row["error"],
                           "transient": bool(row["transient"])})  # fmt: skip
        elif key in done_ids:
            dropped.append((row["source"], key))
        elif key in unique:
            # Blocks finish in any order; keeping the smallest source makes the choice deterministic.
            kept, other = sorted([unique[key], row], key=lambda item: item["source"])
            unique[key] = kept
            dropped.append((other["source"], key))
        else:
            unique[key] = row
    examples = sorted([dup, unique[key]["source"] if key in unique else f"earlier run: {key}"] for dup, key in dropped)
    return unique, errors, {"count": len(dropped), "examples": examples[:10]}


def _group_near_dups(unique: dict[str, dict], out: Path, threshold: int) -> dict[str, str | None]:
    """near_dup_of of each new id, against the new hashes and the crops table's (hash columns only)."""
    if not unique:
        return {}
    earlier = read_columns(out / CROPS_DIR, ["image_id", *NEAR_DUP_COLUMNS])
    existing = [
        (key, PHash.from_columns(h, m, w), rep)
        for key, rep, h, m, w in zip(*(earlier[c] for c in ["image_id", *NEAR_DUP_COLUMNS]), strict=True)
        if h is not None and m is not None  # rows written before the hashes existed are not grouped
    ]
    new = [(key, PHash.from_columns(r["phash"], r["phash_mirror"], r["phash_windows"])) for key, r in unique.items()]
    return assign_near_dups(new, threshold, existing)


def _crop_pass(config: Config, items: list[dict], limits: dict[str, int], staging: str, out: Path, run_id: str):
    """Pass 2: decode tasks → detector actors → one writer actor; yields the writer's one-row stats batches."""
    import ray

    data = config.data
    detect = replace(config.detect, device=resolve_device(config.detect.device))  # `auto` decided here
    ds = (
        ray.data.from_items(items, override_num_blocks=_blocks(
            len(items), data.num_blocks, CROP_BATCHES_PER_BLOCK * detect.batch_size))
        .map_batches(decode_batch, fn_kwargs={**limits, "staging": staging}, batch_size=detect.batch_size,
                     batch_format="pyarrow", num_cpus=DECODE_NUM_CPUS)
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
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _supersede_transient(out: Path, run_id: str, retried: set[str]) -> None:
    """Drops earlier runs' transient error rows of sources that now have a newer outcome.

    A source retried by this run has one (crop, error, or it is a duplicate); so has a source that reached the
    crops table or a final error in a run killed before this step. Rewritten files are replaced atomically.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = [f for f in parquet_files(out / ERRORS_DIR) if not f.name.startswith(run_id)]
    stale_candidates = [f for f in files if "transient" in pq.read_schema(f).names]
    if not stale_candidates:
        return
    newer = set(retried) | read_state(out).sources
    for path in stale_candidates:
        table = pq.read_table(path)
        drop = pc.and_(pc.fill_null(table.column("transient"), False),
                       pc.is_in(table.column("source"), value_set=pa.array(sorted(newer), pa.string())))  # fmt: skip
        if not pc.any(drop).as_py():
            continue
        kept = table.filter(pc.invert(drop))
        if kept.num_rows:
            write_file(kept, path)
        else:
            path.unlink()


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
