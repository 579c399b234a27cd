"""Durable local file writes: bytes fsync'd before their name, names fsync'd in their directory.

Used by the stores whose writes are acknowledged to a client (media crops, the items log's compacted segments):
after these return, the file survives a kill of the process and a power loss.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: bytes, *, sync: bool = True) -> None:
    """Writes `data` to exactly `path` through a hidden temporary name and a rename.

    Readers see the old file or the new one, never a part. With `sync` the bytes are fsync'd before the rename and
    the directory after it, so the file survives a power loss; without, a bulk writer that can redo its work (the
    index job) skips two fsyncs per file.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic on POSIX
        if sync:
            fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes a directory's entries (a new, renamed or removed file) durable; a no-op where the filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every filesystem supports fsync on a directory
        pass
    finally:
        os.close(fd)
