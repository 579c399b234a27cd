"""HTTP API of the Serve app: FastAPI routes, request limits and parsing, pydantic request/response models."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ootd.decode import IMAGE_ID_PATTERN
from ootd.serve import metrics
from ootd.serve.backend import Backend, Unavailable
from ootd.serve.contract import (
    IDS_FIELD,
    IMAGE_FORM,
    ITEM_FORM,
    SEARCH_FORM,
    STYLES_FIELD,
    ReadyState,
    error_responses,
    install,
    openapi_body,
)
from ootd.serve.parsing import (
    FLOAT32_MAX,
    MAX_IDS,
    MAX_TOP_K,
    form_item_fields,
    form_list,
    image_from,
    media_type,
    read_form,
    read_json,
    unit_vector,
    validate,
)
from ootd.store.rows import Hit
from ootd.styles import STYLES

STATIC_DIR = Path(__file__).parent / "static"
MAX_JSON_BYTES = 1 << 20
RETRY_AFTER = "1"  # seconds a client should wait after a 503 (a replica restarting, no live collection yet)

Sha256 = Annotated[str, Field(pattern=IMAGE_ID_PATTERN, description="lowercase hex sha256 of the image bytes")]
StyleName = Literal[STYLES]  # type: ignore[valid-type]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K, description="number of results")]


# -- models -----------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchFilters(_Strict):
    """What every search accepts besides its query."""

    top_k: TopK = 10
    styles: list[StyleName] | None = Field(None, description="keep only these styles")
    exclude_ids: list[Sha256] | None = Field(None, max_length=MAX_IDS, description="ids never returned")
    collapse_near_duplicates: bool = Field(True, description="one result per near-duplicate group (reposts, "
                                           "resizes), where the index keeps every member")


class SearchRequest(SearchFilters):
    """JSON search: by an indexed item's id (the item itself is excluded) or by a raw embedding."""

    id: Sha256 | None = None
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] | None = None

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.id is None) == (self.vector is None):
            raise ValueError("give exactly one of `id` or `vector` (or POST multipart/form-data with an `image`)")
        return self


class RecommendRequest(_Strict):
    """Outfits like the liked ones and unlike the disliked ones."""

    liked: list[Sha256] = Field(min_length=1, max_length=MAX_IDS)
    disliked: list[Sha256] = Field(default_factory=list, max_length=MAX_IDS)
    top_k: TopK = 10
    styles: list[StyleName] | None = None
    dislike_weight: float = Field(0.5, ge=0.0, le=1.0, description="weight of the disliked mean")

    @model_validator(mode="after")
    def _rated_fit_the_exclusions(self) -> RecommendRequest:
        # Every rated id is excluded from the answer, and a search takes at most MAX_IDS exclusions.
        if len(set(self.liked) | set(self.disliked)) > MAX_IDS:
            raise ValueError(f"at most {MAX_IDS} distinct liked and disliked ids together")
        return self


class Outfit(BaseModel):
    """Where the outfit was found in an uploaded photo."""

    box: list[int] = Field(description="x1, y1, x2, y2 in source pixels")
    det_score: float
    n_garments: int
    fallback: bool = Field(description="no garment detected: the whole photo was embedded")
    width: int
    height: int


class EmbedResponse(BaseModel):
    """The style embedding of an uploaded photo."""

    embedding: list[float]
    dim: int
    model_version: str
    outfit: Outfit


class SearchResponse(BaseModel):
    """Search results, best first."""

    results: list[Hit]
    model_version: str
    query: dict[str, Any]


class ItemResponse(BaseModel):
    """An indexed outfit."""

    id: str
    style: str
    source: str
    box: list[int]
    meta: dict[str, Any]
    created_at: int
    embedding: list[float] | None = None


class WriteResponse(BaseModel):
    """An acknowledged write: it is durable and visible to every later read."""

    id: str
    model_version: str | None = None
    style: str | None = None
    outfit: Outfit | None = None
    deleted: bool | None = None


@dataclass(frozen=True)
class ApiSettings:
    """Limits and switches of the HTTP layer."""

    embed_dim: int = 128
    api_key: str = ""
    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 16_000_000


