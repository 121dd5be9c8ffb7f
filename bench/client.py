"""HTTP client side of the benchmark: one OpenAI-style chat request to the agent, timed.

Workflow: `chat(client, url, messages, max_tokens, stream, t0=...)` POSTs /v1/chat/completions with
`Content-Type: application/json`; streaming requests read the Server-Sent Events line by line, note the first
chunk with text (time to first token) and the chunk carrying `finish_reason` (end of generation), and take the
token count from the usage chunk (`stream_options.include_usage`); non-streaming requests time the whole answer
and read `usage.completion_tokens`. A connection the server closed while idle (keep-alive expiry) is retried once.
"""

from __future__ import annotations

import json
import time

import httpx

from .sample import Sample

HEADERS = {"Content-Type": "application/json"}


class AgentError(RuntimeError):
    """The agent answered with an error status or an answer the benchmark cannot read."""


def new_client() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(900.0, connect=10.0), headers=HEADERS)


def _body(messages: list[dict], max_tokens: int, stream: bool) -> bytes:
    body: dict = {"messages": messages, "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _stream(client: httpx.Client, url: str, body: bytes, t0: float) -> Sample:
    first = end = None
    tokens, chars = None, 0
    with client.stream("POST", f"{url}/v1/chat/completions", content=body) as resp:
        if resp.status_code != 200:
            raise AgentError(f"agent answered {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") or ""
                if text:
                    chars += len(text)
                    if first is None:
                        first = now
                if choice.get("finish_reason"):
                    end = now
    end = end or time.perf_counter()
    if tokens is None:
        raise AgentError("the stream carried no usage chunk (stream_options.include_usage)")
    return Sample(None if first is None else first - t0, end - t0, tokens, chars)


def _json(client: httpx.Client, url: str, body: bytes, t0: float) -> Sample:
    resp = client.post(f"{url}/v1/chat/completions", content=body)
    end = time.perf_counter()
    if resp.status_code != 200:
        raise AgentError(f"agent answered {resp.status_code}: {resp.text[:300]}")
    answer = resp.json()
    text = answer["choices"][0]["message"]["content"]
    return Sample(None, end - t0, answer["usage"]["completion_tokens"], len(text))


def chat(client: httpx.Client, url: str, messages: list[dict], max_tokens: int, *, stream: bool,
         t0: float | None = None) -> Sample:
    """One timed request; `t0` defaults to now."""
    body = _body(messages, max_tokens, stream)
    for attempt in (1, 2):
        start = time.perf_counter() if t0 is None else t0
        try:
            return (_stream if stream else _json)(client, url, body, start)
        except (httpx.RemoteProtocolError, httpx.ConnectError):
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
