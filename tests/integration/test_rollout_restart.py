"""A fleet killed (SIGKILL) in the middle of a rollout and started again continues where it stopped: every device
is updated exactly once, none skipped, none twice. The fleet runs as `slmops fleet serve` in its own process on
a real broker (embedded amqtt in the test, with a persistent session for the fleet, so reports sent while it is
down wait for it); the devices answer their commands the way the agent does, a little later, so the kill lands
while commands and reports are in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from tests.fleet.answering import AnsweringDevice
from tests.fleet.conftest import ADMIN, ADMIN_TOKEN, BROKER_PASSWORD, Device, make_model_dir
from tests.net import embedded_broker, free_port, wait_port

from fleet.bundles import build_bundle
from protocol.trust import generate_keypair

pytestmark = pytest.mark.integration

N_DEVICES = 12
ANSWER_AFTER_S = 0.4  # a device's update takes this long before it reports active


class FleetProcess:
    def __init__(self, tmp: Path, broker_url: str, pub: Path, database_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, SLMOPS_FLEET_ADMIN_TOKEN=ADMIN_TOKEN, SLMOPS_FLEET_BROKER_PASSWORD=BROKER_PASSWORD,
                        SLMOPS_FLEET_CLIENT_ID=f"slmops-fleet-restart-{self.port}", SLMOPS_FLEET_ROLLOUT_TICK_S="0.5")
        self.args = [sys.executable, "-m", "slmops.cli", "fleet", "serve", "--data-dir", str(tmp / "fleet"),
                     "--port", str(self.port), "--broker-url", broker_url, "--trusted-key", str(pub),
                     "--database-url", database_url]
        self.log = tmp / "fleet.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, 30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[tuple[FleetProcess, list[AnsweringDevice], Path]]:
    """On SQLite and on PostgreSQL (`db_url`)."""
    key = generate_keypair()
    pub = tmp_path / "release.pub"
    pub.write_bytes(key.public.to_pem())
    bundle = tmp_path / "tiny-1.bundle"
    model = make_model_dir(tmp_path / "model", eval_doc='{"dataset": "t", "metrics": {"accuracy": 0.9}}')
    build_bundle(model, bundle, name="tiny", version=1, signers=[key], now=datetime.now(timezone.utc))
    with embedded_broker() as broker:
        fleet = FleetProcess(tmp_path, broker.url, pub, db_url)
        devices: list[AnsweringDevice] = []
        try:
            fleet.start()
            devices = [AnsweringDevice(Device(broker.port, f"slmops-agent-d{i:02d}"), f"d{i:02d}", delay_s=ANSWER_AFTER_S)
                       for i in range(N_DEVICES)]
            yield fleet, devices, bundle
        finally:
            fleet.stop()
            for d in devices:
                d.dev.close()


def _rollout(url: str, rid: str) -> dict:
    return httpx.get(f"{url}/api/v1/rollouts/{rid}", headers=ADMIN, timeout=10).json()


def test_a_fleet_killed_mid_rollout_continues_without_skipping_or_repeating_a_device(world) -> None:
    fleet, devices, bundle = world
    api = httpx.Client(base_url=fleet.url, headers=ADMIN, timeout=10)
    for d in devices:
        assert api.post("/api/v1/devices", json={"id": d.device_id, "groups": ["lab"]}).status_code == 201
    assert api.post("/api/v1/bundles", content=bundle.read_bytes()).status_code == 201
    r = api.post("/api/v1/rollouts", json={"bundle": {"name": "tiny", "version": 1}, "target": {"group": "lab"},
                                          "strategy": {"canary": {"count": 2}, "waves": [{"percent": 50}, {"percent": 100}],
                                                       "max_parallel": 3, "success_threshold": 1.0,
                                                       "resend_after_s": 3600}})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    deadline = time.monotonic() + 30
    while _rollout(fleet.url, rid)["counts"]["succeeded"] < 4:  # the canary is done and wave 1 is under way
        assert time.monotonic() < deadline, "the rollout did not get going"
        time.sleep(0.05)
    fleet.kill()
    killed_at = sum(len(d.updates) for d in devices)
    assert 0 < killed_at < N_DEVICES
    time.sleep(1.0)  # reports of devices still updating reach the broker while the fleet is down
    fleet.start()
    deadline = time.monotonic() + 60
    while (state := _rollout(fleet.url, rid))["state"] != "succeeded":
        assert state["state"] == "running", state["reason"]
        assert time.monotonic() < deadline, f"the restarted fleet did not finish the rollout: {state['counts']}"
        time.sleep(0.1)
    assert state["counts"]["succeeded"] == N_DEVICES
    assert sorted(len(d.updates) for d in devices) == [1] * N_DEVICES, "every device updated exactly once"
    assert {u for d in devices for u in d.updates} == {rid}
    assert "fleet" in fleet.log.read_text(errors="replace").lower()
