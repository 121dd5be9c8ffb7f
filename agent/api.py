"""The local OpenAI-compatible server: prompts and answers stay on the device.

Routes: `POST /v1/chat/completions` (JSON, or Server-Sent Events with `"stream": true`), `GET /v1/models`,
`GET /health`. It listens on 127.0.0.1 by default, logs no request bodies, and reports only counters to telemetry.
Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`, so existing clients show them as they are.
Sampling: with no `temperature` (or 0) decoding is greedy and repeatable; `seed` makes sampling repeatable.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from protocol.manifest import first_error

from .runtime import Completion, LoadedModel, Runtime


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields a local model has no use for

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


DEFAULT_MAX_TOKENS = 256
_JSON_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": ChatRequest.model_json_schema()}}}}


def error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)


def model_id(m: LoadedModel) -> str:
    return f"{m.ref.name}:v{m.ref.version}"


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="slmops local inference", version="1", docs_url="/docs", redoc_url=None)

    @app.get("/health")
    def health() -> JSONResponse:
        m = runtime.current
        body = {
            "status": "ok" if m else "no_model",
            "model": m.ref.name if m else None,
            "version": m.ref.version if m else None,
            "uptime_s": round(runtime.uptime_s, 1),
        }
        return JSONResponse(body, status_code=200 if m else 503)

    @app.get("/v1/models")
    def models() -> dict:
        m = runtime.current
        data = [{"id": model_id(m), "object": "model", "created": 0, "owned_by": "slmops"}] if m else []
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=_JSON_BODY)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        # The body is JSON whatever Content-Type says (`curl -d` sends form encoding), as OpenAI-style servers do.
        try:
            req = ChatRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return error(400, f"invalid request: {first_error(exc)}", "invalid_request_error")
        return await run_in_threadpool(_complete, req)

    def _complete(req: ChatRequest) -> JSONResponse | StreamingResponse:
        m = runtime.current
        if m is None:
            return error(503, "no model is active on this device yet; deploy a bundle from the fleet", "server_error", "no_model")
        if req.model and req.model not in (m.ref.name, model_id(m)):
            return error(404, f"model {req.model!r} is not served here; GET /v1/models lists {model_id(m)!r}", "invalid_request_error", "model_not_found")
        kw = {
            "max_tokens": req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
            "temperature": req.temperature or 0.0,
            "top_p": req.top_p,
            "seed": req.seed,
        }
        messages = [msg.model_dump() for msg in req.messages]
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        out = Completion()
        try:
            pieces = _until_stop(runtime.chat(messages, out, **kw), stops, out)
            if req.stream:
                first = next(pieces, None)  # surface prompt errors as HTTP errors, not mid-stream
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return StreamingResponse(
                    _sse(cid, created, model_id(m), first, pieces, out, include_usage), media_type="text/event-stream"
                )
            text = "".join(pieces)
        except ValueError as exc:
            return error(400, str(exc), "invalid_request_error", "context_length_exceeded")
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model_id(m),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _finish(out)}],
                "usage": _usage(out),
            }
        )

    return app


def _until_stop(pieces: Iterator[str], stops: list[str], out: Completion) -> Iterator[str]:
    """Pass text through until a stop string appears; hold back just enough to catch one split across tokens."""
    if not stops:
        yield from pieces
        return
    hold = max(len(s) for s in stops) - 1
    buf = ""
    for piece in pieces:
        buf += piece
        hits = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if hits:
            if min(hits):
                yield buf[: min(hits)]
            out.finish_reason = "stop"
            pieces.close()
            return
        if len(buf) > hold:
            yield buf[: len(buf) - hold]
            buf = buf[len(buf) - hold:]
    if buf:
        yield buf


def _finish(out: Completion) -> str:
    return "stop" if out.finish_reason == "stop" else "length"


def _usage(out: Completion) -> dict:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }


def _sse(cid: str, created: int, model: str, first: str | None, rest: Iterator[str], out: Completion, include_usage: bool) -> Iterator[bytes]:
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    yield chunk({"role": "assistant", "content": ""})
    if first:
        yield chunk({"content": first})
    for piece in rest:
        yield chunk({"content": piece})
    yield chunk({}, _finish(out))
    if include_usage:
        yield chunk({}, usage=_usage(out))
    yield b"data: [DONE]\n\n"
