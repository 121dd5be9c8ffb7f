"""The local OpenAI-compatible API over the real tiny int4 model (FastAPI's TestClient, no network)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agent.api import create_app
from agent.runtime import LoadedModel, Runtime
from agent.store import ModelRef
from agent.telemetry import Sampler, sample
from protocol.messages import Telemetry

LINE = "2026-03-02T10:14:07Z pump-17 temp=92.4C vibration=0.9g status=OVERHEAT"
ANSWER = r"^(ok|warning|fault): "


@pytest.fixture(scope="module")
def runtime(tiny_int4) -> Runtime:
    rt = Runtime()
    rt.swap(LoadedModel.load(Path(tiny_int4), ModelRef("triage", 4)))
    return rt


@pytest.fixture(scope="module")
def client(runtime) -> TestClient:
    return TestClient(create_app(runtime))


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": LINE}], **body})


def test_health_and_models(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["triage:v4"]


def test_completion_answers_in_the_task_format(client):
    r = chat(client, max_tokens=24)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "triage:v4"
    choice = body["choices"][0]
    assert re.match(ANSWER, choice["message"]["content"]) and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert chat(client, max_tokens=24).json()["choices"][0]["message"] == choice["message"]  # greedy: repeatable


def test_streaming_sends_the_same_text_as_sse(client):
    whole = chat(client, max_tokens=24).json()["choices"][0]["message"]["content"]
    r = chat(client, max_tokens=24, stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_max_tokens_and_stop(client):
    r = chat(client, max_tokens=1).json()
    assert r["usage"]["completion_tokens"] == 1 and r["choices"][0]["finish_reason"] == "length"
    r = chat(client, stop=[":"]).json()
    assert ":" not in r["choices"][0]["message"]["content"] and r["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"messages": []}, 400, None),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, None),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
        ({"messages": [{"role": "user", "content": "x " * 5000}]}, 400, "context_length_exceeded"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(client, body, status, code):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["code"] == code


def test_no_model_yet_is_a_503():
    c = TestClient(create_app(Runtime()))
    assert c.get("/health").status_code == 503
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_model"


def test_telemetry_counts_requests_and_carries_no_text(client, runtime):
    before = sample("dev-1", runtime, seq=1)
    chat(client, max_tokens=8)
    after = sample("dev-1", runtime, seq=2)
    assert after.requests_total == before.requests_total + 1
    assert after.tokens_generated_total > before.tokens_generated_total and after.tokens_per_s > 0
    assert after.active.version == 4 and after.memory_rss_mb > 10
    wire = after.model_dump_json()
    assert LINE not in wire and "pump-17" not in wire


def test_sampler_publishes_periodically(runtime):
    got: list[Telemetry] = []
    s = Sampler(0.05, lambda: sample("dev-1", runtime, seq=len(got) + 1), got.append)
    s.start()
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.stop()
    assert len(got) >= 3 and [t.seq for t in got[:3]] == [1, 2, 3]


def test_body_is_read_as_json_whatever_the_content_type(client):
    body = json.dumps({"messages": [{"role": "user", "content": LINE}], "max_tokens": 4})
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid request" in r.json()["error"]["message"]
