"""The FastAPI application: the HTTP API, the web page and their safety rules.

Concurrency: request handlers run on the event loop (and decode uploads on a small pool of threads); every use of
the index goes through the one :class:`~engine.serve.worker.QueryWorker` thread, which batches queries. Reports
are drawn off that thread: only their patch correspondences are computed on it.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from .._errors import AttribError, IndexFormatError
from .._info import index_info
from ..images import ImageLimits, ImageRejected, load_image, thumbnail_jpeg
from ..report.html import CSP as REPORT_CSP
from ..report.html import VIEW_SIDE, query_report_html, report_correspondences
from .settings import BUILTIN_WEIGHTS, ServeSettings
from .uploads import ApiError, decode_upload, read_attribute_form
from .worker import Busy, QueryWorker

API_VERSION = "1"
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# the report is framed by the page (same origin only) and runs no script at all
SERVED_REPORT_CSP = f"{REPORT_CSP}; frame-ancestors 'self'; sandbox allow-same-origin"
API_CSP = "default-src 'none'; frame-ancestors 'none'"
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
MAX_ID_CHARS = 1000

STATIC = {  # the page's files (package data), served by name only
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
}


# --------------------------------------------------------------------------------------------- helpers
def _static(name: str) -> bytes:
    return resources.files("engine.serve").joinpath("static", name).read_bytes()


def _swagger_files() -> dict[str, tuple[bytes, str]]:
    """Swagger UI's script and stylesheet from the swagger-ui-bundle package (served locally: no CDN)."""
    from swagger_ui_bundle import swagger_ui_path

    root = swagger_ui_path
    return {"swagger-ui-bundle.js": ((root / "swagger-ui-bundle.js").read_bytes(), "text/javascript; charset=utf-8"),
            "swagger-ui.css": ((root / "swagger-ui.css").read_bytes(), "text/css; charset=utf-8")}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the API answers: ``{"error": CODE, "detail": ONE-LINE MESSAGE}``."""
    return JSONResponse({"error": code, "detail": message}, status_code=status, headers=headers)


def _label(name: str | None) -> str:
    return f"upload:{name}" if name else "upload"


@dataclass
class Kept:
    """A recent result, kept for its report."""

    result: Any  # engine.Attribution
    thumb: bytes | None  # the query image re-encoded small (JPEG), for the report
    label: str  # the query image's name as the report shows it
    created: float


class ResultStore:
    """The most recent results (at most ``size``, each for ``ttl`` seconds), by request id."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size, self.ttl = size, ttl
        self._items: OrderedDict[str, Kept] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, rid: str, kept: Kept) -> None:
        with self._lock:
            self._items[rid] = kept
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, rid: str) -> Kept | None:
        with self._lock:
            kept = self._items.get(rid)
            if kept is not None and time.monotonic() - kept.created > self.ttl:
                del self._items[rid]
                return None
            return kept

    def __len__(self) -> int:
        return len(self._items)


class Service:
    """What the endpoints share: the index, its worker, the fusions a request may name, the kept results."""

    def __init__(self, index: Any, settings: ServeSettings) -> None:
        self.settings = settings
        enc = index.encoders  # models load here, once, at start-up
        self.draft = max(enc.clip_input.size, enc.dino_input.size)
        index_pixels = int(index.manifest["settings"].get("max_pixels", ImageLimits().max_pixels))
        self.limits = ImageLimits(max_pixels=settings.max_pixels or index_pixels,
                                  max_bytes=settings.max_upload_bytes)
        self.record_limits = ImageLimits(max_pixels=index_pixels)
        self.fusions = {name: index.resolve_fusion(name) for name in BUILTIN_WEIGHTS}
        for name, path in settings.weights:
            self.fusions[name] = index.resolve_fusion(path)  # refused here when learned for other models
        self.weights_names = tuple(self.fusions)
        self.worker = QueryWorker(index, queue_size=settings.queue + 16, max_batch=settings.max_batch,
                                  window_s=settings.batch_window_ms / 1e3)
        self.results = ResultStore(settings.keep_results, settings.keep_seconds)
        self.admitted = 0  # attribute requests between admission and answer (event-loop thread only)
        self.refused = 0  # requests answered 503 because the queue was full
        self.decode_slots = threading.BoundedSemaphore(settings.decode_slots or os.cpu_count() or 1)
        self.started = time.time()
        self.info = self._info()

    def _info(self) -> dict:
        return index_info(self.index.path)

    # ---------------------------------------------------------------------------- on the worker thread
    async def on_worker(self, fn, timeout: float | None = None):
        """Run ``fn`` on the worker thread (the only one that touches the index) and wait for it."""
        try:
            fut = self.worker.submit_call(fn)
        except Busy as e:
            raise busy(self.settings, str(e)) from None
        return await _wait(fut, timeout or self.settings.timeout_s)

    @property
    def index(self):
        """The index the worker answers from (it moves to a newer generation when one is committed)."""
        return self.worker.index

    def row_of(self, record_id: str) -> int | None:
        """The row of a live record id (worker thread only; the reader builds its id table on first use)."""
        row = int(self.index.reader.rows_of([record_id])[0])
        return row if row >= 0 else None

    def image_ref(self, row: int) -> tuple[str, str | None]:
        """(id, image reference or None) of a row (worker thread only)."""
        meta = self.index.reader.records([row])
        return str(meta["id"][0]), meta["image"][0]

    def report_key(self, rid: str) -> str | None:
        """The key that opens one result's report without the bearer token (an iframe cannot send headers)."""
        if self.settings.token is None:
            return None
        return hmac.new(self.settings.token.encode(), f"report:{rid}".encode(), hashlib.sha256).hexdigest()[:32]


