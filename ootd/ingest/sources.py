"""What ingest reads: the inputs of a style folder or a manifest (local or a filesystem URI), and reading one input.

An input is a local path, a filesystem URI (`file://`, `s3://`, `gs://`, ... read through pyarrow.fs) or an
http(s) URL (downloaded by `ootd.ingest.download`). Nothing is opened while listing, except the manifest itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ootd.decode import IMAGE_EXTENSIONS, read_file
from ootd.ingest.download import is_uri, is_url, read_uri

Kind = Literal["path", "uri", "url"]
MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class Input:
    """One listed input: where the photo is, its style label (None when unlabeled) and how it is read."""

    source: str
    style: str | None
    kind: Kind = "path"


def kind_of(source: str) -> Kind:
    """How a source string is read: `url` (http/https), `uri` (pyarrow.fs / fsspec) or `path` (local)."""
    return "url" if is_url(source) else "uri" if is_uri(source) else "path"


def read_source(source: str, max_bytes: int) -> bytes:
    """The bytes of a local path or filesystem URI (URLs are downloaded by `ootd.ingest.download.Fetcher`).

    Raises:
        InputError: stage `read` for a missing, unreadable or oversized file.
    """
    return read_uri(source, max_bytes) if is_uri(source) else read_file(source, max_bytes)


def list_inputs(source: str | Path) -> list[Input]:
    """Lists the photos of a style folder or a manifest, sorted by source (nothing but a manifest is opened).

    A folder holds one sub-folder per style (the sub-folder name is the style; files directly in the folder are
    unlabeled); files are picked by image extension, case-insensitively, hidden files and folders skipped. A
    manifest is a .csv, .parquet or JSON-lines (.jsonl/.ndjson) file with a `path` and/or a `url` column and an
    optional `style` column; a row uses its `url` when set, else its `path`. Relative paths resolve against the
    manifest's folder; paths may also be filesystem URIs. The folder or manifest itself may be a local path or a
    filesystem URI (`file:///data/photos`, `s3://bucket/manifest.csv`).

    Args:
        source: a folder or a manifest file.

    Raises:
        FileNotFoundError: when the source does not exist.
        ValueError: for an unsupported source, a manifest without `path` or `url`, or no inputs at all.
    """
    text = str(source)
    if is_uri(text):
        return _sorted_or_fail(*_list_uri(text))
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"ingest source not found: {source}")
    if root.is_dir():
        return _sorted_or_fail(_list_folder(root), f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under "
                                                   f"{root}")  # fmt: skip
    if root.suffix.lower() in MANIFEST_SUFFIXES:
        return _sorted_or_fail(_read_manifest(str(root), str(root.parent)), f"manifest {root} has no rows")
    raise ValueError(f"ingest source must be a folder or a .csv/.parquet/.jsonl manifest, got {source}")


def _sorted_or_fail(inputs: list[Input], empty: str) -> list[Input]:
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


def _list_uri(uri: str) -> tuple[list[Input], str]:
    """Inputs of a folder or manifest named by a filesystem URI, and the message for "none found"."""
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot open ingest source {uri}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"ingest source not found: {uri}")
    prefix = uri.split("://", 1)[0] + "://"
    if info.type == pafs.FileType.File:
        if not path.lower().endswith(MANIFEST_SUFFIXES):
            raise ValueError(f"ingest source must be a folder or a .csv/.parquet/.jsonl manifest, got {uri}")
        folder = uri.rsplit("/", 1)[0]
        return _read_manifest(uri, folder), f"manifest {uri} has no rows"
    inputs = []
    root = path.rstrip("/")
    for item in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = item.path[len(root):].lstrip("/").split("/")
        hidden = any(part.startswith(".") for part in rel)
        if item.type != pafs.FileType.File or hidden or Path(rel[-1]).suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        style = rel[0] if len(rel) > 1 else None
        # file:// URIs keep their triple slash: from_uri gives "/abs/path", the scheme prefix adds "file://".
        inputs.append(Input(prefix + item.path, style, "uri"))
    return inputs, f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {uri}"


def _read_table(manifest: str):
    """The manifest as an Arrow table (csv, parquet or JSON lines), local or through pyarrow.fs."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    suffix = Path(manifest.split("?", 1)[0]).suffix.lower()
    try:
        if is_uri(manifest):
            filesystem, path = pafs.FileSystem.from_uri(manifest)
            if suffix == ".parquet":
                return pq.read_table(path, filesystem=filesystem)
            opened = filesystem.open_input_stream(path)
        else:
            if suffix == ".parquet":
                return pq.read_table(manifest)
            opened = open(manifest, "rb")  # noqa: SIM115 - closed by the with below
        with opened as fh:
            return pacsv.read_csv(fh) if suffix == ".csv" else pajson.read_json(fh)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for unreadable manifests
        raise ValueError(f"cannot read manifest {manifest}: {exc}") from exc


def _read_manifest(manifest: str, folder: str) -> list[Input]:
    """Inputs of a manifest; `folder` (a local path or URI) is where its relative paths resolve."""
    table = _read_table(manifest)
    columns = table.column_names
    if "path" not in columns and "url" not in columns:
        raise ValueError(f"manifest {manifest} needs a `path` or `url` column, has {columns}")
    n = table.num_rows
    paths = table.column("path").to_pylist() if "path" in columns else [None] * n
    urls = table.column("url").to_pylist() if "url" in columns else [None] * n
    styles = table.column("style").to_pylist() if "style" in columns else [None] * n
    inputs = []
    for row, (item, url, style) in enumerate(zip(paths, urls, styles, strict=True)):
        style = None if _blank(style) else str(style)
        if not _blank(url):
            # Whatever the value looks like, it came as a URL: the download stage judges it (malformed, ftp:, ...).
            inputs.append(Input(str(url).strip(), style, "url"))
        elif _blank(item):
            # Kept as an input so it lands in the errors table under its row number instead of vanishing.
            inputs.append(Input(f"{manifest}#row={row}", style))
        else:
            inputs.append(_resolve(str(item).strip(), folder, style))
    return inputs


def _resolve(item: str, folder: str, style: str | None) -> Input:
    kind = kind_of(item)
    if kind != "path":
        return Input(item, style, kind)
    if is_uri(folder):
        scheme = folder.split("://", 1)[0]
        if not item.startswith("/"):
            return Input(f"{folder.rstrip('/')}/{item}", style, "uri")
        # An absolute path in a URI manifest stays on the manifest's filesystem.
        return Input(f"file://{item}" if scheme == "file" else f"{scheme}://{item.lstrip('/')}", style, "uri")
    full = Path(item).expanduser()
    return Input(os.path.abspath(full if full.is_absolute() else Path(folder) / full), style)


def _blank(value: object) -> bool:
    return value is None or str(value).strip() == ""
