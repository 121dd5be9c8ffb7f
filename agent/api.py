"""The local OpenAI-compatible server: prompts and answers stay on the device.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON, or Server-Sent Events with `"stream": true`),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus).

Workflow of a generation request: the guard (an ASGI middleware) checks the Host header against the allow-list
(DNS rebinding) and the API key, and counts the request by route and status; the handler reads at most
`max_body_bytes` of `application/json`, turns it into the internal request with the pure functions of
agent/openai.py, tokenizes it on the model served at that moment, and hands it to the scheduler, which queues it or
refuses it at once (429). The handler then awaits the scheduler's events, holding no thread: a watcher cancels the
job when the client hangs up or its deadline passes. `/health`, `/metrics` and `/v1/models` never touch the
generation path. Every error, unknown routes and wrong methods included, has OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from protocol.manifest import first_error

from . import openai as oa
from .config import LOOPBACK_HOSTS, Serving
from .metrics import CONTENT_TYPE
from .runtime import GuidanceError, LoadedModel, ModelNotLoaded, Sampling
from .scheduler import DeadlineExceeded, Failed, Job, Piece, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("slmops.agent.api")
OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json"})  # answered without the API key
ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/docs", "/openapi.json"})
_JSON = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}


def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
          param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(oa.error_body(message, type_, code, param), status_code=status, headers=headers)


class Guard:
    """ASGI middleware: Host allow-list, API key, and request counts by route and status."""

    def __init__(self, app, *, hosts: frozenset[str], api_key: str | None, count: Callable[[str, int], None]) -> None:
        self.app, self.hosts, self.key, self.count = app, hosts, api_key, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        status = 500

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refused = self._refuse(scope, path)
            if refused is not None:
                await refused(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.count(route, status)

    def _refuse(self, scope, path: str) -> JSONResponse | None:
        headers = {k.lower(): v for k, v in scope["headers"]}
        host = _hostname(headers.get(b"host", b"").decode("latin-1"))
        if host not in self.hosts:
            return error(403, f"Host {host!r} is not allowed; start the agent with --allowed-host to add it",
                         "permission_error", "host_not_allowed")
        if self.key is None or path in OPEN_PATHS or scope["method"] == "OPTIONS":
            return None
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key.encode()):
            log.warning("refused a request to %s without a valid API key", path[:100])
            return error(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                         "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(scheduler: Scheduler, serving: Serving | None = None, *, bind_host: str = "127.0.0.1") -> FastAPI:
    serving = serving or scheduler.serving
    metrics = scheduler.metrics
    app = FastAPI(title="slmops local inference", version="1", docs_url="/docs", redoc_url=None)
    if serving.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(serving.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    hosts = frozenset({*LOOPBACK_HOSTS, bind_host.lower(), *(h.lower() for h in serving.allowed_hosts)})
    app.add_middleware(Guard, hosts=hosts, api_key=serving.api_key,
                       count=lambda route, status: metrics.requests.labels(route, str(status)).inc())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        text = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error(exc.status_code, text.get(exc.status_code, str(exc.detail)), code=code,
                     headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, f"invalid request: {exc.errors()[0].get('msg', 'bad value') if exc.errors() else ''}")

    @app.get("/health")
    async def health() -> JSONResponse:
        m = scheduler.current
        body = {"status": "ok" if m else "no_model", "model": m.ref.name if m else None,
                "version": m.ref.version if m else None, "uptime_s": round(scheduler.uptime_s, 1),
                "queued": scheduler.queued}
        return JSONResponse(body, status_code=200 if m else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        m = scheduler.current
        return {"object": "list", "data": [oa.model_card(m)] if m else []}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        m = scheduler.current
        if m is None or model_id not in (m.id, m.ref.name):
            return error(404, f"model {model_id[:100]!r} is not served here", code="model_not_found", param="model")
        return JSONResponse(oa.model_card(m))

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=_JSON)
    async def chat(request: Request) -> Response:
        return await _serve(request, oa.ChatRequest)

    @app.post("/v1/completions", response_model=None, openapi_extra=_JSON)
    async def completions(request: Request) -> Response:
        return await _serve(request, oa.CompletionRequest)

    async def _serve(request: Request, kind: type[oa.ChatRequest] | type[oa.CompletionRequest]) -> Response:
        try:
            req = kind.model_validate_json(await _body(request, serving.max_body_bytes))
            oa.refusal(req)
            m = scheduler.model()
            if req.model and req.model not in (m.ref.name, m.id):
                raise oa.RequestError(f"model {req.model[:100]!r} is not served here; GET /v1/models lists {m.id!r}",
                                      status=404, code="model_not_found", param="model")
            scheduler.admit_check()
            chat_mode = isinstance(req, oa.ChatRequest)
            oa.check_prompt_chars(m, req.chat() if chat_mode else [{"content": req.text()}])
            ids = m.prompt_ids(req.chat()) if chat_mode else m.text_ids(req.text())
            sampling = Sampling(
                max_tokens=oa.budget(m, len(ids), req.wanted_tokens(), serving.default_max_tokens),
                temperature=req.temperature or 0.0, top_p=req.top_p, seed=req.seed,
                guidance=oa.guidance(req.response_format) if chat_mode else None, top_logprobs=req.top(),
            )
            job = scheduler.submit(m, ids, sampling, req.stops(), stream=req.stream)
        except ValidationError as exc:
            return error(400, f"invalid request: {first_error(exc)}")
        except ClientDisconnect:
            return Response(status_code=400)  # the client left while sending its body; nobody reads this
        except oa.RequestError as exc:
            return error(exc.status, str(exc), exc.type, exc.code, exc.param)
        except ModelNotLoaded as exc:
            return error(503, str(exc), "server_error", "no_model")
        except QueueFull as exc:
            return error(429, f"the model is busy: {exc}; retry after {exc.retry_after_s}s", "rate_limit_error",
                         "queue_full", headers={"Retry-After": str(exc.retry_after_s)})
        except ShuttingDown as exc:
            return error(503, str(exc), "server_error", "shutting_down")
        return await _answer(request, job, req, m)

    async def _answer(request: Request, job: Job, req, m: LoadedModel) -> Response:
        watcher = asyncio.create_task(_watch(request, job, serving.request_timeout_s))
        events = job.events()
        chat_mode = isinstance(req, oa.ChatRequest)
        try:
            first = await anext(events)
            if isinstance(first, Failed):
                return _failure(first.error)
            if req.stream:
                watcher.cancel()  # from here Starlette's StreamingResponse watches for the hang-up
                shape = oa.ChatStream if chat_mode else oa.CompletionStream
                chunks = shape(*_ids("chatcmpl" if chat_mode else "cmpl"), m, job.sampling.top_logprobs is not None)
                stream = _stream(job, events, first, chunks, bool(req.stream_options and req.stream_options.include_usage))
                return StreamingResponse(stream, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            steps, event = [], first
            while isinstance(event, Piece):
                steps.extend(event.steps)
                event = await anext(events)
            if isinstance(event, Failed):
                return _failure(event.error)
            cid, created = _ids("chatcmpl" if chat_mode else "cmpl")
            want_lp = job.sampling.top_logprobs is not None
            if chat_mode:
                lp = oa.chat_logprobs(m, steps) if want_lp else None
                return JSONResponse(oa.chat_response(cid, created, m, event.completion, lp),
                                    background=BackgroundTask(job.delivered.set))
            lp = oa.completion_logprobs(m, steps) if want_lp else None
            return JSONResponse(oa.completion_response(cid, created, m, event.completion, lp),
                                background=BackgroundTask(job.delivered.set))
        except asyncio.CancelledError:
            job.cancel("client_gone")
            raise
        finally:
            if not req.stream:
                watcher.cancel()

    return app


async def _body(request: Request, limit: int) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise oa.RequestError(f"the body must be JSON sent as 'Content-Type: application/json', not {ctype[:60]!r}",
                              status=415, code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and len(declared) < 19 and int(declared) > limit:
        raise oa.RequestError(f"the body is {declared} bytes; this server takes at most {limit}", status=413,
                              code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise oa.RequestError(f"the body is over {limit} bytes; this server takes at most {limit}", status=413,
                                  code="request_too_large")
    return bytes(body)


async def _watch(request: Request, job: Job, timeout_s: float) -> None:
    """Cancel `job` when its client hangs up or its deadline passes."""
    try:
        async with asyncio.timeout(timeout_s):
            while (await request.receive())["type"] != "http.disconnect":
                pass
        job.cancel("client_gone")
    except TimeoutError:
        job.cancel("deadline")


def _failure(exc: Exception) -> JSONResponse:
    if isinstance(exc, GuidanceError):
        return error(400, str(exc), code=exc.code, param="response_format")
    if isinstance(exc, ValueError):
        return error(400, str(exc), code="invalid_prompt")
    if isinstance(exc, DeadlineExceeded):
        return error(503, str(exc), "server_error", "timeout", headers={"Retry-After": "5"})
    if isinstance(exc, ShuttingDown):
        return error(503, str(exc), "server_error", "shutting_down")
    log.error("generation failed: %s: %s", type(exc).__name__, str(exc)[:300])
    return error(500, f"generation failed: {type(exc).__name__}", "server_error", "generation_failed")


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())


def _sse(body: Any) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


async def _stream(job: Job, events: AsyncIterator, first, chunks, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-Sent Events for one answer: `chunks` (openai.ChatStream or CompletionStream) shapes each event."""
    want_lp = job.sampling.top_logprobs is not None
    try:
        if (opening := chunks.opening()) is not None:
            yield _sse(opening)
        event = first
        while isinstance(event, Piece):
            if event.text or (want_lp and event.steps):
                yield _sse(chunks.piece(event.text, event.steps))
                job.first_sent.set()
                await asyncio.sleep(0)  # let a hang-up be noticed even while events are queued up
            event = await anext(events)
        if isinstance(event, Failed):
            yield _sse(json.loads(_failure(event.error).body))
            return
        yield _sse(chunks.closing(event.completion))
        if include_usage:
            yield _sse(chunks.usage(event.completion))
        yield b"data: [DONE]\n\n"
    finally:
        job.first_sent.set()
        job.delivered.set()
        job.cancel("client_gone")  # no-op when finished; otherwise the client went away mid-answer
