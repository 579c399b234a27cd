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
    return {
        "hashed": pa.schema(key + error),
        # large_binary: a batch of full-size photos can pass 2 GiB of pixels, binary's offset limit.
        "decoded": pa.schema(key + size + [("pixels", pa.large_binary())] + error + timing[:1]),
        "cropped": pa.schema(key + size + crop + error + timing),
        "crops": pa.schema(key + size + crop),
        "errors": pa.schema([("source", pa.string())] + error),
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
    """Only `columns` of every parquet file under `folder`, as Python lists ({} of empty lists when there are none)."""
    import pyarrow.dataset as pads

    files = parquet_files(folder)
    if not files:
        return {c: [] for c in columns}
    return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=columns).to_pydict()
