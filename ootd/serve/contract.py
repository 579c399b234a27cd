"""The HTTP contract beside the routes: one error model, the documented error responses, form schemas, handlers.

Every error the API answers is `{"detail": str}` (plus `errors` for field-level validation problems), whether a
route raised it, FastAPI's parameter validation did, or the router refused a method; each route documents the
statuses it really answers (`error_responses`), so the OpenAPI document, the README table and the server agree.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ootd.serve.parsing import MAX_IDS, MAX_SOURCE_CHARS, MAX_TOP_K
from ootd.styles import STYLES

API_KEY_SCHEME = "apiKey"


class FieldError(BaseModel):
    """One field-level problem of a request (never echoing the value, which may be huge)."""

    loc: list[str | int] = Field(description="where: body/query/path, then the field names and list indexes")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """The body of every 4xx and 503."""

    detail: str = Field(description="what was wrong, in words")
    errors: list[FieldError] | None = Field(None, description="each invalid field (422 validation errors only)")


class ReadyState(BaseModel):
    """`/readyz`: ready, or the reason it is not (503)."""

    ready: bool
    model_version: str | None = None
    live_model_version: str | None = None
    reason: str | None = None


# What each status means on this API; a route lists the ones it can answer.
_MEANING = {
    400: "malformed request: empty body, malformed multipart/form-data or a bad content-length",
    401: "a write without the right `x-api-key` (when the server has an API key)",
    404: "no item with that id",
    413: "body or image over `serve.max_image_bytes`, or an image over `serve.max_image_pixels`",
    415: "wrong content type of the body or of the `image` part, or an image format outside the allow-list",
    422: "well-formed but invalid: not a decodable image, malformed JSON, a field out of range or of the wrong type",
    503: "not servable right now (no live collection, a model mismatch, a replica restarting); see Retry-After",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route answering these error statuses, all with `ErrorResponse` bodies."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": _MEANING[code]}
        if code == 503:
            out[code]["headers"] = _RETRY_AFTER
    return out


def openapi_body(*schemas: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """An `openapi_extra` request body for a route that parses its body itself (size caps first)."""
    return {"requestBody": {"required": True, "content": {ctype: {"schema": schema} for ctype, schema in schemas}}}


_STYLE = "|".join(STYLES)
_SHA = "[0-9a-f]{64}"
# The form's list fields as the server reads them (`parsing.form_list_field`); empty means "no filter".
STYLES_FIELD = f"^(({_STYLE})(,({_STYLE}))*)?$"
IDS_FIELD = f"^({_SHA}(,{_SHA}){{0,{MAX_IDS - 1}}})?$"
IMAGE_PART = {"type": "string", "format": "binary", "description": "the photo: JPEG, PNG, WebP, BMP or GIF"}
IMAGE_FORM = {"type": "object", "required": ["image"], "properties": {"image": IMAGE_PART}}
SEARCH_FORM = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": IMAGE_PART,
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 10},
        # Patterns, so a request the schema calls valid is one the server accepts.
        "styles": {"type": "string", "pattern": STYLES_FIELD, "description": "comma-separated style names"},
        "exclude_ids": {"type": "string", "pattern": IDS_FIELD, "description": "comma-separated ids"},
        "collapse_near_duplicates": {"type": "boolean", "default": True,
                                     "description": "one result per near-duplicate group"},
    },
}
ITEM_FORM = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": IMAGE_PART,
        "style": {"type": "string", "enum": ["", *STYLES]},
        "source": {"type": "string", "maxLength": MAX_SOURCE_CHARS, "description": "where the photo came from"},
        "meta": {"type": "string", "description": "a JSON object kept with the item", "default": "{}"},
    },
}


def _summary(errors: list[dict[str, Any]]) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if isinstance(detail, list):  # pydantic errors from `parsing.validate`: a sentence plus the structured list
        body = {"detail": _summary(detail), "errors": detail}
    elif not isinstance(detail, str):
        body = {"detail": str(detail)}
    return JSONResponse(body, status_code=status, headers=headers)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of this path answers (the router's own 405 names only the first route's)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


def install(api: FastAPI, *, api_key: bool, write_routes: set[tuple[str, str]]) -> None:
    """Adds the shared error handlers and the security scheme of the writes to `api`.

    Args:
        api: the app.
        api_key: the server requires `x-api-key` on writes (then the writes declare the scheme).
        write_routes: (method, path) of the writes.
    """

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(api, request))
        return _error(exc.status_code, exc.detail, headers or None)

    @api.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return _error(422, errors)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            spec = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            if api_key:
                spec.setdefault("components", {})["securitySchemes"] = {
                    API_KEY_SCHEME: {"type": "apiKey", "in": "header", "name": "x-api-key"}}
                for method, path in write_routes:
                    spec["paths"][path][method]["security"] = [{API_KEY_SCHEME: []}]
            api.openapi_schema = spec
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
