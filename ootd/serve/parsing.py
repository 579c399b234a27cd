"""Request parsing for the HTTP API: size-capped bodies, content types, multipart forms, uploads, JSON, vectors."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError

from ootd.store.rows import MAX_META_BYTES, MAX_SOURCE_BYTES
from ootd.styles import STYLES

FORM_OVERHEAD = 64 << 10  # multipart boundaries and text fields beside the image
IMAGE_TYPES = ("image/", "application/octet-stream")
MAX_IDS = 1000  # ids in one exclude list / recommend request: keeps the Milvus filter expression bounded
MAX_TOP_K = 100  # results per search over HTTP (a page a client shows), far below Milvus' own ceiling
MAX_JSON_DEPTH = 32  # the request models nest 2 levels deep
FLOAT32_MAX = 3.4028234663852886e38
# `source` in characters: at most 4 UTF-8 bytes each, so any source this long fits the column's byte limit, and the
# OpenAPI maxLength (characters) says exactly what is accepted.
MAX_SOURCE_CHARS = MAX_SOURCE_BYTES // 4


DECODE_MAX_SIDE = 2048  # long side the serve path decodes at: ample for the detector (320 px) and crops (512 px)


def check_upload(data: bytes, max_pixels: int) -> None:
    """Identifies uploaded bytes as an image of an allowed format from its header, without decoding the pixels.

    Cheap enough for the single ingress: the full decode (`ootd.decode.decode_bounded`) runs once, in the
    Encoder, and a file that is truncated past its header comes back from there as a 422 too. The pixel limit
    applies to what the Encoder will decode: a large JPEG is decoded reduced (up to 8x), so it may pass.

    Raises:
        HTTPException: 422 for empty bytes or a non-image, 415 for a format outside `SERVE_FORMATS`, 413 for
            more pixels than `max_pixels`.
    """
    from ootd.decode import InputError, TooManyPixels, UnsupportedFormat, decoded_size

    if not data:
        raise HTTPException(422, "the image is empty (0 bytes)")
    try:
        header, (width, height) = decoded_size(data, DECODE_MAX_SIDE)  # a pixel bomb is "too large", not "bad"
    except UnsupportedFormat as exc:
        raise HTTPException(415, f"unsupported image format: {exc}") from None
    except TooManyPixels as exc:  # beyond what PIL even opens
        raise HTTPException(413, f"image is too large: {exc}") from None
    except InputError as exc:
        raise HTTPException(422, f"could not decode the upload as an image: {exc}") from None
    if width * height > max_pixels:
        reduced = f" (decoded at {width}x{height})" if width != header.width else ""
        raise HTTPException(413, f"image is {header.width}x{header.height}{reduced} = {width * height:,} "
                                 f"pixels; the limit is {max_pixels:,} (serve.max_image_pixels)")


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ("" when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body; 413 as soon as it passes `limit` bytes (declared or streamed), 400 when empty."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, f"bad content-length header {declared!r}")
        if int(declared) > limit:
            raise HTTPException(413, f"{what} is {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"{what} is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise HTTPException(400, "the request body is empty")
    return body


async def read_form(request: Request, max_image_bytes: int) -> Any:
    """Parses a size-capped multipart body; 415 when the request is not multipart/form-data."""
    if media_type(request) != "multipart/form-data":
        raise HTTPException(415, f"expected multipart/form-data with an `image` file, got "
                                 f"{media_type(request) or 'no content type'}")
    body = await read_body(request, max_image_bytes + FORM_OVERHEAD, "the upload")
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        # A fresh Request over the capped bytes: starlette's parser never reads past what we allowed.
        return await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except HTTPException as exc:
        raise HTTPException(400, f"malformed multipart/form-data body: {exc.detail}") from None
    except Exception as exc:  # starlette raises MultiPartException and others for malformed forms
        raise HTTPException(400, f"malformed multipart/form-data body: {exc}") from None


async def image_from(form: Any, max_image_bytes: int, max_pixels: int) -> bytes:
    """The bytes of the form's `image` file, checked for type, size and decodability.

    Raises:
        HTTPException: 422 missing part or not an image, 415 non-image part type or format, 413 too large.
    """
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise HTTPException(422, "missing form field `image` (a file part with the photo)")
    ctype = (upload.content_type or "").lower()
    if ctype and not ctype.startswith(IMAGE_TYPES):
        raise HTTPException(415, f"the `image` part has content type {ctype}; send image/jpeg, image/png, ...")
    data = await upload.read()
    if len(data) > max_image_bytes:
        raise HTTPException(413, f"image is {len(data):,} bytes; the limit is {max_image_bytes:,}")
    check_upload(data, max_pixels)
    return data


async def read_json(request: Request, limit: int) -> Any:
    """The parsed JSON body; 415 for another content type, 422 for malformed JSON."""
    if media_type(request) != "application/json":
        raise HTTPException(415, f"expected application/json, got {media_type(request) or 'no content type'}")
    body = await read_body(request, limit, "the JSON body")
    try:
        payload = json.loads(body, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(422, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise HTTPException(422, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    if json_depth(payload) > MAX_JSON_DEPTH:
        # Parsed, but validating or echoing it would recurse as deep: refuse it as input, not a server error.
        raise HTTPException(422, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return payload


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), measured without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return depth


def validate(model: type[BaseModel], payload: Any) -> Any:
    """The payload as `model`; 422 listing each problem (without echoing the input, which may be huge)."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise HTTPException(422, errors) from None


