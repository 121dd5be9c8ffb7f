"""The local API under real clients over real HTTP: the real agent process (`slmops agent run`, real
onnxruntime-genai) on a loopback port; clients that hang up, 200 clients at once, deadlines, and the official
`openai` client on every route.

The "slow" model (random weights, about 25 times the tiny one) makes an answer last seconds, so a request that
was not cancelled would visibly hold the model."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.store import ModelRef, Store
from tests.net import free_port
from tests.trustkit import ORIGIN, TrustKit

pytestmark = pytest.mark.integration
LONG = {"messages": [{"role": "user", "content": "gw-3 battery=4% status=LOW"}], "max_tokens": 3000}
SHORT = {"messages": [{"role": "user", "content": "gw-3 battery=4% status=LOW"}], "max_tokens": 8}
KEY = "k-0123456789abcdef"


class Server:
    """The real agent (`slmops agent run`) in its own process, serving `folder` as its active model, no broker."""

    def __init__(self, folder: Path, tmp: Path, *args: str, name: str = "slow") -> None:
        data = tmp / "agent"
        store = Store(data)
        shutil.copytree(folder, tmp / "model")
        store.install(tmp / "model", ModelRef(name, 1))
        store.switch(ModelRef(name, 1))
        root = TrustKit().write_root(tmp / "root.json")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.headers = {"authorization": f"Bearer {KEY}"} if "--api-key" in args else {}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slmops.cli", "agent", "run", "--device-id", "serve-1", "--data-dir", str(data),
             "--trust-root", str(root), "--bundle-origin", ORIGIN, "--broker", f"mqtt://127.0.0.1:{free_port()}",
             "--api-port", str(port), "--telemetry-interval", "3600", "--log-level", "WARNING", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"agent exited: {self.proc.stderr.read()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.1)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def wait_metric(self, name: str, value: float, timeout: float = 5.0, **labels) -> float:
        deadline = time.monotonic() + timeout
        while (got := self.metric(name, **labels)) < value and time.monotonic() < deadline:
            time.sleep(0.02)
        return got

    def idle(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.metric("slmops_agent_queue_depth") or self.metric("slmops_agent_generations_running"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.returncode in (0, -15), self.proc.stderr.read()[-2000:]


@pytest.fixture(scope="module")
def slow(slow_int4, tmp_path_factory):
    s = Server(Path(slow_int4), tmp_path_factory.mktemp("slow"), "--queue-size", "16")
    yield s
    s.close()


@pytest.fixture
def quiet(slow):
    """Each test starts and ends with the model free."""
    assert slow.idle()
    yield slow
    assert slow.idle(), "a request still holds the model"


def timed_short(server: Server) -> float:
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/chat/completions", json=SHORT, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    return time.monotonic() - started


def assert_long_answer_is_long(server: Server) -> None:
    """The hang-up tests mean something only if the long answer would take seconds."""
    per_token = 1 / max(server.metric("slmops_agent_tokens_per_second"), 1e-9)
    assert per_token * LONG["max_tokens"] > 3, f"{per_token * 1000:.2f} ms per token is too fast for this test"


# -- clients that go away -------------------------------------------------------------------------------------
def test_hang_up_mid_stream_with_httpx_frees_the_model(quiet):
    gone = quiet.metric("slmops_agent_requests_cancelled_total", reason="client_gone")
    tokens = quiet.metric("slmops_agent_completion_tokens_total")
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{quiet.url}/v1/chat/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 3
    assert timed_short(quiet) < 1.0
    assert quiet.wait_metric("slmops_agent_requests_cancelled_total", gone + 1, reason="client_gone") == gone + 1
    assert quiet.metric("slmops_agent_completion_tokens_total") - tokens < LONG["max_tokens"] / 2  # stopped early
    assert_long_answer_is_long(quiet)


def test_hang_up_mid_stream_with_the_openai_client_frees_the_model(quiet):
    gone = quiet.metric("slmops_agent_requests_cancelled_total", reason="client_gone")
    client = openai.OpenAI(base_url=f"{quiet.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="slow", stream=True, **LONG)
    got = [chunk for _, chunk in zip(range(4), stream)]
    stream.close()
    assert len(got) == 4 and got[0].choices[0].delta.role == "assistant"
    assert timed_short(quiet) < 1.0
    assert quiet.wait_metric("slmops_agent_requests_cancelled_total", gone + 1, reason="client_gone") == gone + 1
    client.close()


def test_hang_up_while_waiting_for_a_whole_answer_frees_the_model(quiet):
    gone = quiet.metric("slmops_agent_requests_cancelled_total", reason="client_gone")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{quiet.url}/v1/chat/completions", json=LONG, timeout=0.5)
    assert timed_short(quiet) < 1.0
    assert quiet.wait_metric("slmops_agent_requests_cancelled_total", gone + 1, reason="client_gone") == gone + 1


def test_queued_requests_of_departed_clients_are_never_computed(quiet):
    prompt_before = quiet.metric("slmops_agent_prompt_tokens_total")
    gone = quiet.metric("slmops_agent_requests_cancelled_total", reason="client_gone")
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{quiet.url}/v1/chat/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()  # keep it: dropping the iterator closes the connection
            next(lines)  # the long answer holds the model

            def impatient() -> None:
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{quiet.url}/v1/chat/completions", json=SHORT, timeout=0.3)

            threads = [threading.Thread(target=impatient) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert quiet.wait_metric("slmops_agent_requests_cancelled_total", gone + 4, reason="client_gone") == gone + 4
            assert quiet.metric("slmops_agent_queue_depth") == 0  # dropped from the queue at once, not when their turn came
    assert quiet.wait_metric("slmops_agent_requests_cancelled_total", gone + 5, reason="client_gone") == gone + 5
    assert quiet.idle()
    computed = quiet.metric("slmops_agent_prompt_tokens_total") - prompt_before
    one_prompt = httpx.post(f"{quiet.url}/v1/chat/completions", json=SHORT, timeout=30).json()["usage"]["prompt_tokens"]
    assert computed == one_prompt  # only the long request ever reached the model (LONG and SHORT share the prompt)


# -- load -----------------------------------------------------------------------------------------------------
def test_200_concurrent_clients_get_an_answer_or_a_429_and_health_stays_fast(quiet):
    async def main() -> tuple[list[tuple[int, str | None, bool]], list[float]]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=quiet.url, timeout=120, limits=limits) as client:
            async def one(i: int) -> tuple[int, str | None, bool]:
                body = {**SHORT, "max_tokens": 40, "stream": i % 2 == 0}
                r = await client.post("/v1/chat/completions", json=body)
                complete = r.text.rstrip().endswith("[DONE]") if body["stream"] and r.status_code == 200 else True
                if r.status_code == 200 and not body["stream"]:
                    complete = r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                return r.status_code, r.headers.get("retry-after"), complete

            health: list[float] = []
            done = asyncio.Event()

            async def poll() -> None:
                while not done.is_set():
                    started = time.monotonic()
                    r = await client.get("/health")
                    assert r.status_code == 200
                    health.append(time.monotonic() - started)
                    await asyncio.sleep(0.05)

            poller = asyncio.create_task(poll())
            results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), timeout=110)
            done.set()
            await poller
            return results, health

    results, health = asyncio.run(main())
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 17  # the queue (16) and the running request were served
    assert all(complete for _, _, complete in results)
    assert all(int(retry) >= 1 for s, retry, _ in results if s == 429)
    assert len(health) >= 3 and max(health) < 0.5, f"/health took {sorted(health)[-5:]} s under load"
    assert quiet.idle()


def test_deadline_ends_a_long_answer_and_the_next_request_is_served(slow_int4, tmp_path):
    server = Server(Path(slow_int4), tmp_path, "--queue-size", "4", "--request-timeout", "1")
    try:
        out: dict = {}

        def long() -> None:
            out["long"] = httpx.post(f"{server.url}/v1/chat/completions", json=LONG, timeout=30)

        t = threading.Thread(target=long)
        t.start()
        time.sleep(0.2)
        queued = httpx.post(f"{server.url}/v1/chat/completions", json=SHORT, timeout=30)
        t.join()
        body = out["long"].json()
        assert out["long"].status_code == 200 and body["choices"][0]["finish_reason"] == "length"
        assert 0 < body["usage"]["completion_tokens"] < LONG["max_tokens"]
        assert queued.status_code == 200 and queued.json()["usage"]["completion_tokens"] > 0
        assert server.metric("slmops_agent_requests_cancelled_total", reason="deadline") == 1
        assert server.idle()
    finally:
        server.close()


# -- the official openai client -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tiny_int4, tmp_path_factory):
    s = Server(Path(tiny_int4), tmp_path_factory.mktemp("tiny"), "--api-key", KEY, "--max-body-bytes", "8192",
               "--default-max-tokens", "6", name="triage")
    yield s
    s.close()


@pytest.fixture(scope="module")
def oai(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=KEY, max_retries=0)
    yield client
    client.close()


LINE = "2026-03-02T10:14:07Z pump-17 temp=92.4C vibration=0.9g status=OVERHEAT"


def test_openai_client_models(oai):
    assert [m.id for m in oai.models.list()] == ["triage:v1"]
    assert oai.models.retrieve("triage:v1").owned_by == "slmops"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")


def test_openai_client_chat_stream_and_not(oai):
    msgs = [{"role": "developer", "content": "Triage."}, {"role": "user", "content": LINE}]
    whole = oai.chat.completions.create(model="triage", messages=msgs, max_tokens=24)
    assert whole.choices[0].message.content.split(":")[0] in ("ok", "warning", "fault")
    parts = [c for c in oai.chat.completions.create(model="triage", messages=msgs, max_tokens=24, stream=True,
                                                    stream_options={"include_usage": True})]
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole.choices[0].message.content
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_client_structured_output_and_logprobs(oai):
    schema = {"type": "object", "properties": {"severity": {"enum": ["ok", "warning", "fault"]}},
              "required": ["severity"], "additionalProperties": False}
    r = oai.chat.completions.create(
        model="triage", messages=[{"role": "user", "content": LINE}], max_tokens=32, logprobs=True, top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "triage", "schema": schema, "strict": True}})
    assert json.loads(r.choices[0].message.content)["severity"] in ("ok", "warning", "fault")
    assert "".join(t.token for t in r.choices[0].logprobs.content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)


def test_openai_client_legacy_completions(oai):
    prompt = f"<|im_start|>user\n{LINE}<|im_end|>\n<|im_start|>assistant\n"  # the tiny model's ChatML
    r = oai.completions.create(model="triage:v1", prompt=prompt, max_tokens=24, logprobs=1)
    assert r.choices[0].text.split(":")[0] in ("ok", "warning", "fault") and r.choices[0].logprobs.tokens
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="triage:v1", prompt=prompt, max_tokens=24, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_openai_client_errors(oai, tiny_server):
    with pytest.raises(openai.BadRequestError, match="'n' is not supported"):
        oai.chat.completions.create(model="triage", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        oai.chat.completions.create(model="triage", messages=[{"role": "user", "content": "x"}], max_tokens=10**5)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "x"}])
    anonymous = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="not-the-key-0123", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    anonymous.close()


def test_command_line_limits_are_applied(tiny_server):
    h = {**tiny_server.headers, "content-type": "application/json"}
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 9000}]})
    r = httpx.post(f"{tiny_server.url}/v1/chat/completions", content=big, headers=h, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{tiny_server.url}/v1/chat/completions", headers=h, timeout=30,
                   json={"messages": [{"role": "user", "content": "x" * 200}], "response_format": {"type": "regex", "regex": "[a-z]{50}"}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6  # --default-max-tokens
