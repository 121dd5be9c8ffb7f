"""Acknowledge after commit: the ingest writer acks each QoS 1 message only once its batch committed, so a fleet
killed between paho's receipt and the commit gets the messages again from the broker when it reconnects (a real
SIGKILL of a real fleet process, on the embedded amqtt broker and on mosquitto with MQTT 3.1.1 and 5), 0 lost.
The ack rules one row each: after the commit, a duplicate acked too, an invalid message acked at once, a message the
full queue refused or stop() left behind NOT acked."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import func, select

from fleet.db import Database, open_database
from fleet.ingest import IngestWriter
from fleet.messaging import FleetMessaging
from fleet.models import TelemetrySample
from fleet.settings import Settings
from protocol import topics
from protocol.messages import encode
from tests.net import FLEET_PASSWORD, MOSQUITTO, embedded_broker, login, mosquitto

from .conftest import wait_until
from .test_ingest import T1, T2, presence, telemetry

REPO = Path(__file__).resolve().parents[2]
N = 60  # telemetry samples the device publishes while the first fleet holds them


def sample_rows(db: Database) -> list[int]:
    with db.sessions() as s:
        return sorted(s.scalars(select(TelemetrySample.seq)))


# ---- the ack rules, on real SQLite -------------------------------------------------------------------------------


class Acks:
    """Ack callables that record, when called, whether their message's row was committed (read in a new session)."""

    def __init__(self, db: Database) -> None:
        self.db, self.calls = db, []

    def of(self, msg) -> Callable[[], None]:
        def ack() -> None:
            with self.db.sessions() as s:
                n = s.scalar(select(func.count()).select_from(TelemetrySample)
                             .where(TelemetrySample.message_id == msg.message_id))
            self.calls.append((msg.seq, n, threading.current_thread().name))

        return ack


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield database
    database.close()


def settings_for(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "fleet", broker_url="mqtt://127.0.0.1:1", **kw)  # type: ignore[arg-type]


def test_acks_come_after_the_commit_from_the_writer_thread_duplicates_included(tmp_path: Path, db: Database) -> None:
    acks = Acks(db)
    w = IngestWriter(settings_for(tmp_path, ingest_batch_max=100), db.sessions)
    for m in (T1, T2, T1):  # the third is a second copy of the first in the same batch
        assert w.submit(m, acks.of(m))
    w.start()
    assert w.stop(5)
    assert acks.calls == [(1, 1, "fleet-ingest-writer"), (2, 1, "fleet-ingest-writer"), (1, 1, "fleet-ingest-writer")]
    assert (w.stats().acked, w.stats().stored, w.stats().duplicates) == (3, 2, 1)


REFUSED = [
    ("not_json", str(topics.status("dev-a")), b"not json", 1),
    ("wrong_channel", str(topics.telemetry("dev-a")), encode(presence()), 1),
    ("other_devices_topic", str(topics.presence("dev-b")), encode(presence("dev-a")), 1),
    ("cleared_retained_presence", str(topics.presence("dev-a")), b"", 1),
]