def _form_filters(form: Any) -> SearchFilters:
    payload: dict[str, Any] = {}
    top_k = form.get("top_k")
    if isinstance(top_k, str) and top_k.strip():
        payload["top_k"] = top_k.strip()
    for key, pattern in (("styles", STYLES_FIELD), ("exclude_ids", IDS_FIELD)):
        values = form_list(form, key, pattern)
        if values:
            payload[key] = values
    collapse = form.get("collapse_near_duplicates")
    if isinstance(collapse, str) and collapse.strip():
        # Only the spellings the OpenAPI boolean has in a form: pydantic would also take 1/0/yes/on, which the
        # documented schema calls invalid (a client relying on them would break on a stricter server).
        word = collapse.strip().lower()
        if word not in ("true", "false"):
            raise HTTPException(422, [{"loc": ["body", "collapse_near_duplicates"], "type": "bool_parsing",
                                       "msg": "Input should be true or false"}])
        payload["collapse_near_duplicates"] = word == "true"
    return validate(SearchFilters, payload)


def _outfit(result: dict[str, Any]) -> Outfit:
    return Outfit(**{k: result[k] for k in Outfit.model_fields})


# -- the app ----------------------------------------------------------------------------------------------------------


# Methods kept as a label value; any other token a client sends is `other`, so it cannot mint series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by route template, method and status, and times it.

    Pure ASGI rather than `@app.middleware("http")`: it sees the status of every response (errors rendered by the
    exception handlers inside it included) without buffering bodies. The route is read after the router ran,
    from `scope["route"]`: the template, so `/v1/items/<sha>` stays one series per route, not one per id.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # no response started: the server error middleware sends a 500

        async def send_seen(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code): not a server error
            raise
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            metrics.http_request(route, method, status, time.perf_counter() - start)


