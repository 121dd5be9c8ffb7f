"""The dashboard in a real headless browser: Debian's chromium driven by Playwright, against a running fleet (uvicorn
on a free loopback port, a real embedded MQTT broker, SQLite) whose data came from paho clients logged in as
devices, the way agents send it. The pages load, show the fleet's live figures, plot the telemetry that was sent,
render a real rollout that a canary and a gate stopped, refuse a wrong token with the sign-in form, and log no console
errors. Skipped (with the reason) where chromium or playwright is missing, except under CI, where that fails."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


if (_why := _missing()) is not None:
    if os.environ.get("CI"):
        pytest.fail(f"the browser test cannot run under CI: {_why}", pytrace=False)
    pytest.skip(_why, allow_module_level=True)

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright  # noqa: E402

from fleet.api.app import create_app  # noqa: E402
from fleet.tls import uvicorn_config  # noqa: E402
from protocol import topics  # noqa: E402
from protocol.messages import ActiveModel, EvalScore, Presence, StatusReport, Telemetry, UpdateState, encode  # noqa: E402
from tests.fleet.conftest import ADMIN, Device, secure_settings, wait_until  # noqa: E402
from tests.net import embedded_broker, free_port  # noqa: E402

CPU, RSS, TPS = 42.5, 123.0, 7.25  # what dev-1 reports in every sample, so every plotted bucket shows exactly these


@dataclass
class Fleet:
    url: str
    viewer: str
    app: object
    devices: dict[str, Device]
    api: httpx.Client


def now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """dev-1 and dev-2 (lab) online serving tiny v1, dev-2's update to v2 rolled back; dev-3 (field) came online and
    went offline; dev-4 (lab) revoked. dev-1 sent three telemetry samples. All over MQTT but the revocation."""
    tmp = tmp_path_factory.mktemp("dash")
    with embedded_broker() as broker:
        port = free_port()
        settings = secure_settings(tmp / "fleet", broker_url=broker.url, port=port, client_id=f"slmops-fleet-dash-{port}")
        app = create_app(settings)
        server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
        thread = threading.Thread(target=server.run, name="dash-fleet", daemon=True)
        thread.start()
        peers: dict[str, Device] = {}
        url = f"http://127.0.0.1:{port}"
        api = httpx.Client(base_url=url, headers=ADMIN, timeout=10)
        try:
            wait_until(lambda: server.started, 20, "the fleet to start")
            wait_until(lambda: app.state.fleet.messaging.wait_connected(0.1), 10, "the fleet to subscribe")
            for dev, group in (("dev-1", "lab"), ("dev-2", "lab"), ("dev-3", "field"), ("dev-4", "lab")):
                assert api.post("/api/v1/devices", json={"id": dev, "groups": [group]}).status_code == 201
            viewer = api.post("/api/v1/tokens", json={"name": "dash", "role": "viewer"}).json()["token"]
            v1 = ActiveModel(name="tiny", version=1)
            for dev in ("dev-1", "dev-2", "dev-3"):
                peers[dev] = Device(broker.port, f"slmops-agent-{dev}")
                peers[dev].publish(str(topics.presence(dev)), encode(Presence(device_id=dev, online=True, active=v1, sent_at=now())))
            peers["dev-3"].publish(str(topics.presence("dev-3")), encode(Presence(device_id="dev-3", online=False, sent_at=now())))
            status = [("dev-1", UpdateState.ACTIVE, 1, 1, None), ("dev-2", UpdateState.ACTIVE, 1, 1, None),
                      ("dev-2", UpdateState.ROLLED_BACK, 2, 1, "health_check_failed")]  # fmt: skip
            for seq, (dev, state, version, active, code) in enumerate(status, start=1):
                msg = StatusReport(device_id=dev, deployment_id=f"dep-{version}", bundle_name="tiny", bundle_version=version,
                                   state=state, active_version=active, error_code=code, seq=seq, sent_at=now())  # fmt: skip
                peers[dev].publish(str(topics.status(dev)), encode(msg))
            for seq in range(3):
                sample = Telemetry(device_id="dev-1", uptime_s=seq, requests_total=seq, tokens_generated_total=10 * seq,
                                   tokens_per_s=TPS, cpu_percent=CPU, memory_rss_mb=RSS, memory_percent=5.0, seq=seq,
                                   sent_at=now())  # fmt: skip
                peers["dev-1"].publish(str(topics.telemetry("dev-1")), encode(sample))
            assert api.post("/api/v1/devices/dev-4/revoke").status_code == 200
            wait_until(lambda: api.get("/api/v1/overview").json()["failed_count"] == 1
                       and api.get("/api/v1/overview").json()["devices"]["online"] == 2
                       and api.get("/api/v1/devices/dev-1/telemetry").json()["points"], 10, "the fleet to store it all")  # fmt: skip
            yield Fleet(url=url, viewer=viewer, app=app, devices=peers, api=api)
        finally:
            for d in peers.values():
                d.close()
            api.close()
            server.should_exit = True
            thread.join(timeout=20)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, list[str]]]:
    """A fresh tab (its own sessionStorage) and the errors it logs: console errors and uncaught exceptions."""
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    errors: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            errors.append(f"{msg.text} at {msg.location.get('url', '')}")

    tab.on("console", on_console)
    tab.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    yield tab, errors
    context.close()


def sign_in(tab: Page, fleet: Fleet, token: str, route: str = "") -> None:
    tab.goto(f"{fleet.url}/dashboard/{route}")
    tab.locator("#token").fill(token)
    tab.locator("#login-form button").click()


def text(tab: Page, selector: str) -> str:
    return tab.locator(selector).inner_text().strip()


def test_overview_shows_the_fleet_live(fleet: Fleet, page) -> None:
    tab, errors = page
    response = tab.goto(f"{fleet.url}/dashboard/")
    assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
    assert tab.locator("#login").is_visible()
    sign_in(tab, fleet, fleet.viewer)
    tab.locator("#count-total .value").wait_for()
    figures = {k: text(tab, f"#count-{k} .value") for k in ("total", "online", "offline", "revoked", "failed")}
    assert figures == {"total": "4", "online": "2", "offline": "1", "revoked": "1", "failed": "1"}
    assert text(tab, "#mqtt .value") == "connected"
    assert "tiny" in text(tab, "#versions") and "dev-2" in text(tab, "#failed")
    assert "health_check_failed" in text(tab, "#failed") and "rolled_back" in text(tab, "#recent")
    # live: dev-3 comes back online over MQTT and the open page shows it on its next refresh, without a reload
    dev3 = fleet.devices["dev-3"]
    dev3.publish(str(topics.presence("dev-3")), encode(Presence(device_id="dev-3", online=True, sent_at=now())))
    expect(tab.locator("#count-online .value")).to_have_text("3", timeout=15_000)
    dev3.publish(str(topics.presence("dev-3")), encode(Presence(device_id="dev-3", online=False, sent_at=now())))
    assert errors == []


def test_device_pages_list_devices_and_plot_the_telemetry_sent(fleet: Fleet, page) -> None:
    tab, errors = page
    sign_in(tab, fleet, fleet.viewer, "#/devices")
    rows = tab.locator("#device-table tbody tr")
    rows.first.wait_for()
    assert rows.count() == 4
    assert "revoked" in rows.filter(has_text="dev-4").inner_text()
    rows.filter(has_text="dev-1").locator("a").click()
    tab.locator("#device[data-device='dev-1']").wait_for()
    assert "tiny v1" in text(tab, "#facts") and "lab" in text(tab, "#facts")
    series = fleet.api.get("/api/v1/devices/dev-1/telemetry", params={"step_s": 10, "since": _ago(900)}).json()["points"]
    for key, value in (("cpu_percent", CPU), ("memory_rss_mb", RSS), ("tokens_per_s", TPS)):
        dots = tab.locator(f".plot[data-key='{key}'] circle.dot")
        dots.first.wait_for()
        values = [float(v) for v in dots.evaluate_all("ds => ds.map(d => d.dataset.v)")]
        assert values and all(v == value for v in values), (key, values)
        assert len(values) == len(series)  # one dot per bucket the API answers
    assert tab.locator(".plot[data-key='cpu_percent'] polyline").count() == 1
    tab.locator("#range").select_option("1h")
    expect(tab.locator(".plot[data-key='cpu_percent'] circle.dot")).to_have_count(1)
    assert "rolled_back" not in text(tab, "#history") and "active" in text(tab, "#history")
    assert errors == []


def _ago(seconds: int) -> str:
    return datetime.fromtimestamp(time.time() - seconds, tz=timezone.utc).isoformat()


def _store_bundle(fleet: Fleet, version: int, accuracy: float) -> None:
    """A stored bundle whose manifest carries its accuracy and names a held-out set the devices score."""
    from fleet import crud
    from protocol.manifest import EvalMetrics, FileEntry, Manifest

    manifest = Manifest(name="tiny", version=version, files=(FileEntry(path="m.onnx", size=1, sha256="a" * 64),),
                        created=now(), eval=EvalMetrics(dataset="held-out", metrics={"accuracy": accuracy}))
    with fleet.app.state.fleet.db.sessions() as s, s.begin():  # type: ignore[attr-defined]
        b = crud.add_bundle(s, manifest=manifest, sha256=f"{version:064x}", size=10, storage_path="x",
                            signer_keyids=[], now=now())
        b.manifest = dict(manifest.to_signed(), eval={"dataset": "held-out", "metrics": {"accuracy": accuracy},
                                                      "heldout": {"file": "eval/heldout.jsonl", "metric": "accuracy"}})


def _answer(fleet: Fleet, dev: str, rollout_id: str, version: int, score: float, seq: int) -> None:
    msg = StatusReport(device_id=dev, deployment_id=rollout_id, bundle_name="tiny", bundle_version=version,
                       state=UpdateState.ACTIVE, active_version=version, seq=seq, sent_at=now(),
                       eval=EvalScore(metric="accuracy", score=score, n=30))
    fleet.devices[dev].publish(str(topics.status(dev)), encode(msg))


def test_rollouts_say_none_then_show_waves_with_counts_and_gate_figures(fleet: Fleet, page) -> None:
    """A real rollout over MQTT: the canary measures 0.93 on the bundle's held-out set and the wave opens; the
    next device measures 0.5, below the gate of 0.8, and the rollout aborts. The page shows it all."""
    tab, errors = page
    sign_in(tab, fleet, fleet.viewer, "#/rollouts")
    assert tab.locator("#no-rollouts").inner_text() == "no rollouts"
    _store_bundle(fleet, 7, 0.93)
    for dev in ("dev-1", "dev-2"):
        fleet.devices[dev].subscribe(str(topics.cmd(dev)))
    body = {"bundle": {"name": "tiny", "version": 7}, "target": {"group": "lab"},
            "strategy": {"canary": {"count": 1}, "waves": [{"percent": 100}], "success_threshold": 0.9,
                         "error_threshold": 0.2},
            "gate": {"min": {"accuracy": 0.8}, "no_regression": False}}
    made = fleet.api.post("/api/v1/rollouts", json=body)
    assert made.status_code == 201, made.text
    rid = made.json()["id"]

    def told(dev: str) -> bool:
        return any(m.topic == str(topics.cmd(dev)) for m in list(fleet.devices[dev].messages))

    wait_until(lambda: told("dev-1") or told("dev-2"), 10, "the canary's command")
    canary, other = ("dev-1", "dev-2") if told("dev-1") else ("dev-2", "dev-1")
    assert not told(other), "the second device waits for the canary"
    _answer(fleet, canary, rid, 7, 0.93, seq=100)
    wait_until(lambda: told(other), 15, "the wave after the canary")
    _answer(fleet, other, rid, 7, 0.5, seq=101)
    wait_until(lambda: fleet.api.get(f"/api/v1/rollouts/{rid}").json()["state"] == "aborted", 15, "the abort")

    tab.goto(f"{fleet.url}/dashboard/#/rollouts")
    tab.locator("#rollout-table").wait_for()
    tab.locator("#rollout-table a", has_text=rid).click()
    tab.locator(f"#rollout[data-rollout='{rid}']").wait_for()
    waves = tab.locator("#waves tbody tr")
    assert waves.count() == 2
    first, second = waves.nth(0).inner_text(), waves.nth(1).inner_text()
    assert "canary" in first and "succeeded 1" in first and "100% succeeded (needs 90%)" in first
    assert "accuracy mean 0.93, min 0.93, n=1 (gate 0.80: met)" in first
    assert "failed 1" in second and "100% failed (aborts at 20%)" in second
    assert "accuracy mean 0.50, min 0.50, n=1 (gate 0.80: missed)" in second
    segments = waves.nth(1).locator(".bar span").evaluate_all("s => s.map(x => [x.className, x.style.width])")
    assert ["seg-failed", "100%"] in segments
    assert "aborted" in text(tab, "#rollout") and "accuracy at least 0.80" in text(tab, "#rollout")
    assert errors == []


def test_a_wrong_or_revoked_token_shows_the_sign_in_again(fleet: Fleet, page) -> None:
    tab, errors = page
    sign_in(tab, fleet, "slm_" + "W" * 43)
    tab.locator("#login-error").wait_for()
    assert "refused" in text(tab, "#login-error") and tab.locator("#nav").is_hidden()
    assert tab.evaluate("sessionStorage.getItem('slmops-token')") is None
    assert tab.locator("#view").inner_text() == ""
    # a token that works, then is revoked while the page is open: the next refresh asks again
    made = fleet.api.post("/api/v1/tokens", json={"name": "short-lived", "role": "viewer"}).json()
    tab.locator("#token").fill(made["token"])
    tab.locator("#login-form button").click()
    tab.locator("#count-total").wait_for()
    assert fleet.api.post(f"/api/v1/tokens/{made['id']}/revoke").status_code == 200
    tab.locator("#login-error").wait_for(timeout=15_000)
    assert tab.locator("#count-total").count() == 0
    assert errors and all("401" in e for e in errors), errors  # the refused requests, and nothing else


def test_the_dashboard_loads_nothing_from_outside(fleet: Fleet, page) -> None:
    tab, errors = page
    requested: list[str] = []
    tab.on("request", lambda r: requested.append(r.url))
    sign_in(tab, fleet, fleet.viewer, "#/devices/dev-1")
    tab.locator(".plot circle.dot").first.wait_for()
    assert requested and all(u.startswith(fleet.url) for u in requested), requested
    assert errors == []
