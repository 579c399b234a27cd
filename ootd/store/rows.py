"""Validation for the Milvus store: names, ids, vectors, rows and filter expressions (pure; no pymilvus)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ootd.decode import check_image_id
from ootd.styles import STYLES

MAX_SOURCE_BYTES = 2048  # the `source` VARCHAR's length: longer sources are refused row by row
MAX_META_BYTES = 65_536  # Milvus' default JSON field limit
MILVUS_MAX_TOP_K = 16_384  # Milvus' topk ceiling (the HTTP API allows far fewer)
ROW_KEYS = frozenset({"id", "embedding", "style", "source", "box", "meta", "created_at"})

_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Hit:
    """One search result: an indexed outfit and its cosine similarity to the query."""

    id: str
    score: float
    style: str
    source: str
    box: tuple[int, int, int, int]
    meta: dict = field(default_factory=dict)


def check_name(name: Any, what: str) -> None:
    """Accepts a collection, alias or version name Milvus allows and an expression cannot be smuggled into.

    Raises:
        ValueError: for anything but letters, digits and underscores (1..200 chars).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 200:
        raise ValueError(f"bad {what} {name!r}: use letters, digits and underscores (at most 200)")


def check_ids(ids: Any) -> list[str]:
    """The ids as a list, each lowercase hex sha256 (the image id contract, safe to quote in an expression).

    Raises:
        ValueError: for a bare string or any id of another form.
    """
    if isinstance(ids, str):
        raise ValueError("ids must be a sequence of ids, not one string")
    out = list(ids)
    for i in out:
        check_image_id(i)
    return out


def check_vector(value: Any, dim: int, what: str) -> np.ndarray:
    """One embedding as float32 (dim,): finite and non-zero (cosine needs a direction).

    Raises:
        ValueError: naming `what` and the problem.
    """
    try:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused just below
            vec = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not a vector of numbers ({exc})") from None
    if vec.shape != (dim,):
        raise ValueError(f"{what}: expected {dim} floats, got shape {vec.shape}")
    if not np.isfinite(vec).all():
        raise ValueError(f"{what}: contains NaN or infinity")
    if not vec.any():
        raise ValueError(f"{what}: all zeros (cosine similarity is undefined)")
    return vec


def check_vectors(vectors: Any, dim: int) -> np.ndarray:
    """Query embeddings as float32 (Q, dim); a single (dim,) vector becomes Q=1, an empty input Q=0.

    Raises:
        ValueError: for another shape or a bad vector.
    """
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"query vectors: not a (Q, {dim}) array of numbers ({exc})") from None
    if arr.ndim == 1 and arr.size:
        arr = arr[None, :]
    if arr.size == 0:
        return arr.reshape(0, dim)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"query vectors: expected shape (Q, {dim}), got {arr.shape}")
    for q, vec in enumerate(arr):
        check_vector(vec, dim, f"query vector {q}")
    return arr


def check_top_k(top_k: Any) -> None:
    """Raises ValueError unless top_k is an integer Milvus accepts (1..16384)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= MILVUS_MAX_TOP_K:
        raise ValueError(f"top_k must be an integer in 1..{MILVUS_MAX_TOP_K}, got {top_k!r}")


def check_row(i: int, row: Any, dim: int, now: int) -> dict:
    """A row ready for Milvus: defaults filled (style "", box zeros, meta {}, created_at `now`), values checked.

    Args:
        i: the row's position, for the error message.
        row: the caller's dict (keys from ROW_KEYS; `id` and `embedding` required).
        dim: the collection's embedding dimension.
        now: unix seconds used when `created_at` is absent.

    Raises:
        ValueError: naming the row and the first problem found.
    """
    fields = check_fields(i, row, now)
    if "embedding" not in row:
        raise ValueError(f"row {i} (id {row.get('id')!r}): missing keys ['embedding']")
    vec = check_vector(row["embedding"], dim, f"row {i} (id {row.get('id')!r}) embedding")
    return {"id": fields["id"], "embedding": vec.tolist(), **{k: v for k, v in fields.items() if k != "id"}}


def check_fields(i: int, row: Any, now: int) -> dict:
    """Every field of a row but its embedding, checked and defaulted as `check_row` does (the index job checks
    rows before it spends an embedding on them).

    Raises:
        ValueError: naming the row and the first problem found.
    """
    if not isinstance(row, dict):
        raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")
    where = f"row {i} (id {row.get('id')!r})"
    unknown = set(row) - ROW_KEYS
    if unknown or "id" not in row:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} / missing keys {sorted({'id'} - set(row))}")
    check_ids([row["id"]])
    style = row.get("style") or ""
    if style and style not in STYLES:
        raise ValueError(f"{where}: unknown style {style!r} (known: {', '.join(STYLES)}, or '' if unlabeled)")
    source = row.get("source") or ""
    if not isinstance(source, str) or len(source.encode()) > MAX_SOURCE_BYTES:
        raise ValueError(f"{where}: source must be a string of at most {MAX_SOURCE_BYTES} bytes")
    box = row.get("box", (0, 0, 0, 0))
    try:
        ok = len(box) == 4 and all(float(v) == int(v) for v in box)
    except (TypeError, ValueError, OverflowError):
        ok = False
    box = [int(v) for v in box] if ok else box
    if not ok or min(box) < 0 or box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{where}: box must be 4 non-negative ints x1,y1,x2,y2 with x2>=x1, y2>=y1, got {box!r}")
    meta = row.get("meta") or {}
    try:
        size = len(json.dumps(meta, allow_nan=False).encode()) if isinstance(meta, dict) else -1
    except (TypeError, ValueError):
        size = -1
    if not 0 <= size <= MAX_META_BYTES:
        raise ValueError(f"{where}: meta must be a JSON-serialisable dict of at most {MAX_META_BYTES} bytes")
    created = row.get("created_at", now)
    if isinstance(created, bool) or not isinstance(created, (int, np.integer)) or created < 0:
        raise ValueError(f"{where}: created_at must be non-negative unix seconds, got {created!r}")
    return {"id": row["id"], "style": style, "source": source, "box": box, "created_at": int(created), "meta": meta}


def filter_expr(styles: Sequence[str] | None, exclude_ids: Sequence[str] | None) -> str:
    """A Milvus boolean expression built only from validated names and ids (never caller text).

    Args:
        styles: keep only these STYLES names; None or empty keeps all.
        exclude_ids: sha256 ids to leave out.

    Raises:
        ValueError: for an unknown style or a malformed id.
    """
    parts = []
    if styles:
        if isinstance(styles, str):
            raise ValueError("styles must be a sequence of style names, not one string")
        bad = [s for s in styles if s not in STYLES]
        if bad:
            raise ValueError(f"unknown style {bad[0]!r} (known: {', '.join(STYLES)})")
        parts.append(f"style in {json.dumps(sorted(set(styles)))}")
    if exclude_ids:
        parts.append(f"id not in {json.dumps(sorted(set(check_ids(exclude_ids))))}")
    return " and ".join(parts)
