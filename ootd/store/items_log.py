"""The items log: an append-only, fsync'd record of every API write, the source of truth for them (DESIGN §4).

Each writer process appends to its own segment file (`<start ns>-<pid>-<random>.jsonl`), so several Index replicas
(against a Milvus server) never interleave bytes in one file. A record is one line `<crc32 hex> <json>\\n`: a
record torn by a kill mid-write (no newline, or a checksum that does not match) is skipped on read, and because a
restarted writer opens a new segment nothing is ever appended after a torn tail.

Records carry the crops-table row contract (`image_id`, `source`, `style`, `width`, `height`, `box`, `det_score`,
`n_garments`, `fallback`, `crop`) plus `op` (`upsert` | `delete`) and `seq`; upserts also keep what serving
needs to restore the Milvus row without an encoder (`embedding`, `model_version`, `meta`, `created_at`).
`seq` is a per-writer monotonic nanosecond clock: exact order within a writer, wall-clock order across writers.

A writer holds an exclusive `flock` on its open segment. `compact` merges the segments no live writer holds (dead
replicas', closed ones, earlier compactions) into one, keeping the latest record per id (tombstones included: a
deleted crops-table item must stay deleted), so the log grows with the number of API items, not of API writes.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ootd.decode import check_image_id
from ootd.store.durable import fsync_dir, write_atomically

if TYPE_CHECKING:
    from ootd.config import Config

log = logging.getLogger(__name__)

OPS = ("upsert", "delete")
SEGMENT_SUFFIX = ".jsonl"
COMPACT_LOCK = ".compact.lock"  # hidden: never listed as a segment
# The crops-table columns a logged upsert carries (tables.CROP_COLUMNS), so `ootd index` can re-embed it.
CROP_FIELDS = ("image_id", "source", "style", "width", "height", "box", "det_score", "n_garments", "fallback", "crop")


def items_log_dir(config: Config) -> Path:
    """Where the items log lives: `store.items_log`, or `<data.workdir>/items_log` when that is empty."""
    chosen = config.store.items_log or str(Path(config.data.workdir) / "items_log")
    return Path(chosen).expanduser().absolute()


def upsert_entry(row: dict[str, Any], crop: bytes, model_version: str) -> dict[str, Any]:
    """A log record for an API upsert of a Milvus row (`id`, `embedding`, `style`, `source`, `box`, `meta`).

    The detection facts of the crops-table contract come from `meta["outfit"]` (the serving pipeline puts them
    there); absent ones get the crops table's neutral values.
    """
    outfit = (row.get("meta") or {}).get("outfit") or {}
    return {
        "op": "upsert", "image_id": row["id"], "source": row.get("source") or "", "style": row.get("style") or "",
        "width": int(outfit.get("width", 0)), "height": int(outfit.get("height", 0)),
        "box": [int(v) for v in row.get("box", (0, 0, 0, 0))], "det_score": float(outfit.get("det_score", 0.0)),
        "n_garments": int(outfit.get("n_garments", 0)), "fallback": bool(outfit.get("fallback", False)),
        "crop": bytes(crop), "meta": row.get("meta") or {}, "model_version": model_version,
        "embedding": [float(v) for v in row["embedding"]], "created_at": int(row.get("created_at") or time.time()),
    }  # fmt: skip


def delete_entry(image_id: str) -> dict[str, Any]:
    """A log record (a tombstone) for an API delete."""
    return {"op": "delete", "image_id": image_id}


def milvus_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The Milvus row an upsert record restores (its logged vector, in its logged model's collection)."""
    return {"id": entry["image_id"], "embedding": entry["embedding"], "style": entry["style"],
            "source": entry["source"], "box": entry["box"], "meta": entry["meta"], "created_at": entry["created_at"]}


