"""Telemetry survives a broker outage: a real agent samples every second into its on-disk outbox while the broker
is stopped for a minute and then started again on the same port; the real fleet ingest stores every sample sent,
exactly once, in a real SQLite database, and both sides are back within their capped reconnect backoff.

The broker is mosquitto with persistence (the fleet's session and its subscriptions outlive the restart, as they
must in production: otherwise samples that arrive before the fleet has subscribed again are acknowledged and
lost). Without mosquitto the embedded amqtt broker stands in; it forgets sessions when it stops, so there the
agent reaches it through a `Gate` that lets it in only once the fleet has subscribed again."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from agent import telemetry
from agent.config import AgentConfig
from agent.service import Agent
from fleet.broker import EmbeddedBroker
from fleet.db import open_database
from fleet.messaging import FleetMessaging
from fleet.models import TelemetrySample
from fleet.settings import Settings
from tests.net import FLEET_PASSWORD, MOSQUITTO, device_password, embedded_broker, free_port, wait_port
from tests.trustkit import ORIGIN, TrustKit

pytestmark = pytest.mark.integration
OUTAGE_S = 60.0  # seconds the broker is away
AGENT_RECONNECT_MAX_S = 2.0
FLEET_RECONNECT_MAX_S = 1.0


class RestartableBroker:
    """A broker on one fixed loopback port that can be stopped and started again: mosquitto if installed
    (with persistence, so sessions outlive a restart), else the embedded amqtt broker."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.kind = "mosquitto" if MOSQUITTO else "amqtt"
        self._proc: subprocess.Popen[bytes] | None = None
        self._amqtt: EmbeddedBroker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.kind == "mosquitto":
            conf = self.tmp / "mosquitto.conf"
            # as root mosquitto drops to its own user unless told not to, and could then not save its sessions in
            # a root-owned temporary folder: the fleet's session (and what was queued for it) would be lost
            stay_root = "user root\n" if os.geteuid() == 0 else ""
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{stay_root}"
                            f"persistence true\npersistence_location {self.tmp}/\n")
            self._proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            wait_port(self.port)
        else:
            self._amqtt = embedded_broker(self.port).start()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()  # mosquitto saves its sessions on the way out
            self._proc.wait(timeout=10)
            self._proc = None
        if self._amqtt is not None:
            self._amqtt.stop()
            self._amqtt = None


class Gate:
    """A loopback TCP relay to the broker that refuses connections while closed (amqtt fallback only); closing it
    also cuts the connections it relays (amqtt does not always close them when it stops)."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.open = upstream, threading.Event()
        self.open.set()
        self.live: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            try:
                if not self.open.is_set():
                    raise OSError("gate closed")
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            self.live += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def cut(self) -> None:
        """Refuse new connections and end the relayed ones."""
        self.open.clear()
        for s in self.live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.live.clear()

    def close(self) -> None:
        self.cut()
        self.sock.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RestartableBroker]:
    b = RestartableBroker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             state: Callable[[], str] = lambda: "") -> float:
    """Seconds it took until `predicate()` held; fails the test after `timeout`, saying `state()`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what} {state()}")
        time.sleep(0.05)
    return time.monotonic() - start


def test_no_sample_is_lost_or_stored_twice_across_a_one_minute_outage(tmp_path: Path, broker, monkeypatch,
                                                                      caplog) -> None:
    caplog.set_level(logging.INFO, logger="slmops.agent.outbox")
    settings = Settings(data_dir=tmp_path / "fleet", broker_url=broker.url, client_id="slmops-fleet-outage",
                        broker_password=FLEET_PASSWORD,
                        reconnect_max_s=FLEET_RECONNECT_MAX_S)
    db = open_database(settings.database_url)
    fleet = FleetMessaging(settings, db.sessions)
    fleet.start()
    assert fleet.wait_connected(10), "the fleet did not subscribe"

    made: list[str] = []  # message_id of every sample the agent made, in order
    real_sample = telemetry.sample

    def recording_sample(*args, **kwargs):
        t = real_sample(*args, **kwargs)
        made.append(t.message_id)
        return t

    monkeypatch.setattr(telemetry, "sample", recording_sample)
    root = TrustKit().write_root(tmp_path / "root.json")
    gate = Gate(broker.port) if broker.kind == "amqtt" else None
    agent = Agent(AgentConfig(device_id="dev-out", data_dir=tmp_path / "agent",
                              broker_username="dev-out", broker_password=device_password("dev-out"),
                              broker_url=f"mqtt://127.0.0.1:{gate.port}" if gate else broker.url,
                              trust_root=root, bundle_origins=(ORIGIN,), api_port=0, telemetry_interval_s=1.0,
                              reconnect_max_s=AGENT_RECONNECT_MAX_S))

    def stored() -> list[str]:
        with db.sessions() as s:
            return list(s.scalars(select(TelemetrySample.message_id).where(TelemetrySample.device_id == "dev-out")))

    try:
        agent.start()
        assert agent.link.wait_connected(10), "the agent did not connect"
        wait_for(lambda: len(stored()) >= 3, 10, "the first samples")
        outbox = agent._forwarder.outbox

        broker.stop()
        if gate:
            gate.cut()
        wait_for(lambda: not agent.link.connected.is_set() and not fleet.connected, 10, "both sides to notice")
        before = len(made)
        time.sleep(OUTAGE_S)
        waiting = len(outbox)
        assert len(made) - before >= OUTAGE_S - 5 and waiting >= OUTAGE_S - 5, (len(made), before, waiting)
        assert agent.metrics.registry.get_sample_value("slmops_agent_telemetry_pending") >= waiting  # /metrics shows it

        after = len(made)
        broker.start()
        fleet_back = wait_for(lambda: fleet.connected, FLEET_RECONNECT_MAX_S + 5, "the fleet to reconnect")
        if gate:
            gate.open.set()
        agent_back = wait_for(agent.link.connected.is_set, AGENT_RECONNECT_MAX_S + 5, "the agent to reconnect")
        time.sleep(2)  # a few samples made after the outage
        agent._sampler.stop()
        sent = list(made)
        drained = wait_for(lambda: len(outbox) == 0 and len(stored()) >= len(sent), 45, "the outbox to drain",
                           lambda: f"outbox {len(outbox)}, in flight {len(agent._forwarder._inflight)}, stored "
                                   f"{len(stored())} of {len(sent)} sent, acknowledged {agent._forwarder.sent}; "
                                   f"missing at {[i for i, m in enumerate(sent) if m not in set(stored())]} "
                                   f"(outage from sample {before} to {after})")
        time.sleep(1)  # let any late re-send arrive, to show it is not stored again

        got = stored()
        assert len(got) == len(set(got)), "a sample was stored twice"
        assert set(got) == set(sent), (sorted(set(sent) - set(got))[:5], sorted(set(got) - set(sent))[:5])
        assert outbox.dropped == 0 and list((tmp_path / "agent" / "outbox").glob("*.msg")) == []
        assert agent.metrics.registry.get_sample_value("slmops_agent_telemetry_dropped_total") == 0
        with db.sessions() as s:
            seqs = list(s.scalars(select(TelemetrySample.seq).order_by(TelemetrySample.id)))
        assert seqs == sorted(seqs), "the outbox drained out of order"
        print(f"\n{broker.kind}: {len(sent)} samples, {waiting} waited out the outage; fleet back in "
              f"{fleet_back:.1f}s, agent in {agent_back:.1f}s, outbox drained {drained:.1f}s later")
    finally:
        agent.stop()
        fleet.stop()
        db.close()
        if gate:
            gate.close()