def form_list(form: Any, key: str, pattern: str | None = None) -> list[str] | None:
    """A list field sent as repeated form fields and/or comma-separated values.

    Args:
        form: the parsed form.
        key: the field.
        pattern: each raw value must match it (the field's OpenAPI pattern), else 422: what the schema calls
            invalid is refused, not half-read.
    """
    raws = [raw for raw in form.getlist(key) if isinstance(raw, str)]
    if pattern is not None:
        for raw in raws:
            if not re.fullmatch(pattern, raw):
                raise HTTPException(422, f"`{key}` must be comma-separated values without spaces, matching "
                                         f"{pattern[:80]}{'...' if len(pattern) > 80 else ''}")
    values = [v.strip() for raw in raws for v in raw.split(",")]
    return [v for v in values if v] or None


def form_item_fields(form: Any) -> tuple[str, str, dict[str, Any]]:
    """(style, source, meta) of an item upload; 422 for an unknown style, long source or bad meta JSON."""
    style = form.get("style") or ""
    if not isinstance(style, str) or (style and style not in STYLES):
        raise HTTPException(422, f"unknown style {style!r}; known: {', '.join(STYLES)} (or leave it empty)")
    source = form.get("source") or ""
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS:
        raise HTTPException(422, f"`source` must be text of at most {MAX_SOURCE_CHARS} characters")
    raw_meta = form.get("meta") or "{}"
    if not isinstance(raw_meta, str) or len(raw_meta.encode()) > MAX_META_BYTES // 2:
        # Half the field limit: the server adds the outfit box and model version beside it.
        raise HTTPException(422, f"`meta` must be a JSON object of at most {MAX_META_BYTES // 2} bytes")
    try:
        meta = json.loads(raw_meta, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise HTTPException(422, f"`meta` is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise HTTPException(422, f"`meta` must be a JSON object, got {type(meta).__name__}")
    return style, source, meta


def unit_vector(vector: list[float], dim: int) -> list[float]:
    """The query vector L2-normalised; 422 for a wrong length, a zero vector or values outside float32.

    Scaled by its largest component before squaring, so a vector whose squared norm would overflow (or
    underflow) still gets its direction; embeddings are float32, so larger components are refused.
    """
    if len(vector) != dim:
        raise HTTPException(422, f"`vector` must have {dim} numbers (the model's embedding dim), got {len(vector)}")
    largest = max((abs(v) for v in vector), default=0.0)
    if not math.isfinite(largest) or largest > FLOAT32_MAX:
        raise HTTPException(422, f"`vector` has a component outside the float32 range (|v| <= {FLOAT32_MAX:.4g})")
    if largest == 0.0:
        raise HTTPException(422, "`vector` is all zeros: cosine similarity is undefined")
    scaled = [v / largest for v in vector]
    norm = math.sqrt(sum(v * v for v in scaled))
    return [v / norm for v in scaled]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
