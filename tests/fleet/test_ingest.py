"""The batching ingest writer (fleet/ingest.py) on real SQLite, and through the fleet's real paho client and the
real embedded broker: the ingest rules one row each, a batch with a row the database refuses, resends after the
commit and off paho's thread, API registration racing the first MQTT message, backpressure, and stop draining."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from fleet import crud
from fleet.db import Database, open_database
from fleet.ingest import IngestStats, IngestWriter, Item, store_batch, store_message
from fleet.messaging import FleetMessaging
from fleet.models import OutboxMessage, Bundle, Command, DeploymentTarget, Device, StatusReportRow, TelemetrySample
from fleet.settings import Settings
from protocol import topics
from protocol.messages import DeployCommand, Presence, StatusReport, Telemetry, UpdateState, encode, parse_message

from fleet.api.app import create_app

from .conftest import ADMIN, wait_until

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
BAD_SEQ = 666  # a telemetry sample with this seq is refused by a trigger in the database (the "bad row")


def telemetry(device: str = "dev-a", seq: int = 1) -> Telemetry:
    return Telemetry(device_id=device, uptime_s=seq, requests_total=seq, tokens_generated_total=0, tokens_per_s=0,
                     cpu_percent=1, memory_rss_mb=50, memory_percent=1, seq=seq, sent_at=NOW)


def status(state: UpdateState, seq: int, device: str = "dev-a", active: int | None = None) -> StatusReport:
    return StatusReport(device_id=device, deployment_id="dep1", bundle_name="tiny", bundle_version=1, state=state,
                        active_version=active, seq=seq, sent_at=NOW)


def presence(device: str = "dev-a", online: bool = True) -> Presence:
    return Presence(device_id=device, online=online, agent_version="0.1", sent_at=NOW)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """Real SQLite with dev-a registered, bundle tiny v1 stored and deployment dep1 sending it to dev-a."""
    database = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    with database.sessions() as s, s.begin():
        crud.register_device(s, device_id="dev-a", groups=["lab"], now=NOW)
        bundle = Bundle(name="tiny", version=1, sha256="0" * 64, size=1, storage_path="tiny/1", manifest={},
                        signer_keyids=[], uploaded_at=NOW)
        s.add(bundle)
        s.flush()
        dep = crud.create_deployment(s, deployment_id="dep1", bundle=bundle, target_kind="device", target_value="dev-a",
                                     device_ids=["dev-a"], now=NOW)
        dep.targets[0].released_at = NOW  # its command went out (as fleet.deployments.plan_deployment marks it)
        s.execute(text(f"CREATE TRIGGER bad_row BEFORE INSERT ON telemetry_samples WHEN NEW.seq = {BAD_SEQ} "
                       "BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"))
    yield database
    database.close()


def writer_settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "fleet", public_url="http://fleet.test:8700", **kw)  # type: ignore[arg-type]


def run_batches(tmp_path: Path, db: Database, batches: list[list]) -> tuple[IngestStats, list[DeployCommand]]:
    """Write each list of messages as one batch (all queued before the writer starts; one writer per batch), and
    return the summed counters and every deploy command the writers queued in the outbox."""
    with db.sessions() as s:
        before = s.scalar(select(func.max(OutboxMessage.id))) or 0
    total: dict[str, int] = {}
    for batch in batches:
        w = IngestWriter(writer_settings(tmp_path, ingest_batch_max=1000), db.sessions, clock=lambda: NOW)
        for msg in batch:
            assert w.submit(msg)
        w.start()
        assert w.stop(5), "the writer did not drain its batch"
        for k, v in vars(w.stats()).items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
    with db.sessions() as s:
        rows = s.scalars(select(OutboxMessage.payload).where(OutboxMessage.id > before).order_by(OutboxMessage.id))
        sent = [m for m in map(parse_message, rows) if isinstance(m, DeployCommand)]
    return IngestStats(**total), sent


def db_state(db: Database) -> dict:
    with db.sessions() as s:
        target = s.scalars(select(DeploymentTarget)).one()
        return {
            "telemetry": sorted((r.device_id, r.seq) for r in s.scalars(select(TelemetrySample))),
            "history": [(r.state, r.seq) for r in s.scalars(select(StatusReportRow).order_by(StatusReportRow.id))],
            "target": (target.state, target.last_seq),
            "devices": {d.id: (d.online, d.last_seen is not None) for d in s.scalars(select(Device))},
            "commands": s.scalar(select(func.count()).select_from(Command)),
        }


T1, T2, BAD = telemetry(seq=1), telemetry(seq=2), telemetry(seq=BAD_SEQ)
ACTIVE, VERIFYING = status(UpdateState.ACTIVE, 9, active=1), status(UpdateState.VERIFYING, 7)

# id, batches, expected changes against the fixture's state, expected counters (stored, duplicates, dropped_failed)
RULES = [
    ("duplicate_in_one_batch", [[T1, T1, T2]], {"telemetry": [("dev-a", 1), ("dev-a", 2)]}, (2, 1, 0)),
    ("duplicate_across_batches", [[T1], [T1, T2], [T2]], {"telemetry": [("dev-a", 1), ("dev-a", 2)]}, (2, 2, 0)),
    ("status_redelivered", [[ACTIVE], [ACTIVE]], {"history": [("active", 9)], "target": ("active", 9)}, (1, 1, 0)),
    ("old_status_after_new_in_one_batch", [[ACTIVE, VERIFYING]],
     {"history": [("active", 9), ("verifying", 7)], "target": ("active", 9)}, (2, 0, 0)),
    ("old_status_after_new_across_batches", [[ACTIVE], [VERIFYING]],
     {"history": [("active", 9), ("verifying", 7)], "target": ("active", 9)}, (2, 0, 0)),
    ("new_status_after_old", [[VERIFYING], [ACTIVE]],
     {"history": [("verifying", 7), ("active", 9)], "target": ("active", 9)}, (2, 0, 0)),
    ("unknown_device_creates_its_row", [[telemetry("dev-new", 1)], [presence("dev-p2")]],
     {"telemetry": [("dev-new", 1)], "devices": {"dev-a": (False, False), "dev-new": (False, True),
                                                 "dev-p2": (True, True)}}, (2, 0, 0)),
    ("one_bad_row_keeps_the_rest", [[T1, BAD, ACTIVE, T2]],
     {"telemetry": [("dev-a", 1), ("dev-a", 2)], "history": [("active", 9)], "target": ("active", 9)}, (3, 0, 1)),
    ("presence_online_resends_the_unfinished_command", [[presence()]],
     {"devices": {"dev-a": (True, True)}, "commands": 1}, (1, 0, 0)),
    ("presence_offline_resends_nothing", [[presence(online=False)]], {"devices": {"dev-a": (False, True)}}, (1, 0, 0)),
    ("finished_target_resends_nothing", [[ACTIVE, presence()]],
     {"history": [("active", 9)], "target": ("active", 9), "devices": {"dev-a": (True, True)}}, (2, 0, 0)),
]


@pytest.mark.parametrize("batches,changes,counts", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_ingest_rules(tmp_path: Path, db: Database, caplog, batches: list, changes: dict, counts: tuple) -> None:
    caplog.set_level(logging.INFO, logger="fleet.ingest")
    heard = {"devices": {"dev-a": (False, True)}}  # any message from dev-a stamps last_seen
    expected = db_state(db) | ({} if "devices" in changes else heard) | changes
    stats, sent = run_batches(tmp_path, db, batches)
    assert db_state(db) == expected
    assert (stats.stored, stats.duplicates, stats.dropped_failed) == counts
    assert stats.dropped_full == stats.dropped_stop == 0
    assert [(c.device_id, c.deployment_id) for c in sent] == [("dev-a", "dep1")] * changes.get("commands", 0)
    assert stats.resent == len(sent)
    if stats.dropped_failed:  # the bad row: one line, says which message and why, never the payload's fields
        assert stats.fallbacks == 1 and stats.batches == 0
        [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("could not store")]
        assert BAD.message_id in line and "refused by the test trigger" in line
        assert "\n" not in line and "uptime" not in line and "parameters" not in line and "INSERT" not in line
    else:
        assert stats.fallbacks == 0 and stats.batches == len(batches)


def test_a_batch_that_fails_once_is_stored_whole_one_by_one(tmp_path: Path, db: Database) -> None:
    calls: list[int] = []

    def flaky(s, items: list[Item], settings: Settings):  # the batch's transaction fails once (e.g. a lock timeout)
        calls.append(len(items))
        written = store_batch(s, items, settings)
        if len(calls) == 1:
            raise RuntimeError("the database went away for a moment")  # after writing: the rollback must undo it
        return written

    w = IngestWriter(writer_settings(tmp_path), db.sessions, clock=lambda: NOW, store=flaky)
    for m in (T1, T2, ACTIVE):
        w.submit(m)
    w.start()
    assert w.stop(5)
    st = w.stats()
    assert calls == [3, 1, 1, 1]
    assert (st.stored, st.dropped, st.fallbacks, st.batches, st.acked) == (3, 0, 1, 0, 3)
    assert db_state(db)["telemetry"] == [("dev-a", 1), ("dev-a", 2)]
    assert db_state(db)["history"] == [("active", 9)]


BAD_INBOUND = [
    ("not_json", str(topics.status("dev-a")), b"not json"),
    ("wrong_channel", str(topics.telemetry("dev-a")), encode(presence())),
    ("other_devices_topic", str(topics.presence("dev-b")), encode(presence("dev-a"))),
    ("too_large", str(topics.status("dev-a")), b"{" + b" " * 70_000 + b"}"),
    ("bad_topic", "slmops/v1/devices/../status", encode(status(UpdateState.ACTIVE, 1))),
    ("cleared_retained_presence", str(topics.presence("dev-a")), b""),
]


@pytest.mark.parametrize("topic,payload", [r[1:] for r in BAD_INBOUND], ids=[r[0] for r in BAD_INBOUND])
def test_a_malformed_message_never_reaches_the_queue(tmp_path: Path, db: Database, topic: str, payload: bytes) -> None:
    fleet = FleetMessaging(writer_settings(tmp_path, broker_url="mqtt://127.0.0.1:1"), db.sessions)  # never started
    assert fleet.ingest(topic, payload) is False
    assert fleet.writer.queue.qsize() == 0
    assert fleet.rejected == (0 if payload == b"" else 1)
    assert fleet.ingest(str(topics.telemetry("dev-a")), encode(T1)) is True  # the same path queues a good one
    assert fleet.writer.queue.qsize() == 1


def held_store(gate: threading.Event) -> Callable:
    def store(s, items: list[Item], settings: Settings):
        assert gate.wait(10), "the test never released the writer"
        return store_batch(s, items, settings)

    return store


def test_a_full_queue_waits_at_most_the_put_timeout_then_drops_and_counts(tmp_path: Path, db: Database, caplog) -> None:
    w = IngestWriter(writer_settings(tmp_path, ingest_queue_max=1, ingest_put_timeout_s=0.2), db.sessions)  # not started: nobody drains
    assert w.submit(T1)
    began = time.monotonic()
    assert w.submit(T2) is False
    assert 0.15 < time.monotonic() - began < 2
    assert (w.stats().dropped_full, w.stats().queued) == (1, 1)
    assert any(T2.message_id in r.getMessage() and "queue stayed full" in r.getMessage() for r in caplog.records)


def test_stop_writes_everything_queued_before_it(tmp_path: Path, db: Database) -> None:
    w = IngestWriter(writer_settings(tmp_path, ingest_batch_max=7), db.sessions)
    samples = [telemetry(seq=i) for i in range(1, 51)]
    for m in samples:
        w.submit(m)
    w.start()
    assert w.stop()
    st = w.stats()
    assert (st.stored, st.queued, st.dropped, st.batches, st.last_batch_size) == (50, 0, 0, 8, 50 - 7 * 7)
    assert len(db_state(db)["telemetry"]) == 50


def test_stop_gives_up_after_its_timeout_and_counts_what_is_left(tmp_path: Path, db: Database) -> None:
    gate = threading.Event()
    w = IngestWriter(writer_settings(tmp_path, ingest_batch_max=1), db.sessions,                      store=held_store(gate))
    for i in range(1, 5):
        w.submit(telemetry(seq=i))
    w.start()
    wait_until(lambda: w.stats().queued == 3, what="the writer to take its first message")
    began = time.monotonic()
    assert w.stop(0.3) is False
    assert time.monotonic() - began < 2
    assert w.stats().dropped_stop == 3
    gate.set()
    w.writer_thread.join(5)


# ---- through the real broker and the fleet's own paho client -------------------------------------------------


def count(client: TestClient, table: type) -> int:
    with client.app.state.fleet.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


@pytest.fixture
def stored(client: TestClient, make_bundle) -> None:
    assert client.post("/api/v1/bundles", content=make_bundle("tiny", 1).read_bytes()).status_code == 201


def test_resend_on_presence_is_queued_by_the_batch_and_sent_by_the_outbox(client: TestClient, devices, stored) -> None:
    fleet = client.app.state.fleet
    writer, sessions = fleet.messaging.writer, fleet.db.sessions
    assert client.post("/api/v1/devices", json={"id": "dev-r"}).status_code == 201
    dep = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "device_id": "dev-r"}).json()
    wait_until(lambda: fleet.publisher.acknowledged >= 1, what="the first command acknowledged by the broker")
    seen: list[tuple[threading.Thread, set[str], int]] = []
    real = writer.after_batch

    def watching(kinds: set[str]) -> None:  # who tells, and is the resent command's outbox row committed already?
        with sessions() as s:
            queued = s.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.device_id == "dev-r"))
        seen.append((threading.current_thread(), kinds, queued or 0))
        real(kinds)

    writer.after_batch = watching
    agent = devices("slmops-agent-dev-r")
    agent.subscribe(str(topics.cmd("dev-r")))
    agent.publish(str(topics.presence("dev-r")), encode(Presence(device_id="dev-r", online=True, sent_at=NOW)))
    wait_until(lambda: len(agent.received()) == 1, what="the command sent again")
    [(thread, kinds, queued)] = [x for x in seen if "presence" in x[1]]
    assert thread is writer.writer_thread and thread is not fleet.messaging.client._thread
    assert "command" in kinds and queued == 2, "the resend was in the outbox when the batch committed"
    again = parse_message(agent.received()[0].payload)
    assert isinstance(again, DeployCommand) and again.deployment_id == dep["id"]
    assert fleet.messaging.ingest_stats().resent == 1


def test_api_registration_racing_the_first_mqtt_message(client: TestClient, devices) -> None:
    ids = [f"dev-{i:02d}" for i in range(16)]
    peers = {d: devices(f"slmops-agent-{d}") for d in ids}
    go = threading.Event()

    def first_messages() -> None:
        go.wait(5)
        for d in ids:  # each device's first message, as fast as the broker takes them
            peers[d].client.publish(str(topics.presence(d)), encode(Presence(device_id=d, online=True, sent_at=NOW)), qos=1)
            peers[d].client.publish(str(topics.telemetry(d)), encode(telemetry(d, 1)), qos=1)

    sender = threading.Thread(target=first_messages)
    sender.start()
    go.set()
    codes = [client.post("/api/v1/devices", json={"id": d, "groups": ["lab", d]}).status_code for d in ids]
    sender.join(10)
    assert all(c in (200, 201) for c in codes), codes
    wait_until(lambda: count(client, TelemetrySample) == len(ids), what="every first sample")
    wait_until(lambda: client.app.state.fleet.messaging.ingest_stats().queued == 0, what="the queue to drain")
    listed = {d["id"]: d for d in client.get("/api/v1/devices", params={"group": "lab"}).json()}
    assert sorted(listed) == ids
    assert all(listed[d]["groups"] == sorted(["lab", d]) for d in ids)
    assert all(listed[d]["online"] for d in ids)
    st = client.app.state.fleet.messaging.ingest_stats()
    assert (st.stored, st.dropped) == (2 * len(ids), 0)


def test_concurrent_registrations_and_first_messages_never_fail(tmp_path: Path) -> None:
    """Threads registering the same devices (with different groups) while others ingest their first messages: no
    IntegrityError, each device created once, its groups exactly one registration's."""
    database = open_database(f"sqlite:///{tmp_path / 'race.db'}")
    ids = [f"dev-{i:02d}" for i in range(30)]
    errors: list[BaseException] = []
    created: list[str] = []
    barrier = threading.Barrier(6)

    def register(groups: list[str]) -> None:
        barrier.wait()
        for d in ids:
            try:
                with database.sessions() as s, s.begin():
                    device, new = crud.register_device(s, device_id=d, groups=groups, now=NOW)
                    assert device.group_names == sorted(groups)
                if new:
                    created.append(d)
            except BaseException as exc:  # noqa: BLE001  (the test counts every failure)
                errors.append(exc)

    def ingest() -> None:
        barrier.wait()
        for d in ids:
            try:
                with database.sessions() as s, s.begin():
                    store_message(s, Item(presence(d), NOW + timedelta(seconds=1)), writer_settings(tmp_path))
                    store_message(s, Item(telemetry(d, 1), NOW), writer_settings(tmp_path))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    jobs = [threading.Thread(target=register, args=(g,)) for g in (["a"], ["a", "b"], ["c"], ["b", "c"])]
    jobs += [threading.Thread(target=ingest) for _ in range(2)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(30)
    assert errors == []
    with database.sessions() as s:
        devices_ = list(s.scalars(select(Device)))
        assert sorted(d.id for d in devices_) == ids
        assert all(d.group_names in (["a"], ["a", "b"], ["c"], ["b", "c"]) for d in devices_)
        assert all(d.online for d in devices_)
    assert len(created) == len(set(created))  # a registration says "created" for a device at most once
    database.close()


def test_a_held_writer_blocks_on_message_and_loses_nothing(settings: Settings, devices) -> None:
    small = settings.model_copy(update={"ingest_queue_max": 2, "ingest_batch_max": 1})
    with TestClient(create_app(small), headers=ADMIN) as client:
        fleet = client.app.state.fleet.messaging
        assert fleet.wait_connected(5)
        writer, gate = fleet.writer, threading.Event()
        writer.store = held_store(gate)  # the writer takes a message, then waits for the gate
        calls = {"in": 0, "out": 0}
        real_submit = writer.submit

        def counting(msg, ack):
            calls["in"] += 1
            try:
                return real_submit(msg, ack)
            finally:
                calls["out"] += 1

        writer.submit = counting
        agent = devices("slmops-agent-dev-b")
        infos = [agent.client.publish(str(topics.telemetry("dev-b")), encode(telemetry("dev-b", i)), qos=1)
                 for i in range(1, 11)]
        # the writer holds one message, the queue two, and paho's thread waits inside on_message with the fourth
        wait_until(lambda: calls == {"in": 4, "out": 3}, what="on_message to block on the full queue")
        time.sleep(0.3)
        assert calls == {"in": 4, "out": 3} and writer.stats().queued == 2
        assert count(client, TelemetrySample) == 0
        gate.set()
        wait_until(lambda: count(client, TelemetrySample) == 10, what="all ten samples once the writer resumes")
        assert all(i.is_published() for i in infos)
        st = writer.stats()
        assert (st.stored, st.dropped, st.duplicates) == (10, 0, 0)
        with client.app.state.fleet.db.sessions() as s:
            assert sorted(s.scalars(select(TelemetrySample.seq))) == list(range(1, 11))


def test_metrics_show_the_ingest_counters(client: TestClient, devices) -> None:
    agent = devices("slmops-agent-dev-m")
    for m in (telemetry("dev-m", 1),) * 2:
        agent.publish(str(topics.telemetry("dev-m")), encode(m))
    agent.publish(str(topics.status("dev-m")), b"not json")
    wait_until(lambda: client.app.state.fleet.messaging.ingest_stats().stored + client.app.state.fleet.messaging.ingest_stats().duplicates == 2,
               what="both copies handled")
    body = client.get("/metrics").text
    assert "slmops_ingest_messages_stored_total 1.0" in body
    assert "slmops_ingest_duplicates_total 1.0" in body
    assert 'slmops_ingest_dropped_total{reason="invalid"} 1.0' in body
    assert 'slmops_ingest_dropped_total{reason="queue_full"} 0.0' in body
    assert "slmops_ingest_queue_depth 0.0" in body
    assert "slmops_ingest_last_batch_size" in body