def create_api(backend: Backend, settings: ApiSettings) -> FastAPI:
    """The FastAPI app of the ingress: every route validates, then calls `backend`.

    Args:
        backend: the deployments behind the routes.
        settings: size limits, embedding dim and the API key for writes.
    """
    api = FastAPI(
        title="ootd",
        version="1",
        description="Outfit photos in, 128-d style embeddings out, style-similar outfits back.",
    )

    def require_key(request: Request) -> None:
        if not settings.api_key:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            raise HTTPException(401, "missing x-api-key header: writes need the API key")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise HTTPException(401, "invalid API key in x-api-key")

    async def no_live(call: Any) -> Any:
        """Awaits a backend call; no live collection or a model/collection mismatch is a 503 with the reason."""
        try:
            return await call
        except Unavailable as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": RETRY_AFTER}) from None

    upload_errors = (400, 413, 415, 422, 503)  # a multipart image upload, embedded by the Encoder

    @api.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["ops"], response_model=ReadyState,
             responses={503: {"model": ReadyState, "description": "not ready, with the reason"}})
    async def readyz() -> JSONResponse:
        """Readiness: the model is loaded and Milvus answers (503 otherwise, with the reason)."""
        state = await backend.ready()
        return JSONResponse(state, status_code=200 if state.get("ready") else 503)

    @api.post("/v1/embed", response_model=EmbedResponse, tags=["embed"], responses=error_responses(*upload_errors),
              openapi_extra=openapi_body(("multipart/form-data", IMAGE_FORM)))
    async def embed(request: Request) -> EmbedResponse:
        """The style embedding of a photo (detect → crop the outfit → encode)."""
        form = await read_form(request, settings.max_image_bytes)
        result = await backend.embed(await image_from(form, settings.max_image_bytes, settings.max_image_pixels))
        return EmbedResponse(embedding=list(result["embedding"]), dim=len(result["embedding"]),
                             model_version=result["model_version"], outfit=_outfit(result))

    write_errors = (401,) if settings.api_key else ()

    @api.post("/v1/items", response_model=WriteResponse, status_code=201, tags=["items"],
              responses=error_responses(*sorted((*upload_errors, *write_errors))),
              openapi_extra=openapi_body(("multipart/form-data", ITEM_FORM)))
    async def add_item(request: Request) -> WriteResponse:
        """Adds (or replaces) an outfit: its id is the sha256 of the image bytes; the crop is kept."""
        require_key(request)
        form = await read_form(request, settings.max_image_bytes)
        style, source, meta = form_item_fields(form)
        data = await image_from(form, settings.max_image_bytes, settings.max_image_pixels)
        image_id = hashlib.sha256(data).hexdigest()
        result = await backend.embed(data, want_crop=True)
        meta = {**meta, "outfit": _outfit(result).model_dump(), "model_version": result["model_version"]}
        row = {"id": image_id, "embedding": list(result["embedding"]), "style": style,
               "source": source or f"upload:{image_id}", "box": list(result["box"]), "meta": meta}
        await no_live(backend.upsert(row, result["crop"], result["model_version"]))
        return WriteResponse(id=image_id, model_version=result["model_version"], style=style,
                             outfit=_outfit(result))

    @api.get("/v1/items/{item_id}", response_model=ItemResponse, tags=["items"],
             responses=error_responses(404, 422, 503))
    async def get_item(item_id: Annotated[Sha256, PathParam()], embedding: bool = False) -> ItemResponse:
        """An indexed outfit (with its embedding when `embedding=true`)."""
        rows = await no_live(backend.get([item_id]))
        if not rows:
            raise HTTPException(404, f"no item with id {item_id}")
        row = rows[0]
        return ItemResponse(id=row["id"], style=row["style"], source=row["source"], box=list(row["box"]),
                            meta=row["meta"] or {}, created_at=row["created_at"],
                            embedding=[float(v) for v in row["embedding"]] if embedding else None)

    @api.get("/v1/items/{item_id}/image", tags=["items"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                              "description": "the crop"}, **error_responses(404, 422)})
    async def get_item_image(item_id: Annotated[Sha256, PathParam()]) -> Response:
        """The stored outfit crop (JPEG)."""
        data = await backend.read_image(item_id)
        if data is None:
            raise HTTPException(404, f"no image for id {item_id}")
        return Response(data, media_type="image/jpeg", headers={"cache-control": "public, max-age=86400"})

    @api.delete("/v1/items/{item_id}", response_model=WriteResponse, tags=["items"],
                responses=error_responses(*sorted((*write_errors, 404, 422, 503))))
    async def delete_item(item_id: Annotated[Sha256, PathParam()], request: Request) -> WriteResponse:
        """Removes an outfit from the live collection and its crop from the media store."""
        require_key(request)
        if not await no_live(backend.delete(item_id)):
            raise HTTPException(404, f"no item with id {item_id}")
        return WriteResponse(id=item_id, deleted=True)

    @api.post("/v1/search", response_model=SearchResponse, tags=["search"],
              responses=error_responses(400, 404, 413, 415, 422, 503), openapi_extra=openapi_body(
                  ("multipart/form-data", SEARCH_FORM), ("application/json", _search_schema(settings.embed_dim))))
    async def search(request: Request) -> SearchResponse:
        """Style-similar outfits for a photo (multipart), an indexed item's id or an embedding (JSON)."""
        kind = media_type(request)
        if kind == "multipart/form-data":
            form = await read_form(request, settings.max_image_bytes)
            filters = _form_filters(form)
            result = await backend.embed(await image_from(form, settings.max_image_bytes, settings.max_image_pixels))
            vector, query = list(result["embedding"]), {"kind": "image", "outfit": _outfit(result).model_dump()}
            version = result["model_version"]  # the live collection must hold this model's vectors
        elif kind == "application/json":
            req: SearchRequest = validate(SearchRequest, await read_json(request, MAX_JSON_BYTES))
            filters = SearchFilters(top_k=req.top_k, styles=req.styles, exclude_ids=req.exclude_ids,
                                    collapse_near_duplicates=req.collapse_near_duplicates)
            if req.id is not None:
                rows = await no_live(backend.get([req.id]))
                if not rows:
                    raise HTTPException(404, f"no item with id {req.id}")
                vector, query = [float(v) for v in rows[0]["embedding"]], {"kind": "id", "id": req.id}
                filters.exclude_ids = [*(filters.exclude_ids or []), req.id]
            else:
                vector, query = unit_vector(req.vector, settings.embed_dim), {"kind": "vector"}
            version = None  # a stored or given vector: searched in whatever collection is live
        else:
            raise HTTPException(415, f"expected multipart/form-data (image) or application/json (id or vector), "
                                     f"got {kind or 'no content type'}")
        found = await no_live(backend.search(vector, filters, version))
        return SearchResponse(results=[Hit(**h) for h in found["hits"]], model_version=found["model_version"],
                              query=query)

    @api.post("/v1/recommend", response_model=SearchResponse, tags=["search"],
              responses=error_responses(400, 404, 413, 415, 422, 503),
              openapi_extra=openapi_body(("application/json", RecommendRequest.model_json_schema())))
    async def recommend(request: Request) -> SearchResponse:
        """Outfits near the mean of the liked ones and away from the disliked ones (rated ones excluded)."""
        req: RecommendRequest = validate(RecommendRequest, await read_json(request, MAX_JSON_BYTES))
        wanted = list(dict.fromkeys([*req.liked, *req.disliked]))
        rows = {r["id"]: r for r in await no_live(backend.get(wanted))}
        missing = [i for i in wanted if i not in rows]
        if missing:
            raise HTTPException(404, f"unknown ids: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        query = _preference_vector([rows[i]["embedding"] for i in req.liked],
                                   [rows[i]["embedding"] for i in req.disliked], req.dislike_weight)
        filters = SearchFilters(top_k=req.top_k, styles=req.styles, exclude_ids=wanted)
        found = await no_live(backend.search(query, filters))
        return SearchResponse(results=[Hit(**h) for h in found["hits"]], model_version=found["model_version"],
                              query={"kind": "recommend", "liked": len(req.liked), "disliked": len(req.disliked)})

    @api.get("/v1/stats", tags=["ops"], responses=error_responses(503))
    async def stats() -> dict[str, Any]:
        """Model version, live collection and item count per style."""
        return await no_live(backend.stats())

    @api.get("/", include_in_schema=False)
    async def gallery() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    install(api, api_key=bool(settings.api_key),
            write_routes={("post", "/v1/items"), ("delete", "/v1/items/{item_id}")})
    api.add_middleware(RequestMetrics)
    return api