@pytest.mark.parametrize("topic,payload,acked", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_an_invalid_message_is_acked_at_once_and_never_queued(tmp_path: Path, db: Database, topic: str,
                                                              payload: bytes, acked: int) -> None:
    fleet = FleetMessaging(settings_for(tmp_path), db.sessions)  # never started: nothing drains the queue
    calls: list[int] = []
    assert fleet.ingest(topic, payload, lambda: calls.append(1)) is False
    assert (len(calls), fleet.writer.queue.qsize(), sample_rows(db)) == (acked, 0, [])


def test_a_message_the_full_queue_refuses_and_one_stop_leaves_behind_are_not_acked(tmp_path: Path, db: Database) -> None:
    calls: list[int] = []
    w = IngestWriter(settings_for(tmp_path, ingest_queue_max=1, ingest_put_timeout_s=0.2), db.sessions)  # not started yet
    assert w.submit(T1, lambda: calls.append(1))
    assert w.submit(T2, lambda: calls.append(2)) is False  # the queue stayed full: refused, the broker keeps it
    assert calls == [] and w.stats().dropped_full == 1
    assert w.stop(0.2) is False  # never started: T1 is left queued, unacknowledged
    assert (calls, w.stats().dropped_stop, sample_rows(db)) == ([], 1, [])


def test_a_batch_the_database_refuses_twice_is_acked_after_each_message_failed(tmp_path: Path, db: Database) -> None:
    def broken(s, items, st):
        raise RuntimeError("the database is gone")

    calls: list[int] = []
    w = IngestWriter(settings_for(tmp_path), db.sessions, store=broken)
    for m in (T1, T2):
        w.submit(m, lambda m=m: calls.append(m.seq))
    w.start()
    assert w.stop(5)
    assert (calls, w.stats().dropped_failed, w.stats().acked) == ([1, 2], 2, 2)


# ---- a fleet killed before its commit, through real brokers ------------------------------------------------------


@contextlib.contextmanager
def broker(kind: str, tmp_path: Path) -> Iterator[str]:
    """The broker's URL as the fleet names it."""
    if kind == "embedded":
        with embedded_broker() as b:
            yield b.url
        return
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    with mosquitto(tmp_path) as port:
        yield f"{'mqtt5' if kind == 'mosquitto-v5' else 'mqtt'}://127.0.0.1:{port}"


class Child:
    """The crashing fleet (tests/fleet/crashing_fleet.py) in its own process; its stdout lines read in a thread."""

    def __init__(self, url: str, client_id: str, database_url: str) -> None:
        env = os.environ | {"SLMOPS_TEST_FLEET_PASSWORD": FLEET_PASSWORD, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fleet.crashing_fleet", url, client_id, database_url],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def received(self) -> int:
        got = [int(line.split()[1]) for line in self.lines if line.startswith("received ")]
        return max(got, default=0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@contextlib.contextmanager
def publish_all(url: str, n: int) -> Iterator[None]:
    """dev-k publishes n samples at QoS 1, waits until the broker has acknowledged every one, and stays connected
    until the block ends (amqtt 0.12.1 drops a client's acknowledged messages it has not yet routed when that client
    disconnects)."""
    port = int(url.rsplit(":", 1)[1])
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="slmops-agent-dev-k")
    username, password = login("slmops-agent-dev-k")
    if username:
        c.username_pw_set(username, password)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    try:
        infos = [c.publish(str(topics.telemetry("dev-k")), encode(telemetry("dev-k", i)), qos=1) for i in range(1, n + 1)]
        for info in infos:
            info.wait_for_publish(10)
        assert all(i.is_published() for i in infos), "the broker did not take every sample"
        yield
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.parametrize("kind", ["embedded", "mosquitto-v311", "mosquitto-v5"])
def test_a_fleet_killed_before_its_commit_gets_the_messages_again_and_loses_none(tmp_path: Path, kind: str) -> None:
    database_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    client_id = "slmops-fleet-crash"
    with broker(kind, tmp_path) as url, contextlib.ExitStack() as stack:
        child = Child(url, client_id, database_url)
        try:
            wait_until(lambda: "subscribed" in child.lines or child.proc.poll() is not None, timeout=15,
                       what="the first fleet to subscribe")
            assert "subscribed" in child.lines, child.lines
            stack.enter_context(publish_all(url, N))
            last = [-1, time.monotonic()]

            def settled() -> bool:  # paho has handed the first fleet all it will get without acks
                got = child.received()
                if got != last[0]:
                    last[:] = [got, time.monotonic()]
                return got > 5 and time.monotonic() - last[1] > 0.7

            wait_until(settled, timeout=15, what="the first fleet to receive the samples")
            held = child.received()
        finally:
            child.kill()  # SIGKILL: no DISCONNECT, no drain, the open transaction dies with it
        db = open_database(database_url)
        try:
            committed = sample_rows(db)
            assert committed == list(range(1, 6)), "the first fleet should have committed its first batch only"
            fleet = FleetMessaging(Settings(data_dir=tmp_path / "fleet2", database_url=database_url, broker_url=url,
                                            client_id=client_id, broker_password=FLEET_PASSWORD), db.sessions)
            fleet.start()
            try:
                wait_until(lambda: len(sample_rows(db)) >= N, timeout=15, what="every sample, from the broker again")
                time.sleep(0.3)
                assert sample_rows(db) == list(range(1, N + 1))  # each exactly once: 0 lost, 0 stored twice
                st = fleet.ingest_stats()
                assert st.stored == N - 5 and st.dropped == 0
            finally:
                fleet.stop()
        finally:
            db.close()
    assert held > 5  # the killed fleet really held messages it had not committed


@pytest.mark.parametrize("receive_maximum,window", [(0, 20), (50, 50)], ids=["broker_default", "fleet_sets_50"])
def test_the_receive_maximum_sets_how_many_unacked_messages_mosquitto_sends(tmp_path: Path, receive_maximum: int,
                                                                             window: int) -> None:
    """mqttlink sends ClientOptions.receive_maximum in CONNECT (MQTT 5); mosquitto 2 then has that many messages out
    to a manual-ack client at once instead of its max_inflight_messages (20)."""
    from mqttlink import ClientOptions, connect, make_client

    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    with mosquitto(tmp_path) as port:
        opts = ClientOptions(f"mqtt5://127.0.0.1:{port}", "slmops-fleet-window", manual_ack=True,
                             receive_maximum=receive_maximum)
        client, got, subscribed = make_client(opts), [], threading.Event()
        client.on_connect = lambda c, *_: c.subscribe(str(topics.Topic.wildcard(topics.Channel.TELEMETRY)), 1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = lambda _c, _u, m: got.append(m.mid)
        connect(client, opts)
        try:
            assert subscribed.wait(5)
            with publish_all(f"mqtt://127.0.0.1:{port}", 80):
                wait_until(lambda: len(got) >= window, what=f"{window} messages")
                time.sleep(0.5)
                assert len(got) == window  # no more until acks
                for mid in got[:10]:
                    client.ack(mid, 1)
                wait_until(lambda: len(got) > window, what="more after ten acks")
        finally:
            client.disconnect()
            client.loop_stop()
