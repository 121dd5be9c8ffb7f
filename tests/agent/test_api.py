"""The local OpenAI-compatible API over the real tiny int4 model (FastAPI's TestClient, no network): the routes,
structured output, logprobs, refusals with OpenAI's error shape, the guard (API key, Host, CORS), metrics and
telemetry. Serving under load, hang-ups and deadlines over real HTTP are in test_serving.py."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from agent.api import create_app
from agent.config import AgentConfig, Serving
from agent.scheduler import Scheduler
from agent.store import ModelRef
from agent.telemetry import Sampler, sample
from protocol.errors import ConfigError
from protocol.messages import Telemetry

LINE = "2026-03-02T10:14:07Z pump-17 temp=92.4C vibration=0.9g status=OVERHEAT"
ANSWER = r"^(ok|warning|fault): "
BASE = "http://127.0.0.1:8800"
SEVERITY = {
    "type": "object",
    "properties": {"severity": {"enum": ["ok", "warning", "fault"]}, "device": {"type": "string", "maxLength": 12}},
    "required": ["severity", "device"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def scheduler(tiny_int4) -> Scheduler:
    s = Scheduler(Serving()).start()
    s.swap(s.load(Path(tiny_int4), ModelRef("triage", 4)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(scheduler) -> TestClient:
    return TestClient(create_app(scheduler), base_url=BASE)


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": LINE}], **body})


def metric(client, metric_name: str, **labels) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == metric_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def assert_idle(scheduler: Scheduler) -> None:
    """The trusted state of the server after a refusal: nothing queued, nothing running, the model unchanged.
    (A worker lets go of a job just after it sent the job's last event, so allow it a moment.)"""
    deadline = time.monotonic() + 2
    while (scheduler.queued or scheduler._running) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert scheduler.queued == 0 and not scheduler._running
    assert scheduler.current is not None and scheduler.current.id == "triage:v4"


# -- routes ---------------------------------------------------------------------------------------------------
def test_health_models_and_one_model(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["triage:v4"]
    assert client.get("/v1/models/triage:v4").json()["id"] == "triage:v4"
    r = client.get("/v1/models/llama")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_completion_answers_in_the_task_format(client):
    r = chat(client, max_tokens=24)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "triage:v4"
    choice = body["choices"][0]
    assert re.match(ANSWER, choice["message"]["content"]) and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
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
    full = chat(client, max_tokens=24).json()["choices"][0]["message"]["content"]
    r = chat(client, stop=[":"]).json()
    assert r["choices"][0]["message"]["content"] == full.split(":")[0] and r["choices"][0]["finish_reason"] == "stop"
    r = chat(client, stop=[":"], stream=True)
    text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content", "")
                   for x in r.text.splitlines() if x.startswith("data: {") and '"choices": [{' in x)
    assert text == full.split(":")[0]


def test_text_parts_and_the_developer_role(client):
    plain = chat(client, max_tokens=24).json()["choices"][0]["message"]["content"]
    parts = client.post("/v1/chat/completions", json={"max_tokens": 24, "messages": [
        {"role": "user", "content": [{"type": "text", "text": LINE[:30]}, {"type": "text", "text": LINE[30:]}]}]})
    assert parts.json()["choices"][0]["message"]["content"] == plain
    as_system = client.post("/v1/chat/completions", json={"max_tokens": 24, "messages": [
        {"role": "system", "content": "Triage the log line."}, {"role": "user", "content": LINE}]}).json()
    as_developer = client.post("/v1/chat/completions", json={"max_tokens": 24, "messages": [
        {"role": "developer", "content": "Triage the log line."}, {"role": "user", "content": LINE}]}).json()
    assert as_developer["choices"] == as_system["choices"]


def test_legacy_completions_json_and_stream(client, scheduler):
    prompt = scheduler.current.prompt([{"role": "user", "content": LINE}])
    chat_text = chat(client, max_tokens=24).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == chat_text and body["usage"]["completion_tokens"] > 0
    r = client.post("/v1/completions", json={"prompt": [prompt], "max_tokens": 24, "stream": True})
    events = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == chat_text


# -- structured output and logprobs ---------------------------------------------------------------------------
LINES = [LINE, "gw-3 battery=4% status=LOW", "2026-03-02T11:00:00Z fan-2 rpm=1200 status=OK", "x" * 40]


@pytest.mark.parametrize("line", LINES)
def test_json_schema_is_enforced_while_decoding(client, line):
    fmt = {"type": "json_schema", "json_schema": {"name": "triage", "schema": SEVERITY, "strict": True}}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": line}],
                                                   "response_format": fmt, "max_tokens": 64})
    assert r.status_code == 200, r.text
    doc = json.loads(r.json()["choices"][0]["message"]["content"])
    assert set(doc) == {"severity", "device"} and doc["severity"] in ("ok", "warning", "fault")
    assert len(doc["device"]) <= 12


