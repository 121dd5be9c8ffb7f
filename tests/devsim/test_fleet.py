"""The simulator against a real fleet: the embedded broker and mosquitto (deploy/'s passwd-acl settings), real
signed commands, real SQLite. Every report the simulated devices sent must be stored by the fleet."""

from __future__ import annotations

import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bench import mqttbroker
from bench.rolloutfleet import provision
from devsim import Durations, Knobs, Simulator
from devsim.accounts import from_csv
from fleet.bundles import build_bundle
from fleet.trust import init_trust
from protocol.trust import PrivateKey
from slmops.story import FleetClient, FleetServer
from tests.fleet.conftest import make_model_dir

N = 6
TERMINAL = {"active", "rolled_back", "failed", "rejected"}


def setup(tmp: Path) -> tuple[Path, Path, Path]:
    now = datetime.now(timezone.utc)
    trust = tmp / "trust"
    init_trust(trust, now=now)
    key = PrivateKey.from_pem(next(trust.glob("bundles-*.key")).read_bytes())
    model = make_model_dir(tmp / "model", eval_doc='{"dataset": "t", "metrics": {"accuracy": 0.9}, "smoke": []}')
    bundles = []
    for v in (1, 2):
        out = tmp / f"tiny-{v}.bundle"
        build_bundle(model, out, name="tiny", version=v, signers=[key], now=now, expires=now + timedelta(days=30))
        bundles.append(out)
    csv = tmp / "devices.csv"
    mqttbroker.write_private(csv, "device_id,username,password\n" + "".join(
        f"dev-{i},dev-{i},{secrets.token_urlsafe(24)}\n" for i in range(N)))
    return trust, csv, tmp


def run_story(tmp: Path, trust: Path, csv: Path, broker_url: str | None, password: str) -> dict[str, object]:
    """v1 then v2 (which every simulated device fails) deployed to the group; what the fleet and the simulator saw."""
    fleet = FleetServer(tmp / "fleet", broker_url=broker_url, trust_dir=trust, admin_token="slm_" + secrets.token_urlsafe(32),
                        broker_password=password).start()
    stop = threading.Event()
    sim_thread = None
    try:
        provision(fleet.settings.database_url, csv, "lab")
        client = FleetClient(fleet.url, token=fleet.admin_token)
        for b in sorted(tmp.glob("tiny-*.bundle")):
            client.upload(b)
        sim = Simulator(fleet.broker_url, from_csv(csv), trust_root=(trust / "root.json").read_bytes(),
                        knobs=Knobs(durations=Durations(download_s=0.05, health_s=0.05), fail_bundles=(("tiny", 2),)),
                        origins=[fleet.url])
        sim_thread = threading.Thread(target=sim.run, args=(stop,), daemon=True)
        sim_thread.start()
        deadline = time.monotonic() + 15
        while sim.stats.connected < N and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sim.stats.connected == N, f"only {sim.stats.connected} of {N} devices connected"
        client.wait_online([f"dev-{i}" for i in range(N)], timeout=10)
        outcomes = {}
        for v in (1, 2):
            dep = client.wait(client.deploy("tiny", v, group="lab")["id"], timeout=15)
            outcomes[v] = {t["state"] for t in dep["targets"]}
        deadline = time.monotonic() + 5
        while True:
            stored = sum(len(client.device(f"dev-{i}")["history"]) for i in range(N))
            if stored == sim.stats.reports or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return {"outcomes": outcomes, "reports_sent": sim.stats.reports, "reports_stored": stored,
                "active": sim.stats.states["active"], "rolled_back": sim.stats.states["rolled_back"],
                "dropped": dict(sim.stats.dropped), "loop_errors": sim.loop.errors,
                "serving": [d["active"] for d in client.devices()]}
    finally:
        stop.set()
        if sim_thread is not None:
            sim_thread.join(timeout=15)
        fleet.stop()


# v1 active everywhere, v2 rolled back everywhere; the fleet stored every report sent (6 per device and deployment)
EXPECTED = {"outcomes": {1: {"active"}, 2: {"rolled_back"}}, "reports_sent": 2 * N * 6, "reports_stored": 2 * N * 6,
            "active": N, "rolled_back": N, "dropped": {}, "loop_errors": 0,
            "serving": [{"name": "tiny", "version": 1}] * N}


def test_embedded_broker(tmp_path: Path) -> None:
    trust, csv, tmp = setup(tmp_path)
    assert run_story(tmp, trust, csv, None, secrets.token_urlsafe(32)) == EXPECTED


@pytest.mark.skipif(mqttbroker.missing() is not None, reason=str(mqttbroker.missing()))
def test_mosquitto_with_the_shipped_settings(tmp_path: Path) -> None:
    trust, csv, tmp = setup(tmp_path)
    password = secrets.token_urlsafe(32)
    broker = mqttbroker.Mosquitto(tmp / "mosquitto", {a.username: a.password for a in from_csv(csv)}, password).start()
    try:
        assert run_story(tmp, trust, csv, broker.url, password) == EXPECTED
    finally:
        broker.stop()
