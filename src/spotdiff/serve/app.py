"""The FastAPI application: routes, authentication, limits, JSON errors (docs/serve.md).

Every error is ``{"error": {"status": ..., "code": ..., "message": ...}}`` with a 4xx status for the
client's mistakes and a 5xx for the service's; no error is ever answered as a decision.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spotdiff import __version__
from spotdiff.data.io import ImageTooLarge
from spotdiff.detect.scoring import ERROR, ScoredImage
from spotdiff.errors import DataError
from spotdiff.serve.audit import AuditLog
from spotdiff.serve.batching import Job, MicroBatcher, Outcome, QueueFull
from spotdiff.serve.config import ServeConfig, key_matches
from spotdiff.serve.metrics import CONTENT_TYPE, Metrics
from spotdiff.serve.page import OPERATOR_PAGE
from spotdiff.serve.scoring import ServedModel, overlay_png, prepare_request

RAW_TYPES = ("application/octet-stream",)
PREDICT_QUERY = frozenset({"overlay", "mask"})


class ApiError(Exception):
    """An error answered as JSON with ``status``; ``code`` is a stable machine-readable name."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status, headers=headers)


# ----------------------------------------------------------------------------- schema of the answers
class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Thresholds(BaseModel):
    image: float
    pixel: float


class Prediction(BaseModel):
    """One image's answer: the values of ``predict``'s ``scores.csv`` columns of the same name."""

    request_id: str
    model: str
    score: float
    normalized_score: float | None
    normal_percentile: float | None
    decision: str
    anomalous: bool
    thresholds: Thresholds
    model_fingerprint: str
    provenance: dict[str, Any]
    image_sha256: str
    overlay_png: str | None = None
    mask_png: str | None = None


class ModelInfo(BaseModel):
    name: str
    backend: str
    image_size: list[int]
    thresholds: Thresholds
    threshold_modes: dict[str, str]
    model_fingerprint: str
    provenance: dict[str, Any]


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 404, 408, 413, 415, 422, 500, 503, 504)
}


# ----------------------------------------------------------------------------- state
@dataclass
class Recent:
    """A decision kept for the operator's page (the overlay is drawn only when the page asks, from
    ``scored.display`` and ``scored.anomaly_map``)."""

    record: dict[str, Any]
    model: ServedModel
    scored: ScoredImage
    flagged: bool
    png: bytes | None = None


class Service:
    """Everything the routes share: models, batchers, audit log, metrics, recent decisions."""

    def __init__(self, models: Sequence[ServedModel], audit: AuditLog, config: ServeConfig) -> None:
        self.models = {m.name: m for m in models}
        self.audit = audit
        self.config = config
        self.metrics = Metrics(lambda: {n: b.depth for n, b in self.batchers.items()})
        self.batchers: dict[str, MicroBatcher] = {}
        self.admitted = dict.fromkeys(self.models, 0)
        """Predict requests in progress per model (reading, decoding, queued or scored): at most ``max_queue``."""
        self.arriving = dict.fromkeys(self.models, 0)
        """Of those, the ones whose body is being read or decoded: a batch waits for them (``max_wait_ms``)."""
        self.decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="spotdiff-decode")
        self.score_pool = ThreadPoolExecutor(1, thread_name_prefix="spotdiff-score")
        self.recent: dict[str, collections.OrderedDict[str, Recent]] = {
            "flagged": collections.OrderedDict(),
            "normal": collections.OrderedDict(),
        }

    async def start(self) -> None:
        c = self.config
        for name, model in self.models.items():
            self.batchers[name] = MicroBatcher(
                model,
                self.score_pool,
                self.audit,
                self.metrics,
                c.max_batch,
                c.max_wait_ms / 1000.0,
                c.max_queue,
                self.remember,
                arriving=functools.partial(self.arriving.__getitem__, name),
            )
            self.batchers[name].start()

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.score_pool.shutdown(wait=True)
        self.audit.close()

    def remember(self, model: ServedModel, job: Job, outcome: Outcome) -> None:
        flagged = outcome.record["decision"] != "normal"
        kept = self.recent["flagged" if flagged else "normal"]
        kept[job.request_id] = Recent(outcome.record, model, outcome.scored, flagged)
        while len(kept) > self.config.recent:
            kept.popitem(last=False)

    def find_recent(self, request_id: str) -> Recent | None:
        return self.recent["flagged"].get(request_id) or self.recent["normal"].get(request_id)