class ItemsLog:
    """Appends records durably (one write and one fsync per `append`) and reads them back, latest op per id."""

    def __init__(self, root: str | os.PathLike):
        """Opens (creating) the log folder; this process's segment is created on its first append.

        Args:
            root: the log folder (`items_log_dir(config)`).
        """
        self.root = Path(root).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._segment: Path | None = None
        self._last_seq = 0

    def append(self, entries: Iterable[dict[str, Any]]) -> list[int]:
        """Writes the records in order and fsyncs them; returns their sequence numbers.

        When this returns, the records survive a kill of this process and a power loss.

        Raises:
            ValueError: for a record with an unknown op or a bad id (nothing is written then).
        """
        lines, seqs = [], []
        with self._lock:
            for entry in entries:
                if entry.get("op") not in OPS:
                    raise ValueError(f"items log: op must be one of {OPS}, got {entry.get('op')!r}")
                check_image_id(entry.get("image_id"))
                self._last_seq = max(self._last_seq + 1, time.time_ns())
                seqs.append(self._last_seq)
                lines.append(_encode({**entry, "seq": self._last_seq}))
            if not lines:
                return []
            fd = self._open()
            data = b"".join(lines)
            written = 0
            while written < len(data):  # os.write may write less than asked
                written += os.write(fd, data[written:])
            os.fsync(fd)
        return seqs

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every intact record of every segment, in `seq` order (crop bytes decoded)."""
        records: dict[tuple[int, str], dict[str, Any]] = {}
        for path in self.segments():
            for record in _read_segment(path):
                # A compaction killed between its rename and its unlinks leaves a record in two segments.
                records[(record["seq"], record["image_id"])] = record
        ordered = [records[key] for key in sorted(records, key=lambda k: k[0])]
        if ordered:
            with self._lock:
                # A restarted writer's clock may lag its predecessor's: never hand out a seq that sorts earlier.
                self._last_seq = max(self._last_seq, ordered[-1]["seq"])
        yield from ordered

    def latest(self) -> dict[str, dict[str, Any]]:
        """The latest record per image id (later `seq` wins): what the API last did to each id."""
        return {r["image_id"]: r for r in self.entries()}

    def segments(self) -> list[Path]:
        """The segment files, oldest writer first."""
        return sorted(p for p in self.root.glob(f"*{SEGMENT_SUFFIX}") if p.is_file() and not p.name.startswith("."))

    def close(self) -> None:
        """Closes this process's segment (appends reopen a new one)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def compact(self) -> dict[str, int]:
        """Merges the segments no live writer holds into one, keeping only the latest record per id.

        Safe beside running writers (their segments are skipped) and beside another compaction (it returns at
        once). Crash-safe: the merged segment is durable before the old ones are removed, and a record found in
        both is read once.

        Returns:
            `segments` merged, `records` read from them and `kept`.
        """
        stats = {"segments": 0, "records": 0, "kept": 0}
        with open(self.root / COMPACT_LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return stats  # another process is compacting
            sealed = [p for p in self.segments() if not _held_by_writer(p)]
            if len(sealed) < 2 and not _has_superseded(sealed):
                return stats
            latest: dict[str, dict[str, Any]] = {}
            for path in sealed:
                for record in _read_segment(path):
                    stats["records"] += 1
                    if record["image_id"] not in latest or latest[record["image_id"]]["seq"] < record["seq"]:
                        latest[record["image_id"]] = record
            kept = sorted(latest.values(), key=lambda r: r["seq"])
            # Named to sort first, as the oldest writer: segments() order is only cosmetic (entries sort by seq).
            name = f"{min(p.name for p in sealed).split('-', 1)[0]}-compacted-{uuid.uuid4().hex[:8]}{SEGMENT_SUFFIX}"
            write_atomically(self.root / name, b"".join(_encode(r) for r in kept))
            for path in sealed:
                path.unlink(missing_ok=True)
            fsync_dir(self.root)
        stats.update(segments=len(sealed), kept=len(kept))
        log.info("items log compacted: %d segments, %d records → 1 segment, %d records", len(sealed),
                 stats["records"], len(kept))
        return stats

    def __enter__(self) -> ItemsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> int:
        if self._fd is None:
            name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SEGMENT_SUFFIX}"
            self._segment = self.root / name
            self._fd = os.open(self._segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            # Held until close or death (the kernel drops it then): compaction leaves a held segment alone.
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            fsync_dir(self.root)  # the new name itself must survive a power loss
        return self._fd


def _encode(entry: dict[str, Any]) -> bytes:
    record = dict(entry)
    if "crop" in record:
        record["crop"] = base64.b64encode(record["crop"]).decode("ascii")
    body = json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _read_segment(path: Path) -> list[dict[str, Any]]:
    """The intact records of one segment; a torn or corrupt line is skipped (and logged), the rest kept."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1]:
        log.warning("items log %s: ignoring a torn last record (%d bytes, no newline)", path.name, len(lines[-1]))
    out = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            crc, body = line.split(b" ", 1)
            if int(crc, 16) != zlib.crc32(body):
                raise ValueError("checksum mismatch")
            record = json.loads(body)
            if "crop" in record:
                record["crop"] = base64.b64decode(record["crop"])
        except ValueError as exc:
            log.warning("items log %s line %d: skipping a corrupt record (%s)", path.name, number, exc)
            continue
        out.append(record)
    return out



def _held_by_writer(path: Path) -> bool:
    """Whether a live writer (this process included) still appends to `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # gone under us: not ours to merge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def _has_superseded(segments: list[Path]) -> bool:
    """Whether one segment holds more than one record for an id (worth rewriting alone)."""
    for path in segments:
        ids = [r["image_id"] for r in _read_segment(path)]
        if len(ids) != len(set(ids)):
            return True
    return False
