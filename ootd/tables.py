"""The crops and errors tables (DESIGN §4): schemas, atomic writes, listing and reading, all in one place."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# Sub-folders of an ingest output folder.
CROPS_DIR, ERRORS_DIR = "crops", "errors"
TIMING = ("t_decode", "t_detect", "t_crop")  # per-row busy seconds, summed by the ingest writer into its summary
CROP_COLUMNS = ["image_id", "source", "style", "width", "height", "box", "det_score", "n_garments", "fallback", "crop"]
# Near-duplicate columns ingest adds to each crops row (nullable; absent from files written before them):
# `near_dup_of` is the group representative's image id (null for a representative), the rest its pHashes (hex).
NEAR_DUP_COLUMNS = ["near_dup_of", "phash", "phash_mirror", "phash_windows"]
FETCHED_DIR = "fetched"  # URL -> image id of every download that passed the hash pass (see ootd.ingest.pipeline)


def schemas() -> dict[str, pa.Schema]:
    """Arrow schemas of each ingest stage's output and of the two tables.

    Explicit schemas keep every block identical even when a batch is all errors (an inferred all-null column
    would otherwise get Arrow's null type and clash with the next block).
    """
    import pyarrow as pa

    key = [("image_id", pa.string()), ("source", pa.string()), ("style", pa.string())]
    error = [("stage", pa.string()), ("error", pa.string())]
    size = [("width", pa.int32()), ("height", pa.int32())]
    crop = [("box", pa.list_(pa.int32())), ("det_score", pa.float32()), ("n_garments", pa.int32()),
            ("fallback", pa.bool_()), ("crop", pa.binary())]  # fmt: skip
    timing = [(name, pa.float64()) for name in TIMING]
    hashes = [("phash", pa.string()), ("phash_mirror", pa.string()), ("phash_windows", pa.list_(pa.string()))]
    near_dup = [("near_dup_of", pa.string())] + hashes
    # `transient`: a download failure that a later run retries (null in files written before the column).
    failure = error + [("transient", pa.bool_())]
    return {
        "hashed": pa.schema(key + hashes + failure),
        # large_binary: a batch of full-size photos can pass 2 GiB of pixels, binary's offset limit.
        "decoded": pa.schema(key + size + [("pixels", pa.large_binary())] + near_dup + failure + timing[:1]),
        "cropped": pa.schema(key + size + crop + near_dup + failure + timing),
        # The columns every reader relies on (CROP_COLUMNS); ingest writes `crops_written`, which adds
        # NEAR_DUP_COLUMNS. Files of either shape are one table: readers select columns or unify schemas.
        "crops": pa.schema(key + size + crop),
        "crops_written": pa.schema(key + size + crop + near_dup),
        "errors": pa.schema([("source", pa.string())] + failure),
        "fetched": pa.schema([("source", pa.string()), ("image_id", pa.string())]),
        # The index job's errors also name the crop they belong to.
        "index_errors": pa.schema([("source", pa.string())] + error + [("image_id", pa.string())]),
    }


def write_table(table: pa.Table, folder: str | Path, prefix: str) -> Path:
    """Writes one parquet file atomically into `folder` under `<prefix>-<random>.parquet`.

    Readers list only visible `*.parquet` names, so a file killed mid-write (left as `.<name>.tmp`) is never read.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_file(table, folder / f"{prefix}-{uuid.uuid4().hex[:12]}.parquet")


def write_file(table: pa.Table, path: str | Path) -> Path:
    """Writes `table` to exactly `path`, atomically (a hidden temporary name, then a rename)."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_rows(rows: list[dict[str, Any]], path: str | Path, schema: str) -> Path:
    """Writes dict rows with one of `schemas()` to exactly `path`, atomically."""
    import pyarrow as pa

    return write_file(pa.Table.from_pylist(rows, schema=schemas()[schema]), path)


def parquet_files(folder: str | Path) -> list[Path]:
    """The finished parquet files under `folder`, sorted (hidden temporary files are skipped); [] when absent."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.rglob("*.parquet")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip


def crops_files(crops_dir: str | Path) -> list[Path]:
    """The parquet files of a crops table.

    Raises:
        FileNotFoundError: when the folder is missing or holds no parquet file.
    """
    found = parquet_files(crops_dir)
    if not found:
        root = Path(crops_dir).expanduser()
        raise FileNotFoundError(f"no crops table at {root}: expected *.parquet files written by `ootd ingest`")
    return found


def crops_snapshot(crops_dir: str | Path) -> list[tuple[str, int]]:
    """(relative path, size) of every parquet file of the crops table: ingest only ever adds files.

    Raises:
        FileNotFoundError: when the folder holds no parquet files.
    """
    root = Path(crops_dir).expanduser()
    return [(str(p.relative_to(root)), p.stat().st_size) for p in crops_files(root)]


def count_rows(folder: str | Path) -> int:
    """Rows in every parquet file under `folder`, from the files' footers (no data is read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(folder))


def read_columns(folder: str | Path, columns: list[str]) -> dict[str, list]:
    """Only `columns` of every parquet file under `folder`, as Python lists ({} of empty lists when there are none).

    Files written before a column existed read as nulls in it (the files' schemas are unified from their footers).
    """
    return read_files_columns(parquet_files(folder), columns)


def read_files_columns(paths: list[str | Path], columns: list[str]) -> dict[str, list]:
    """`read_columns` over the given parquet files."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    files = [str(f) for f in paths]
    if not files:
        return {c: [] for c in columns}
    schema = pa.unify_schemas([pq.read_schema(f) for f in files])
    present = [c for c in columns if c in schema.names]
    table = pads.dataset(files, format="parquet", schema=schema).to_table(columns=present)
    return {c: table.column(c).to_pylist() if c in present else [None] * table.num_rows for c in columns}