def _search_schema(embed_dim: int) -> dict[str, Any]:
    """SearchRequest's JSON schema with what the server checks beyond the model: `vector` has `embed_dim`
    float32 numbers, not all zero (so a request the schema calls valid is one the server accepts)."""
    schema = SearchRequest.model_json_schema()
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    schema["properties"]["vector"] = {
        "anyOf": [{"type": "array", "items": number, "minItems": embed_dim, "maxItems": embed_dim,
                   "contains": {"type": "number", "not": {"const": 0}}}, {"type": "null"}],
        "default": None, "description": f"a raw embedding ({embed_dim} numbers, not all zero)",
    }
    # Exactly one query: `id` or `vector` (the other absent or null), as the model validator demands.
    schema["anyOf"] = [{"required": ["id"], "properties": {"id": {"type": "string"}, "vector": {"type": "null"}}},
                       {"required": ["vector"], "properties": {"vector": {"type": "array"}, "id": {"type": "null"}}}]
    return schema


def _preference_vector(liked: list[Any], disliked: list[Any], weight: float) -> list[float]:
    """mean(liked) − weight·mean(disliked), L2-normalised; 422 when they cancel out."""
    dim = len(liked[0])
    mean_liked = [sum(float(v[d]) for v in liked) / len(liked) for d in range(dim)]
    if disliked and weight > 0:
        mean_disliked = [sum(float(v[d]) for v in disliked) / len(disliked) for d in range(dim)]
        mean_liked = [a - weight * b for a, b in zip(mean_liked, mean_disliked, strict=True)]
    norm = math.sqrt(sum(v * v for v in mean_liked))
    if not norm > 1e-6:
        raise HTTPException(422, "the liked and disliked outfits cancel out: no direction to search in")
    return [v / norm for v in mean_liked]
