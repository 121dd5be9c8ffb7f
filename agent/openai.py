"""The OpenAI wire format, as pure functions: requests in, internal `Sampling` out, results back to OpenAI shapes.

Workflow: `agent/api.py` parses a body into `ChatRequest` or `CompletionRequest`, calls `refusal(req)` (a field
this server does not implement, with a value that would change the answer, is named in a 400: never a silent
ignore), `guidance(req.response_format)` (JSON mode and JSON schemas become llguidance constraints enforced while
decoding) and `budget(...)` (max_tokens against the context, with the numbers), then turns scheduler events into
`chat_response` / `chat_chunk` / `completion_response` / `completion_chunk` bodies. `error_body` is OpenAI's error
shape, used for every error the server sends.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .runtime import Completion, LoadedModel, Step

MAX_SCHEMA_BYTES = 64 * 1024  # bytes: a larger JSON schema or grammar is refused
MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_CHARS_PER_TOKEN = 64  # characters: a prompt longer than context x this is refused without tokenizing it
MAX_TOP_LOGPROBS = 20  # chat; the legacy completions route allows 5, as OpenAI does

# Fields a client may send that change nothing here: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})
# Fields we do not implement: accepted only with the value that means "not used".
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "best_of": (1, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": ({}, None),
    "tools": ([], None),
    "tool_choice": ("none", None),
    "functions": ([], None),
    "function_call": ("none", None),
    "parallel_tool_calls": (None, False, True),
    "modalities": (["text"], None),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "echo": (False, None),
    "suffix": (None, ""),
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name": nothing to do with it here
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = Field(default="answer", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = Field(default=None, max_length=4096)  # slmops extension: {"type": "regex", "regex": "..."}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # anything unknown is named in a 400 by refusal()

    model: str | None = Field(default=None, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role; chat templates know "system"
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=16, ge=1, le=1 << 20)  # OpenAI's default for this route

    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    def top(self) -> int | None:
        return self.logprobs

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class RequestError(Exception):
    """A request this server refuses, with the HTTP status, OpenAI error type, code and parameter."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.type = status, code, param, type_


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def refusal(req: _Common) -> None:
    """Raise RequestError for a field this server does not implement (unless its value means "not used")."""
    for name, value in (req.model_extra or {}).items():
        if name in IGNORED:
            continue
        if name in NEUTRAL and value in NEUTRAL[name]:
            continue
        what = "is not supported by this server" if name in NEUTRAL else "is not a field this server knows"
        raise RequestError(f"'{name}' {what}; remove it (or send its default) and try again",
                           code="unsupported_parameter", param=name)
    stops = req.stops()
    if len(stops) > MAX_STOPS or any(len(s) > 256 for s in stops):
        raise RequestError(f"at most {MAX_STOPS} stop strings of up to 256 characters each", param="stop")
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    if isinstance(req, CompletionRequest) and isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise RequestError("one prompt per request (a list of several prompts is not supported)", param="prompt")


def guidance(fmt: ResponseFormat | None) -> tuple[str, str] | None:
    """The llguidance constraint for a response_format, or None for free text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "regex":
        if not fmt.regex:
            raise RequestError("response_format regex needs a 'regex' pattern", param="response_format")
        return "regex", fmt.regex
    if fmt.type == "json_object":
        schema: dict[str, Any] = {"type": "object"}
    else:
        if fmt.json_schema is None or not fmt.json_schema.schema_:
            raise RequestError("response_format json_schema needs json_schema.schema", param="response_format")
        schema = dict(fmt.json_schema.schema_)
    # llguidance allows free whitespace between JSON tokens by default; a small model can pad forever with it
    schema.setdefault("x-guidance", {"whitespace_flexible": False})
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise RequestError(f"the JSON schema is {len(text)} bytes; at most {MAX_SCHEMA_BYTES}", param="response_format")
    return "json_schema", text


def check_prompt_chars(model: LoadedModel, messages: list[dict]) -> None:
    """Refuse, before tokenizing it on the event loop, a prompt far longer than any context could hold."""
    chars = sum(len(m["content"]) for m in messages)
    if chars > model.context_length * MAX_CHARS_PER_TOKEN:
        raise RequestError(
            f"the prompt has {chars} characters; this model's context holds {model.context_length} tokens",
            code="context_length_exceeded", param="messages")


def budget(model: LoadedModel, prompt_tokens: int, wanted: int | None, default: int) -> int:
    """The answer's token budget, or a 400 with the numbers when prompt and answer cannot fit the context."""
    room = model.context_length - prompt_tokens
    if room < 1:
        raise RequestError(
            f"the prompt is {prompt_tokens} tokens; this model's context holds {model.context_length}",
            code="context_length_exceeded", param="messages")
    if wanted is None:
        return min(default, room)
    if wanted > room:
        raise RequestError(
            f"max_tokens is {wanted} but the prompt is {prompt_tokens} tokens and this model's context holds "
            f"{model.context_length}: at most {room} tokens are left for the answer",
            code="context_length_exceeded", param="max_tokens")
    return wanted


