"""The ingress's HTTP layer (Contract 4): JSON errors, request metrics, Server-Timing stages and
the bounded upload read. No search logic here."""

# No `from __future__ import annotations`: FastAPI must see the handler types at run time.
import contextlib
import functools
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

# images.ImageError codes -> HTTP status.
IMAGE_STATUS = {
    "too_large": 413,
    "not_an_image": 415,
    "unsupported": 415,
    "too_small": 422,
    "truncated": 422,
    "decode_error": 422,
}
# An upload over the limit is still read (and dropped) up to this size before the 413: a client
# that sends its whole body before reading (no `Expect: 100-continue`: urllib, fetch) would get
# a connection reset instead of the JSON answer. Larger ones are cut at once.
DRAIN_BYTES = 32 << 20
# Room for the multipart envelope around an image of the largest allowed size.
MULTIPART_SLACK = 65536


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class Stages:
    """Per-request stage durations, sent as a W3C Server-Timing header (browser devtools and
    bench/serve.py read it)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.ms: dict[str, float] = {}

    def total_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1000

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.ms.items())


@functools.cache
def _metrics() -> tuple[Counter, Histogram, Counter]:
    """Built on first use, inside the replica, so Serve adds its deployment/replica tags."""
    return (
        Counter(
            "visual_search_requests",
            "HTTP requests answered by the ingress",
            tag_keys=("route", "method", "status"),
        ),
        Histogram(
            "visual_search_request_latency_ms",
            "time in the ingress replica per request, until the last byte is sent (ms)",
            boundaries=[5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000],
            tag_keys=("route",),
        ),
        Counter(
            "visual_search_errors",
            "error answers by their JSON error code",
            tag_keys=("route", "status", "code"),
        ),
    )


def _error_code(status: int, body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "internal_error" if status >= 500 else f"http_{status}"


class Observe:
    """ASGI wrapper that counts and times every request, and reads the code of error answers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, body = time.perf_counter(), 500, bytearray()

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and len(body) < 4096:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            # The route template, never the raw path: one series per endpoint, not per product.
            route = getattr(scope.get("route"), "path", "unmatched")
            requests, latency, errors = _metrics()
            tags = {"route": route, "status": str(status)}
            requests.inc(tags={**tags, "method": scope["method"]})
            latency.observe((time.perf_counter() - started) * 1000, tags={"route": route})
            if status >= 400:
                errors.inc(tags={**tags, "code": _error_code(status, bytes(body))})


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return error_response(400, "bad_request", "; ".join(parts))


def make_app(title: str) -> FastAPI:
    """A FastAPI app whose every error answer is Contract 4's JSON, with request metrics."""
    app = FastAPI(title=title, docs_url="/docs")
    app.add_middleware(Observe)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    return app


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"upload over {limit} bytes")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    declared = int(declared) if declared and declared.isdigit() else None
    if declared is not None and declared > max(limit, DRAIN_BYTES):
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_BYTES:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise _too_large(limit)
    return b"".join(chunks)


class _InMemoryParser(MultiPartParser):
    # Starlette spools file parts over 1 MB to a temp file: a query photo must never hit disk.
    # The body is already bounded by the upload limit, so memory is too.
    spool_max_size = 1 << 62


async def _multipart_form(request: Request, body: bytes):
    async def stream():
        yield body

    try:
        return await _InMemoryParser(request.headers, stream(), max_files=4, max_fields=16).parse()
    except Exception as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from exc


async def _image_field(form) -> bytes:
    field = form.get("image")
    if field is None or isinstance(field, str):
        raise ApiError(400, "bad_request", "multipart body needs a file field 'image'")
    return await field.read()


async def _multipart_image(request: Request, body: bytes) -> bytes:
    """The file field `image` of a multipart body already read."""
    return await _image_field(await _multipart_form(request, body))


MAX_METADATA_CHARS = 64 << 10


async def read_product_upload(request: Request, max_bytes: int) -> tuple[bytes, dict]:
    """(the photo, the metadata object) of a PUT /products/{id}: multipart with a file field
    `image` and an optional text field `metadata` (a JSON object); 400/413 as JSON."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "bad_request", "send multipart/form-data: image (file), metadata")
    form = await _multipart_form(request, await _read_body(request, max_bytes + MULTIPART_SLACK))
    image = await _image_field(form)
    if not image:
        raise ApiError(400, "bad_request", "empty image")
    if len(image) > max_bytes:
        raise ApiError(413, "too_large", f"image over {max_bytes} bytes")
    text = form.get("metadata") or "{}"
    if not isinstance(text, str) or len(text) > MAX_METADATA_CHARS:
        limit = f"a JSON object of up to {MAX_METADATA_CHARS} characters"
        raise ApiError(400, "bad_metadata", f"metadata must be {limit}")
    try:
        metadata = json.loads(text)
    except ValueError as exc:
        raise ApiError(400, "bad_metadata", f"metadata is not JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ApiError(400, "bad_metadata", "metadata must be a JSON object")
    return image, metadata


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image of a POST: the raw body, or the multipart field `image`; 400/413 as JSON."""
    body = await _read_body(request, max_bytes + MULTIPART_SLACK)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await _multipart_image(request, body)
    if not body:
        raise ApiError(400, "bad_request", "empty body: send an image")
    if len(body) > max_bytes:
        raise ApiError(413, "too_large", f"image over {max_bytes} bytes")
    return body


def require_key(request: Request, key: str | None, key_env: str, admin_open: bool) -> None:
    """Admin paths fail closed: 401 for a missing or wrong X-API-Key, 403 when no key is
    configured (unless `admin_open`, for trusted networks)."""
    if key is None:
        if admin_open:
            return
        raise ApiError(
            403,
            "admin_disabled",
            f"admin endpoints are off: set ${key_env} in the replicas' environment and send it "
            "as X-API-Key (or run with admin_open=true on a trusted network)",
        )
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key")