# ----------------------------------------------------------------------------- middleware
class LimitsMiddleware:
    """Pure ASGI: refuse bodies over ``max_body_bytes`` (by header at once, else while streaming) and
    count every request in the metrics by route template and status."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.service.config.max_body_bytes
        started, status, t0 = False, 500, time.perf_counter()
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")

        async def counted_send(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, int(message["status"])
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        try:
            if length is not None and (not length.isdigit() or int(length) > limit):
                await too_big(scope, receive, counted_send)
            else:
                await self.app(scope, limited_receive, counted_send)
        except _BodyTooLarge:
            if started:
                raise
            await too_big(scope, receive, counted_send)
        finally:
            route = scope.get("route")
            self.service.metrics.request(getattr(route, "path", "(unmatched)"), status, time.perf_counter() - t0)


class _BodyTooLarge(Exception):
    pass


# ----------------------------------------------------------------------------- the app
def create_app(models: Sequence[ServedModel], audit: AuditLog, config: ServeConfig | None = None) -> FastAPI:
    """The service over loaded ``models`` writing to ``audit`` (batchers start with the app's lifespan)."""
    config = config or ServeConfig()
    service = Service(models, audit, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="spotdiff inspection service",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Anomaly decisions for single images from calibrated spotdiff models (docs/serve.md).",
    )
    app.state.service = service
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(LimitsMiddleware, service=service)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(exc.status_code, code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')} (got {e.get('input')!r})"
            for e in exc.errors()
        ]
        return error_response(422, "malformed_request", "; ".join(parts) or "malformed request")

    def authorize(request: Request) -> None:
        if not config.api_keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not given:
            raise ApiError(
                401, "missing_api_key", "this service needs an API key: send 'Authorization: Bearer KEY'", challenge
            )
        if not key_matches(given.strip(), config.api_keys):
            raise ApiError(401, "wrong_api_key", "the API key is not accepted", challenge)

    def model_named(name: str) -> ServedModel:
        if name not in service.models:
            raise ApiError(404, "unknown_model", f"no model named {name!r}; loaded: {sorted(service.models)}")
        return service.models[name]

    @app.get("/healthz", summary="the process is up", responses=ERRORS)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="every model's worker is running and the audit log is open", responses=ERRORS)
    async def readyz() -> JSONResponse:
        down = [n for n, b in service.batchers.items() if not b.running]
        if down or len(service.batchers) != len(service.models):
            return error_response(503, "not_ready", f"model workers not running: {down or sorted(service.models)}")
        return JSONResponse({"status": "ready", "models": sorted(service.models)})

    @app.get("/metrics", summary="Prometheus text format", response_class=Response, responses=ERRORS)
    async def metrics(request: Request) -> Response:
        authorize(request)
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", summary="the loaded models, their thresholds and provenance", responses=ERRORS)
    async def list_models(request: Request) -> dict[str, list[ModelInfo]]:
        authorize(request)
        return {"models": [ModelInfo(**m.describe()) for m in service.models.values()]}

    @app.post(
        "/v1/models/{name}/predict",
        summary="score one image and decide",
        response_model=Prediction,
        response_model_exclude_none=True,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {"image": {"type": "string", "format": "binary"}},
                        }
                    },
                },
            }
        },
    )
    async def predict(
        request: Request,
        name: str,
        overlay: bool = Query(False, description="add the heat-map overlay (PNG, base64)"),
        mask: bool = Query(False, description="add the binary defect mask (PNG, base64)"),
    ) -> JSONResponse:
        authorize(request)
        model = model_named(name)
        unknown = sorted(set(request.query_params) - PREDICT_QUERY)
        if unknown:
            raise ApiError(
                400,
                "unknown_query_parameter",
                f"unknown query parameter(s) {unknown}; accepted: {sorted(PREDICT_QUERY)}",
            )
        if service.admitted[name] >= config.max_queue:
            raise ApiError(
                503,
                "overloaded",
                f"model {name!r} has {service.admitted[name]} request(s) in progress "
                f"(limit {config.max_queue}); retry later",
                {"Retry-After": str(config.retry_after_s)},
            )
        service.admitted[name] += 1
        try:
            return await _predict(request, model, overlay, mask)
        finally:
            service.admitted[name] -= 1

    async def _predict(request: Request, model: ServedModel, overlay: bool, mask: bool) -> JSONResponse:
        name = model.name
        service.arriving[name] += 1
        try:
            body = await read_image_body(request, config)
            item, sha = await asyncio.get_running_loop().run_in_executor(
                service.decode_pool, prepare_request, model, body, config.max_pixels
            )
        except ImageTooLarge as exc:
            raise ApiError(413, "image_too_large", str(exc)) from None
        except DataError as exc:
            raise ApiError(400, "bad_image", str(exc)) from None
        finally:
            service.arriving[name] -= 1
        job = Job(item, sha, overlay=overlay, mask=mask)
        try:
            future = service.batchers[name].submit(job)
        except QueueFull as exc:
            raise ApiError(
                503, "overloaded", f"{exc}; retry later", {"Retry-After": str(config.retry_after_s)}
            ) from None
        try:
            outcome = await asyncio.wait_for(future, config.request_timeout_s)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no score within {config.request_timeout_s:g} s") from None
        except OSError as exc:
            raise ApiError(
                500,
                "audit_log_failed",
                f"the decision could not be written to the audit log ({exc.strerror or exc}); not answered",
            ) from None
        except Exception as exc:  # noqa: BLE001 - a failure of the scoring thread is the service's
            raise ApiError(500, "scoring_failed", f"{type(exc).__name__}: {exc}") from None
        if outcome.scored.decision == ERROR:
            raise ApiError(500, "model_failed", outcome.scored.error)
        return JSONResponse(answer(model, job, outcome), headers={"X-Request-ID": job.request_id})

    @app.get("/v1/decisions", summary="the latest decisions, flagged (anomalous or failed) first", responses=ERRORS)
    async def decisions(request: Request, limit: int = Query(24, ge=1, le=500)) -> dict[str, Any]:
        authorize(request)
        flagged = list(reversed(service.recent["flagged"].values()))
        normal = list(reversed(service.recent["normal"].values()))
        items = [
            {
                **r.record,
                "normal_percentile": r.scored.normal_percentile,
                "flagged": r.flagged,
                "overlay_url": f"/v1/decisions/{r.record['request_id']}/overlay.png"
                if r.scored.decision != ERROR
                else None,
            }
            for r in [*flagged, *normal][:limit]
        ]
        return {"flagged": len(flagged), "shown": len(items), "decisions": items}

    @app.get(
        "/v1/decisions/{request_id}/overlay.png",
        summary="overlay of a recent decision",
        response_class=Response,
        responses=ERRORS,
    )
    async def decision_overlay(request: Request, request_id: str) -> Response:
        authorize(request)
        recent = service.find_recent(request_id)
        if recent is None or recent.scored.decision == ERROR:
            raise ApiError(404, "unknown_decision", f"no recent decision {request_id!r} with an overlay")
        if recent.png is None:
            recent.png = await asyncio.get_running_loop().run_in_executor(
                service.decode_pool, overlay_png, recent.model, recent.scored
            )
        return Response(recent.png, media_type="image/png")

    @app.get("/", response_class=HTMLResponse, summary="the operator's page", include_in_schema=True)
    async def operator_page() -> HTMLResponse:
        return HTMLResponse(OPERATOR_PAGE, headers={"Cache-Control": "no-store"})

    return app