def busy(settings: ServeSettings, why: str) -> ApiError:
    return ApiError(503, "busy", f"the server is busy ({why}); retry after {settings.retry_after_s} s",
                    {"Retry-After": str(settings.retry_after_s)})


async def _wait(fut, timeout: float):
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
    except asyncio.TimeoutError:
        fut.cancel()  # skipped by the worker if it has not started
        raise ApiError(504, "timeout", f"no answer within {timeout:g} s; the server is overloaded, retry later",
                       {"Retry-After": "5"}) from None


def _thumb(image: Image.Image | None) -> bytes | None:
    return None if image is None else thumbnail_jpeg(image, VIEW_SIDE, quality=90)[1]


def _record_jpeg(ref: str, limits: ImageLimits, side: int) -> bytes:
    return thumbnail_jpeg(load_image(ref, limits, draft=side), side)[1]


# --------------------------------------------------------------------------------------------- middleware
class SecurityHeaders:
    """Adds nosniff, no-referrer, no-store and a deny-all CSP to every response that does not set its own."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                have = {k.lower() for k, _ in headers}
                for k, v in ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                             (b"cache-control", b"no-store"), (b"content-security-policy", API_CSP.encode()),
                             (b"x-frame-options", b"DENY")):
                    if k not in have:
                        headers.append((k, v))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------------------------- the app
def create_app(index: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The service for one opened :class:`engine.Index` (its models load here, once).

    The app's lifespan starts and stops the worker thread: run it under uvicorn, or in tests inside
    ``with TestClient(app)``. The caller keeps ownership of ``index``.
    """
    settings = settings or ServeSettings()
    svc = Service(index, settings)
    bearer = HTTPBearer(auto_error=False, description="--token / ATTRIB_TOKEN, when the server was started with one")

    def authorised(creds: HTTPAuthorizationCredentials | None) -> bool:
        if settings.token is None:
            return True
        return creds is not None and creds.scheme.lower() == "bearer" and hmac.compare_digest(
            creds.credentials.encode(), settings.token.encode())

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not authorised(creds):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'",
                           {"WWW-Authenticate": 'Bearer realm="attrib"'})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.worker.start()
        try:
            yield
        finally:
            # uvicorn has let every in-flight request finish; the worker drains what is left and stops
            await run_in_threadpool(svc.worker.close)

    app = FastAPI(
        title="attrib", version=API_VERSION, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
        description="Attribute AI-generated images to their training data. `POST /v1/attribute` answers the JSON "
                    "of `attrib query --json` (schema version 1).",
    )
    app.state.service = svc
    app.add_middleware(SecurityHeaders)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False,
                           expose_headers=["X-Attrib-Request-Id", "X-Attrib-Report", "Retry-After"], max_age=600)

    # ----------------------------------------------------------------------------- errors: one JSON shape
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(AttribError)
    async def _attrib_error(request: Request, e: AttribError):
        return error_response(400, "bad_query", str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(e.status_code, codes.get(e.status_code, "http_error"), str(e.detail),
                              getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        where = ".".join(str(x) for x in errs[0].get("loc", ())) if errs else "request"
        return error_response(400, "bad_request", f"{where}: {errs[0].get('msg') if errs else 'invalid'}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(500, "internal", f"internal error ({e.__class__.__name__}); see the server log")

    api = [Depends(require_token)]

    # ----------------------------------------------------------------------------- health, page, docs
    @app.get("/healthz", include_in_schema=True, tags=["service"], summary="Liveness (never needs the token)")
    async def healthz():
        ok = svc.worker.alive
        body = {"status": "ok" if ok else "stopping", "auth": settings.token is not None,
                "queued": svc.worker.pending(), "admitted": svc.admitted}
        return JSONResponse(body, status_code=200 if ok else 503)

    page = _static("index.html")
    files = {name: (_static(name), mime) for name, mime in STATIC.items()}
    files.update(_swagger_files())

    @app.get("/", include_in_schema=False)
    async def index_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in files:
            raise ApiError(404, "not_found", "no such file")
        data, mime = files[name]
        return Response(data, media_type=mime, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/openapi.json", include_in_schema=False, dependencies=api)
    async def openapi_json():
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                             routes=app.routes)
        return JSONResponse(app.openapi_schema)

    @app.get("/docs", include_in_schema=False, dependencies=api)
    async def docs():
        html_page = (
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>attrib API</title>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"stylesheet\" href=\"/static/swagger-ui.css\"></head><body><div id=\"swagger-ui\"></div>"
            "<script src=\"/static/swagger-ui-bundle.js\"></script><script src=\"/static/docs.js\"></script>"
            "</body></html>")
        return HTMLResponse(html_page, headers={"Content-Security-Policy": DOCS_CSP})

    # ----------------------------------------------------------------------------- the API
    @app.get("/v1/info", dependencies=api, tags=["service"], summary="The index's manifest summary and the limits")
    async def info():
        return {
            "api_version": API_VERSION,
            "index": svc.info,
            "service": {
                "pid": os.getpid(), "started": svc.started, "weights": list(svc.weights_names),
                "auth": settings.token is not None, "cors_origins": list(settings.cors_origins),
                "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_pixels": svc.limits.max_pixels,
                           "max_k": settings.max_k, "max_prompt_chars": settings.max_prompt_chars,
                           "queue": settings.queue, "timeout_s": settings.timeout_s,
                           "read_timeout_s": settings.read_timeout_s},
                "batching": {"max_batch": settings.max_batch, "window_ms": settings.batch_window_ms},
                "stats": {**svc.worker.stats.to_dict(), "refused": svc.refused, "kept_results": len(svc.results)},
            },
            "warning": svc.info.get("warning"),
        }

    @app.post(
        "/v1/attribute", dependencies=api, tags=["attribution"],
        summary="Attribute an image and/or prompt (the JSON of `attrib query --json`)",
        responses={400: {"description": "bad form or query"}, 401: {"description": "missing or wrong token"},
                   413: {"description": "upload or image too large"}, 415: {"description": "not an image"},
                   422: {"description": "unreadable image"}, 503: {"description": "queue full (Retry-After)"},
                   504: {"description": "timed out"}},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "properties": {
                "image": {"type": "string", "format": "binary", "description": "the generated image (optional)"},
                "prompt": {"type": "string", "description": "the prompt that generated it (optional)"},
                "k": {"type": "integer", "default": 10, "minimum": 1, "maximum": settings.max_k},
                "weights": {"type": "string", "enum": list(svc.weights_names), "default": "auto"}}}}}}},
    )
    async def attribute(request: Request):
        if svc.admitted >= settings.queue:
            svc.refused += 1
            raise busy(settings, f"{settings.queue} requests are already admitted")
        svc.admitted += 1
        t0 = time.perf_counter()
        try:
            try:
                form = await read_attribute_form(
                    request, max_upload=settings.max_upload_bytes, read_timeout_s=settings.read_timeout_s,
                    max_k=settings.max_k, max_prompt_chars=settings.max_prompt_chars,
                    weights_names=svc.weights_names)
            except ClientDisconnect:
                raise ApiError(400, "client_disconnected", "the client went away before the body arrived") from None
            image = None
            if form.image is not None:
                image = await run_in_threadpool(_decode_bounded, svc, form.image)
            try:
                # "auto" is resolved by the worker per query, against the generation it answers from: a
                # calibration written meanwhile is used, and a prompt-only query prefers text-only weights
                fusion = None if form.weights == "auto" else svc.fusions[form.weights]
                fut = svc.worker.submit_query(image, form.prompt, form.k, fusion)
            except Busy as e:
                svc.refused += 1
                raise busy(settings, str(e)) from None
            res = await _wait(fut, max(0.1, settings.timeout_s - (time.perf_counter() - t0)))
            label = _label(form.filename) if image is not None else None
            res.query["image"] = label
            res.timings_ms["total"] = round((time.perf_counter() - t0) * 1e3, 3)
            rid = secrets.token_urlsafe(16)
            svc.results.put(rid, Kept(res, await run_in_threadpool(_thumb, image), label or "none",
                                      time.monotonic()))
        finally:
            svc.admitted -= 1
        key = svc.report_key(rid)
        report = f"/v1/attribute/{rid}/report" + (f"?key={key}" if key else "")
        return JSONResponse(res.to_dict(), headers={"X-Attrib-Request-Id": rid, "X-Attrib-Report": report})

    def kept_or_404(request_id: str) -> Kept:
        kept = svc.results.get(request_id) if REQUEST_ID.match(request_id) else None
        if kept is None:
            raise ApiError(404, "not_found", f"no kept result {request_id[:64]!r}: results are kept for "
                                             f"{settings.keep_seconds:g} s (the last {settings.keep_results})")
        return kept

    @app.get("/v1/attribute/{request_id}", dependencies=api, tags=["attribution"],
             summary="A recent result's JSON again, by the X-Attrib-Request-Id of its answer")
    async def attribute_again(request_id: str):
        return JSONResponse(kept_or_404(request_id).result.to_dict())

    @app.get("/v1/attribute/{request_id}/report", tags=["attribution"], response_class=HTMLResponse,
             summary="A recent result's self-contained HTML report (bearer token, or the key in X-Attrib-Report)")
    async def attribute_report(request_id: str, key: str | None = None,
                               creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        expected = svc.report_key(request_id)
        if not authorised(creds) and not (expected and key and hmac.compare_digest(key.encode(), expected.encode())):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (or report key)",
                           {"WWW-Authenticate": 'Bearer realm="attrib"'})
        kept = kept_or_404(request_id)
        corrs = await svc.on_worker(lambda: report_correspondences(svc.index, kept.result))
        q_img = Image.open(io.BytesIO(kept.thumb)) if kept.thumb else None
        html_text = await run_in_threadpool(
            query_report_html, svc.index, kept.result, query_image=q_img, correspondences=corrs,
            index_label=svc.index.path.name, query_label=kept.label)
        return HTMLResponse(html_text, headers={"Content-Security-Policy": SERVED_REPORT_CSP,
                                                "X-Frame-Options": "SAMEORIGIN", "Cache-Control": "private, no-store"})

    async def record_image(row: int | None, shown: str, size: int | None) -> Response:
        if row is None or not 0 <= row < svc.index.reader.next_row:
            raise ApiError(404, "not_found", f"no record {shown}")
        try:
            rid, ref = await svc.on_worker(lambda: svc.image_ref(row))
        except IndexFormatError:  # a row that is not a live record (deleted, or never written)
            raise ApiError(404, "not_found", f"no record {shown}") from None
        if ref is None:
            raise ApiError(404, "no_image", f"record {rid[:200]!r} has no image (a caption-only record)")
        side = min(settings.image_side, size or settings.image_side)
        try:
            data = await run_in_threadpool(_record_jpeg, ref, svc.record_limits, side)
        except ImageRejected as e:
            raise ApiError(404, "image_unavailable", f"the image of record {rid[:200]!r} is unavailable: "
                                                     f"{e.reason}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/records/{record_id}/image", dependencies=api, tags=["records"], response_class=Response,
             summary="An indexed record's image, re-encoded as JPEG (by id; ids with '..', '/' or NUL are 404)")
    async def record_image_by_id(record_id: str, size: int | None = None):
        if (not record_id or len(record_id) > MAX_ID_CHARS or ".." in record_id or "/" in record_id
                or "\\" in record_id or "\x00" in record_id):
            raise ApiError(404, "not_found", "no such record")
        row = await svc.on_worker(lambda: svc.row_of(record_id))
        return await record_image(row, repr(record_id[:200]), _side(size))

    @app.get("/v1/rows/{row}/image", dependencies=api, tags=["records"], response_class=Response,
             summary="An indexed record's image by its row (the `row` of a result): for ids that hold a '/'")
    async def record_image_by_row(row: int, size: int | None = None):
        return await record_image(row, f"at row {row}", _side(size))

    return app


def _side(size: int | None) -> int | None:
    if size is not None and not 16 <= size <= 4096:
        raise ApiError(400, "bad_size", f"size={size} is out of range; valid: 16..4096")
    return size


def _decode_bounded(svc: Service, data: bytes) -> Image.Image:
    with svc.decode_slots:  # at most this many full-size decodes in memory at once
        return decode_upload(data, svc.limits, svc.draft)
