"""Settings and the database layer on a real SQLite file and a real PostgreSQL database (`db_url` runs each test on
both): derived defaults, UTC timestamps, desired state, 64-bit integers, command seq numbers that two replicas
sharing the database never repeat, and registrations racing first messages."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from fleet import crud
from fleet.db import open_database
from fleet.deployments import plan_deployment
from fleet.models import AGENT_VERSION_CHARS, Bundle, OutboxMessage, TelemetrySample
from fleet.rollouts import RolloutSpec, create_rollout
from fleet.strategy import Gate, Strategy, TargetQuery
from protocol.messages import parse_message
from fleet.settings import Settings
from protocol.errors import ConfigError
from protocol.manifest import FileEntry, Manifest

from .conftest import NOW


def test_settings_derive_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLMOPS_FLEET_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("SLMOPS_FLEET_PORT", "9001")
    monkeypatch.setenv("SLMOPS_FLEET_TRUSTED_KEYS", '["a.pub", "b.pub"]')
    s = Settings()
    assert s.database_url == f"sqlite:///{(tmp_path / 'd' / 'fleet.db').as_posix()}"
    assert s.public_url == "http://127.0.0.1:9001"
    assert s.effective_broker_url == "mqtt://127.0.0.1:1883"
    assert s.trusted_keys == [Path("a.pub"), Path("b.pub")]
    assert s.bundle_url("tiny", 3) == "http://127.0.0.1:9001/api/v1/bundles/tiny/3/file"


def test_bad_database_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a database URL"):
        open_database("definitely not a url")


def test_registering_again_replaces_groups(db_url: str) -> None:
    db = open_database(db_url)
    try:
        for groups in (["lab", "edge"], ["lab", "north"], []):
            with db.sessions() as s, s.begin():
                crud.register_device(s, device_id="dev", groups=groups, now=NOW)
            with db.sessions() as s:
                assert [d.group_names for d in crud.list_devices(s)] == [sorted(groups)]
                assert [d.id for d in crud.list_devices(s, group="lab")] == (["dev"] if "lab" in groups else [])
    finally:
        db.close()


def test_the_protocols_largest_integers_and_long_free_text_are_stored(db_url: str) -> None:
    """Versions, sizes and counters up to 2**63 - 1 (a 32-bit INTEGER on PostgreSQL would refuse them), and an
    agent_version longer than its column (kept to AGENT_VERSION_CHARS instead of failing the message)."""
    from protocol.manifest import MAX_VERSION
    from protocol.messages import Presence, Telemetry

    db = open_database(db_url)
    try:
        with db.sessions() as s, s.begin():
            manifest = Manifest(name="big", version=MAX_VERSION, files=(FileEntry(path="m.onnx", size=1, sha256="a" * 64),),
                                created=NOW)
            crud.add_bundle(s, manifest=manifest, sha256="b" * 64, size=8 << 30, storage_path="x", signer_keyids=[], now=NOW)
            crud.record_presence(s, msg=Presence(device_id="dev", online=True, agent_version="v" * 300, seq=MAX_VERSION,
                                                 sent_at=NOW), now=NOW)
            assert crud.record_telemetry(s, msg=Telemetry(
                device_id="dev", uptime_s=1e12, requests_total=MAX_VERSION, tokens_generated_total=MAX_VERSION - 1,
                tokens_per_s=0, cpu_percent=1, memory_rss_mb=50, memory_percent=1, seq=MAX_VERSION, sent_at=NOW), now=NOW)
        with db.sessions() as s:
            bundle = crud.get_bundle(s, name="big", version=MAX_VERSION)
            assert bundle is not None and bundle.size == 8 << 30
            device = crud.get_device(s, device_id="dev")
            assert device is not None and device.agent_version == "v" * AGENT_VERSION_CHARS
            sample = s.scalars(select(TelemetrySample)).one()
            assert (sample.seq, sample.requests_total, sample.tokens_generated_total) == (
                MAX_VERSION, MAX_VERSION, MAX_VERSION - 1)
    finally:
        db.close()


def _bundle(s, version: int) -> Bundle:
    manifest = Manifest(name="tiny", version=version, files=(FileEntry(path="m.onnx", size=1, sha256="a" * 64),), created=NOW)
    return crud.add_bundle(s, manifest=manifest, sha256="b" * 64, size=10, storage_path="x", signer_keyids=[], now=NOW)


def test_timestamps_come_back_as_utc_and_newest_deployment_is_desired(tmp_path: Path, db_url: str) -> None:
    db = open_database(db_url)
    settings = Settings(data_dir=tmp_path)
    try:
        local = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
        with db.sessions() as s, s.begin():
            crud.register_device(s, device_id="dev", groups=["g"], now=local)
            _bundle(s, 1)
            _bundle(s, 2)
            first = plan_deployment(s, settings=settings, bundle_name="tiny", version=2, device_id="dev", now=NOW)
            spec = RolloutSpec(bundle_name="tiny", bundle_version=1, query=TargetQuery.group("g"),
                               strategy=Strategy.immediate(), gate=Gate(no_regression=False))
            second = create_rollout(s, spec, settings=settings, actor="test", now=NOW).deployment
        with db.sessions() as s:
            device = crud.get_device(s, device_id="dev")
            assert device is not None and device.registered_at == datetime(2026, 1, 1, 10, tzinfo=timezone.utc)
            desired = crud.desired_target(s, device_id="dev")
            assert desired is not None and desired.deployment_id == second.id != first.id
            assert desired.deployment.bundle_version == 1
    finally:
        db.close()


def test_command_seq_grows_across_replicas_sharing_the_database(tmp_path: Path, db_url: str) -> None:
    replica_a, replica_b = open_database(db_url), open_database(db_url)
    settings = Settings(data_dir=tmp_path)
    try:
        with replica_a.sessions() as s, s.begin():
            crud.register_device(s, device_id="dev", groups=[], now=NOW)
            _bundle(s, 1)
        seqs = []
        for db in (replica_a, replica_b, replica_a, replica_b):
            with db.sessions() as s, s.begin():
                plan_deployment(s, settings=settings, bundle_name="tiny", version=1, device_id="dev", now=NOW)
            with db.sessions() as s:
                payload = s.scalars(select(OutboxMessage.payload).order_by(OutboxMessage.id.desc())).first()
            assert payload is not None
            seqs.append(parse_message(payload).seq)
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
    finally:
        replica_a.close()
        replica_b.close()


def test_concurrent_registrations_and_first_messages_never_fail(db_url: str) -> None:
    """Threads registering the same devices (with different groups) while others store their first presence and
    telemetry: no IntegrityError, each device created once, its groups exactly one registration's."""
    import threading

    from sqlalchemy import select

    from fleet.models import Device
    from protocol.messages import Presence, Telemetry

    database = open_database(db_url)
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

    def first_messages() -> None:
        barrier.wait()
        for i, d in enumerate(ids):
            try:
                with database.sessions() as s, s.begin():
                    crud.record_presence(s, msg=Presence(device_id=d, online=True, seq=1, sent_at=NOW), now=NOW)
                    crud.record_telemetry(s, msg=Telemetry(
                        device_id=d, uptime_s=1, requests_total=0, tokens_generated_total=0, tokens_per_s=0,
                        cpu_percent=1, memory_rss_mb=50, memory_percent=1, seq=i, sent_at=NOW), now=NOW)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    jobs = [threading.Thread(target=register, args=(g,)) for g in (["a"], ["a", "b"], ["c"], ["b", "c"])]
    jobs += [threading.Thread(target=first_messages) for _ in range(2)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(30)
    assert errors == []
    with database.sessions() as s:
        devices = list(s.scalars(select(Device)))
        assert sorted(d.id for d in devices) == ids
        assert all(d.group_names in (["a"], ["a", "b"], ["c"], ["b", "c"]) for d in devices)
        assert all(d.online for d in devices)
    assert len(created) == len(set(created))  # a registration says "created" for a device at most once (the first
    # message may have created it first)
    database.close()


def test_a_fleet_opening_sqlite_while_another_process_writes_waits_instead_of_failing(tmp_path: Path) -> None:
    """Switching a new file to WAL against another connection's open write transaction makes SQLite answer
    "database is locked" at once, busy timeout or not (each side holds what the other needs); the fleet tries again
    until the writer commits (seen in CI: fleet processes starting together while one migrates)."""
    import sqlite3
    import threading
    import time

    path = tmp_path / "fleet.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE other_process (x)")
    done = threading.Timer(0.5, lambda: writer.execute("COMMIT"))
    done.start()
    started = time.monotonic()
    db = open_database(f"sqlite:///{path}")
    try:
        assert time.monotonic() - started >= 0.4, "it waited for the other writer"
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        done.join()
        writer.close()
        db.close()