async def read_image_body(request: Request, config: ServeConfig) -> bytes:
    """The image bytes of a raw (``image/*``, ``application/octet-stream``) or multipart (field ``image``) body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if ctype.startswith("image/") or ctype in RAW_TYPES:
            return await asyncio.wait_for(request.body(), config.read_timeout_s)
        if ctype == "multipart/form-data":
            form = await asyncio.wait_for(
                request.form(max_files=1, max_fields=8, max_part_size=config.max_body_bytes), config.read_timeout_s
            )
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "missing_image_field", "the multipart body needs a file field named 'image'")
            return await upload.read()
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the body did not arrive within {config.read_timeout_s:g} s") from None
    except StarletteHTTPException as exc:  # malformed multipart
        raise ApiError(400, "malformed_multipart", str(exc.detail)) from None
    raise ApiError(
        415,
        "unsupported_content_type",
        f"content type {ctype or '(none)'!r} is not accepted; send the image as image/*, "
        "application/octet-stream or multipart/form-data (field 'image')",
    )


def answer(model: ServedModel, job: Job, outcome: Outcome) -> dict[str, Any]:
    """The JSON of a ``200`` (:class:`Prediction`)."""
    scored = outcome.scored
    assert scored.decision != ERROR and scored.score is not None
    body: dict[str, Any] = {
        "request_id": job.request_id,
        "model": model.name,
        "score": scored.score,
        "normalized_score": scored.normalized_score,
        "normal_percentile": scored.normal_percentile,
        "decision": scored.decision,
        "anomalous": scored.decision == "anomalous",
        "thresholds": model.thresholds,
        "model_fingerprint": model.fingerprint,
        "provenance": model.provenance,
        "image_sha256": job.sha256,
    }
    if outcome.overlay is not None:
        body["overlay_png"] = base64.b64encode(outcome.overlay).decode("ascii")
    if outcome.mask is not None:
        body["mask_png"] = base64.b64encode(outcome.mask).decode("ascii")
    return body


__all__ = ["ApiError", "create_app"]