def test_json_object_and_streamed_json_parse(client):
    r = chat(client, response_format={"type": "json_object"}, max_tokens=64)
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SEVERITY}}
    r = chat(client, response_format=fmt, max_tokens=64, stream=True)
    text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content", "")
                   for x in r.text.splitlines() if x.startswith("data: {") and '"choices": [{' in x)
    assert json.loads(text)["severity"] in ("ok", "warning", "fault")


def test_regex_format(client):
    r = chat(client, response_format={"type": "regex", "regex": "(ok|warning|fault)-[0-9]{3}"}, max_tokens=16)
    assert re.fullmatch(r"(ok|warning|fault)-[0-9]{3}", r.json()["choices"][0]["message"]["content"])


def test_chat_logprobs_come_from_the_logits(client):
    r = chat(client, max_tokens=12, logprobs=True, top_logprobs=3).json()
    choice = r["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    for t in content:
        assert t["logprob"] <= 0 and bytes(t["bytes"]) == t["token"].encode()
        tops = [x["logprob"] for x in t["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert t["top_logprobs"][0]["token"] == t["token"] and t["top_logprobs"][0]["logprob"] == t["logprob"]  # greedy
        assert sum(2.718281828 ** x for x in tops) <= 1.0 + 1e-6
    sampled = chat(client, max_tokens=12, logprobs=True, temperature=1.5, seed=7).json()["choices"][0]["logprobs"]
    assert all(t["top_logprobs"] == [] for t in sampled["content"])


def test_completion_logprobs(client, scheduler):
    prompt = scheduler.current.prompt([{"role": "user", "content": LINE}])
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "logprobs": 2}).json()
    lp = body["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == body["choices"][0]["text"] and len(lp["token_logprobs"]) == 8
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]
    assert all(len(t) == 2 and max(t.values()) <= 0 for t in lp["top_logprobs"])


# -- refusals, each leaving the server as it was --------------------------------------------------------------
USER = [{"role": "user", "content": "x"}]
REFUSALS = [
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, None, None),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, None, None),
    ("tool role", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, None, None),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None, None),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4", "messages": USER}, 404, "model_not_found", "model"),
    ("prompt over context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 5000}]}, 400,
     "context_length_exceeded", "messages"),
    ("prompt far over context, not tokenized", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "y" * 200_000}]}, 400, "context_length_exceeded", "messages"),
    ("max_tokens over context", "/v1/chat/completions", {"messages": USER, "max_tokens": 100000}, 400,
     "context_length_exceeded", "max_tokens"),
    ("n > 1", "/v1/chat/completions", {"messages": USER, "n": 2}, 400, "unsupported_parameter", "n"),
    ("tools", "/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "unsupported_parameter", "tools"),
    ("logit_bias", "/v1/chat/completions", {"messages": USER, "logit_bias": {"5": 10}}, 400, "unsupported_parameter",
     "logit_bias"),
    ("presence_penalty", "/v1/chat/completions", {"messages": USER, "presence_penalty": 0.5}, 400,
     "unsupported_parameter", "presence_penalty"),
    ("frequency_penalty", "/v1/chat/completions", {"messages": USER, "frequency_penalty": 1}, 400,
     "unsupported_parameter", "frequency_penalty"),
    ("unknown field", "/v1/chat/completions", {"messages": USER, "temprature": 1}, 400, "unsupported_parameter",
     "temprature"),
    ("top_logprobs alone", "/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, 400, None, "top_logprobs"),
    ("top_logprobs > 20", "/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, None,
     None),
    ("five stop strings", "/v1/chat/completions", {"messages": USER, "stop": list("abcde")}, 400, None, "stop"),
    ("bad response_format", "/v1/chat/completions", {"messages": USER, "response_format": {"type": "xml"}}, 400, None,
     None),
    ("json_schema without schema", "/v1/chat/completions",
     {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, None,
     "response_format"),
    ("schema it cannot enforce", "/v1/chat/completions",
     {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
         "name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}}, 400, "invalid_response_format",
     "response_format"),
    ("seed beyond 64 bits", "/v1/chat/completions", {"messages": USER, "seed": 1 << 70}, 400, None, None),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, None, "prompt"),
    ("echo", "/v1/completions", {"prompt": "a", "echo": True}, 400, "unsupported_parameter", "echo"),
    ("best_of", "/v1/completions", {"prompt": "a", "best_of": 3}, 400, "unsupported_parameter", "best_of"),
    ("suffix", "/v1/completions", {"prompt": "a", "suffix": "z"}, 400, "unsupported_parameter", "suffix"),
    ("completion logprobs > 5", "/v1/completions", {"prompt": "a", "logprobs": 6}, 400, None, None),
]


@pytest.mark.parametrize("case, route, body, status, code, param", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_problem_and_change_nothing(client, scheduler, case, route, body, status, code, param):
    before = metric(client, "slmops_agent_prompt_tokens_total")
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert_idle(scheduler)
    assert metric(client, "slmops_agent_prompt_tokens_total") == before  # nothing was computed
    assert re.match(ANSWER, chat(client, max_tokens=24).json()["choices"][0]["message"]["content"])


def test_neutral_values_of_unimplemented_fields_are_accepted(client):
    r = chat(client, max_tokens=8, n=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, user="u-1",
             tool_choice="none", tools=[])
    assert r.status_code == 200


def test_unknown_routes_and_wrong_methods_get_openai_errors(client):
    for r, status, code in [(client.get("/v1/nothing"), 404, "not_found"),
                            (client.put("/v1/models"), 405, "method_not_allowed"),
                            (client.get("/v1/chat/completions"), 405, "method_not_allowed")]:
        assert r.status_code == status and r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_body_must_be_json_and_not_too_large(client, scheduler):
    body = json.dumps({"messages": [{"role": "user", "content": LINE}], "max_tokens": 4})
    form = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    plain = client.post("/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert plain.status_code == 415
    assert client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    broken = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "invalid request" in broken.json()["error"]["message"]
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(40):
            yield b" " * 65536

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert_idle(scheduler)


def test_no_model_yet_is_a_503():
    s = Scheduler()
    c = TestClient(create_app(s), base_url=BASE)
    assert c.get("/health").status_code == 503
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_model"
    assert c.get("/v1/models").json()["data"] == []


# -- the guard ------------------------------------------------------------------------------------------------
KEY = "k-0123456789abcdef"
TRUST = {"trust_root": Path("root.json"), "bundle_origins": ("http://127.0.0.1:8700",)}  # checked when the agent starts


@pytest.fixture(scope="module")
def guarded(tiny_int4) -> TestClient:
    s = Scheduler(Serving(api_key=KEY, allowed_hosts=("pump-17.local",), cors_origins=("http://dash.local",))).start()
    s.swap(s.load(Path(tiny_int4), ModelRef("triage", 4)))
    yield TestClient(create_app(s), base_url=BASE)
    s.stop()


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-0123456789", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"])
def test_api_key_is_required_when_set(guarded, auth):
    headers = {"authorization": auth} if auth else {}
    for r in (guarded.post("/v1/chat/completions", json={"messages": USER}, headers=headers),
              guarded.get("/v1/models", headers=headers), guarded.get("/metrics", headers=headers)):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert guarded.get("/health").status_code == 200  # liveness stays open


def test_the_right_key_opens_every_route(guarded):
    h = {"authorization": f"Bearer {KEY}"}
    assert guarded.get("/v1/models", headers=h).status_code == 200
    assert guarded.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4}, headers=h).status_code == 200
    assert guarded.get("/metrics", headers=h).status_code == 200