def finish(out: Completion) -> str:
    return "stop" if out.finish_reason == "stop" else "length"


def usage(out: Completion) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _token(model: LoadedModel, token: int, logprob: float) -> dict:
    text = model.token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(model: LoadedModel, steps: list[Step] | tuple[Step, ...]) -> dict:
    content = []
    for s in steps:
        entry = _token(model, s.token, s.logprob if s.logprob is not None else 0.0)
        entry["top_logprobs"] = [_token(model, t, lp) for t, lp in s.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(model: LoadedModel, steps: list[Step] | tuple[Step, ...], offset: int = 0) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for s in steps:
        text = model.token_text(s.token)
        tokens.append(text)
        lps.append(s.logprob)
        tops.append({model.token_text(t): lp for t, lp in s.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def model_card(model: LoadedModel) -> dict:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": "slmops"}


def chat_response(cid: str, created: int, model: LoadedModel, out: Completion, logprobs: dict | None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": out.text, "refusal": None},
              "logprobs": logprobs, "finish_reason": finish(out)}
    return {"id": cid, "object": "chat.completion", "created": created, "model": model.id,
            "choices": [choice], "usage": usage(out)}


def chat_chunk(cid: str, created: int, model: str, delta: dict | None, *, finish_reason: str | None = None,
               logprobs: dict | None = None, usage_: dict | None = None) -> dict:
    body: dict = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": []}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    if usage_ is not None:
        body["usage"] = usage_
    return body


def completion_response(cid: str, created: int, model: LoadedModel, out: Completion, logprobs: dict | None) -> dict:
    choice = {"index": 0, "text": out.text, "logprobs": logprobs, "finish_reason": finish(out)}
    return {"id": cid, "object": "text_completion", "created": created, "model": model.id,
            "choices": [choice], "usage": usage(out)}


def completion_chunk(cid: str, created: int, model: str, text: str | None, *, finish_reason: str | None = None,
                     logprobs: dict | None = None, usage_: dict | None = None) -> dict:
    body: dict = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": []}
    if text is not None:
        body["choices"] = [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
    if usage_ is not None:
        body["usage"] = usage_
    return body


class ChatStream:
    """The chunks of one streamed chat answer (`chat.completion.chunk`), as dicts."""

    def __init__(self, cid: str, created: int, model: LoadedModel, logprobs: bool) -> None:
        self.cid, self.created, self.model, self.logprobs = cid, created, model, logprobs

    def opening(self) -> dict | None:
        return chat_chunk(self.cid, self.created, self.model.id, {"role": "assistant", "content": ""})

    def piece(self, text: str, steps: tuple[Step, ...]) -> dict:
        lp = chat_logprobs(self.model, steps) if self.logprobs else None
        return chat_chunk(self.cid, self.created, self.model.id, {"content": text}, logprobs=lp)

    def closing(self, out: Completion) -> dict:
        return chat_chunk(self.cid, self.created, self.model.id, {}, finish_reason=finish(out))

    def usage(self, out: Completion) -> dict:
        return chat_chunk(self.cid, self.created, self.model.id, None, usage_=usage(out))


class CompletionStream:
    """The chunks of one streamed legacy completion (`text_completion`), as dicts."""

    def __init__(self, cid: str, created: int, model: LoadedModel, logprobs: bool) -> None:
        self.cid, self.created, self.model, self.logprobs = cid, created, model, logprobs
        self.offset = 0  # characters sent so far, for logprobs' text_offset

    def opening(self) -> dict | None:
        return None

    def piece(self, text: str, steps: tuple[Step, ...]) -> dict:
        lp = completion_logprobs(self.model, steps, self.offset) if self.logprobs else None
        self.offset += len(text)
        return completion_chunk(self.cid, self.created, self.model.id, text, logprobs=lp)

    def closing(self, out: Completion) -> dict:
        return completion_chunk(self.cid, self.created, self.model.id, "", finish_reason=finish(out))

    def usage(self, out: Completion) -> dict:
        return completion_chunk(self.cid, self.created, self.model.id, None, usage_=usage(out))
