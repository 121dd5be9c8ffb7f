"""Telemetry is stored once per message_id (a QoS 1 redelivery or an outbox re-send adds nothing), on the real
SQLite engine, over a real broker, and with the statement PostgreSQL would run; the fleet's reconnect backoff is
capped by a setting."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql

from fleet import crud
from fleet.db import open_database
from fleet.messaging import FleetMessaging
from fleet.models import TelemetrySample
from fleet.settings import Settings
from protocol import topics
from protocol.messages import Telemetry, encode

from .conftest import wait_until

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def telemetry(seq: int, **kw) -> Telemetry:
    return Telemetry(device_id="dev-t", uptime_s=seq, requests_total=seq, tokens_generated_total=0, tokens_per_s=0,
                     cpu_percent=1, memory_rss_mb=50, memory_percent=1, seq=seq, sent_at=NOW, **kw)


def rows(sessions) -> list[TelemetrySample]:
    with sessions() as s:
        return list(s.scalars(select(TelemetrySample).order_by(TelemetrySample.id)))


@pytest.mark.parametrize("upsert", [True, False], ids=["on_conflict", "check_first"])
def test_a_sample_is_stored_once_per_message_id(db_url: str, monkeypatch, upsert: bool) -> None:
    if not upsert:
        monkeypatch.setattr(crud, "_UPSERT", {})  # the path for databases without ON CONFLICT
    db = open_database(db_url)
    first, other = telemetry(1), telemetry(2)
    results = []
    for msg, at in ((first, NOW), (first, NOW + timedelta(seconds=5)), (other, NOW), (first, NOW)):
        with db.sessions() as s, s.begin():
            results.append(crud.record_telemetry(s, msg=msg, now=at))
    assert results == [True, False, True, False]
    got = rows(db.sessions)
    assert [(r.message_id, r.seq, r.sent_at, r.received_at) for r in got] == [
        (first.message_id, 1, NOW, NOW),
        (other.message_id, 2, NOW, NOW),
    ]
    db.close()


def test_postgresql_runs_one_insert_that_ignores_a_duplicate() -> None:
    stmt = crud._UPSERT["postgresql"](TelemetrySample).values(message_id="m", device_id="d").on_conflict_do_nothing(
        index_elements=["message_id"]
    )
    sql = str(stmt.compile(dialect=postgresql.dialect()))
    assert "ON CONFLICT (message_id) DO NOTHING" in sql
    assert any(c.unique for c in TelemetrySample.__table__.c if c.name == "message_id")


@pytest.mark.both_databases
def test_a_redelivered_sample_over_the_broker_is_stored_once(client: TestClient, devices) -> None:
    agent = devices("slmops-agent-dev-t")
    topic = str(topics.telemetry("dev-t"))
    a, b = telemetry(1), telemetry(2)
    for m in (a, a, b, a):
        agent.publish(topic, encode(m))
    sessions = client.app.state.fleet.db.sessions

    def count() -> int:
        with sessions() as s:
            return s.scalar(select(func.count()).select_from(TelemetrySample)) or 0

    wait_until(lambda: count() == 2, what="two samples")
    agent.publish(topic, encode(telemetry(3)))  # once this one is in, every duplicate before it has been handled
    wait_until(lambda: count() == 3, what="the third sample")
    assert sorted(r.seq for r in rows(sessions)) == [1, 2, 3]


def test_fleet_reconnect_backoff_is_capped_by_a_setting(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).reconnect_max_s == 10.0
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, reconnect_max_s=0)
    settings = Settings(data_dir=tmp_path, broker_url="mqtt://127.0.0.1:1", reconnect_max_s=3)
    db = open_database(settings.database_url)
    messaging = FleetMessaging(settings, db.sessions)
    assert (messaging.client._reconnect_min_delay, messaging.client._reconnect_max_delay) == (1.0, 3.0)
    db.close()