@pytest.mark.parametrize("host, ok", [("127.0.0.1:8800", True), ("localhost", True), ("[::1]:8800", True),
                                      ("pump-17.local:8800", True), ("attacker.example", False),
                                      ("127.0.0.1.attacker.example", False), ("", False)])
def test_host_header_allow_list(guarded, host, ok):
    r = guarded.get("/v1/models", headers={"host": host, "authorization": f"Bearer {KEY}"})
    assert r.status_code == (200 if ok else 403)
    if not ok:
        assert r.json()["error"]["code"] == "host_not_allowed"


def test_cors_is_off_by_default_and_configurable(client, guarded):
    pre = {"origin": "http://dash.local", "access-control-request-method": "POST",
           "access-control-request-headers": "content-type,authorization"}
    assert "access-control-allow-origin" not in client.options("/v1/chat/completions", headers=pre).headers
    r = guarded.options("/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://dash.local"
    other = guarded.options("/v1/chat/completions", headers={**pre, "origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_listening_beyond_loopback_needs_an_api_key(tmp_path):
    with pytest.raises(ConfigError, match="API key"):
        AgentConfig(device_id="d-1", data_dir=tmp_path, api_host="0.0.0.0", **TRUST)
    AgentConfig(device_id="d-1", data_dir=tmp_path, api_host="0.0.0.0", serving=Serving(api_key=KEY), **TRUST)
    with pytest.raises(ConfigError):
        Serving(api_key="short")


# -- metrics and telemetry ------------------------------------------------------------------------------------
def test_metrics_count_requests_tokens_and_latency(client):
    ok = metric(client, "slmops_agent_requests_total", route="/v1/chat/completions", status="200")
    bad = metric(client, "slmops_agent_requests_total", route="/v1/chat/completions", status="400")
    tokens = metric(client, "slmops_agent_completion_tokens_total")
    ttft = metric(client, "slmops_agent_time_to_first_token_seconds_count")
    used = chat(client, max_tokens=8).json()["usage"]
    chat(client, n=3)
    assert metric(client, "slmops_agent_requests_total", route="/v1/chat/completions", status="200") == ok + 1
    assert metric(client, "slmops_agent_requests_total", route="/v1/chat/completions", status="400") == bad + 1
    assert metric(client, "slmops_agent_completion_tokens_total") == tokens + used["completion_tokens"]
    assert metric(client, "slmops_agent_time_to_first_token_seconds_count") == ttft + 1
    assert metric(client, "slmops_agent_inter_token_latency_seconds_count") > 0
    assert metric(client, "slmops_agent_tokens_per_second") > 0
    assert metric(client, "slmops_agent_model_info", name="triage", version="4") == 1
    assert metric(client, "slmops_agent_queue_depth") == 0
    other = metric(client, "slmops_agent_requests_total", route="other", status="404")
    client.get("/no/such/route/x1")
    assert metric(client, "slmops_agent_requests_total", route="other", status="404") == other + 1  # bounded labels


def test_telemetry_reads_the_same_counters_and_carries_no_text(client, scheduler):
    before = sample("dev-1", scheduler, seq=1)
    chat(client, max_tokens=8)
    after = sample("dev-1", scheduler, seq=2)
    assert after.requests_total == before.requests_total + 1
    assert after.tokens_generated_total == metric(client, "slmops_agent_completion_tokens_total")
    assert after.tokens_per_s > 0 and after.active.version == 4 and after.memory_rss_mb > 10
    wire = after.model_dump_json()
    assert LINE not in wire and "pump-17" not in wire


def test_sampler_publishes_periodically(scheduler):
    got: list[Telemetry] = []
    s = Sampler(0.05, lambda: sample("dev-1", scheduler, seq=len(got) + 1), got.append)
    s.start()
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.stop()
    assert len(got) >= 3 and [t.seq for t in got[:3]] == [1, 2, 3]


def test_streamed_logprobs_match_the_text_on_both_routes(client, scheduler):
    r = chat(client, max_tokens=12, stream=True, logprobs=True, top_logprobs=1)
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    pieces = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert "".join(t["token"] for p in pieces for t in p["logprobs"]["content"]) == "".join(p["delta"]["content"] for p in pieces)
    prompt = scheduler.current.prompt([{"role": "user", "content": LINE}])
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "logprobs": 1, "stream": True})
    choices = [json.loads(x[6:])["choices"][0] for x in r.text.splitlines() if x.startswith("data: {")]
    with_lp = [c for c in choices if c["logprobs"]]
    tokens = [t for c in with_lp for t in c["logprobs"]["tokens"]]
    offsets = [o for c in with_lp for o in c["logprobs"]["text_offset"]]
    text = "".join(c["text"] for c in choices)
    assert "".join(tokens) == text and len(tokens) == 12
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
