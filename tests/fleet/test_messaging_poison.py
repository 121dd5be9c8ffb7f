"""Poison payloads through a real amqtt broker into the fleet: each is dropped with a one-line log, and the fleet's
MQTT network thread lives on, so a valid status report published afterwards is stored."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fleet import crud
from fleet.models import StatusReportRow
from protocol import topics
from protocol.messages import StatusReport, UpdateState, encode

from .conftest import wait_until

STATUS = str(topics.status("dev-p"))
GOOD = {"kind": "status", "device_id": "dev-p", "deployment_id": "d1", "bundle_name": "tiny", "bundle_version": 1,
        "state": "active", "sent_at": "2026-01-01T00:00:00Z"}

POISON = [
    ("digits_100k", b"9" * 100_000),
    ("digits_60k_in_json", b'{"kind": "status", "seq": ' + b"9" * 60_000 + b"}"),
    ("nested_100k", b"[" * 100_000 + b"]" * 100_000),
    ("nested_30k", b"[" * 30_000 + b"]" * 30_000),
    ("invalid_utf8", b'{"kind": "status", "device_id": "\xff\xfe"}'),
    ("invalid_utf8_bare", b"\x80\x81\x82" * 100),
    ("one_mib", b"{" + b" " * (1 << 20) + b"}"),
    ("empty", b""),
    ("array", b"[]"),
    ("null", b"null"),
    ("string", b'"status"'),
    ("number", b"42"),
    ("device_id_list", json.dumps({**GOOD, "device_id": ["dev-p"]}).encode()),
    ("deployment_dotdot", json.dumps({**GOOD, "deployment_id": ".."}).encode()),
    ("deployment_newline", json.dumps({**GOOD, "deployment_id": "d1\n"}).encode()),
    ("deployment_10k", json.dumps({**GOOD, "deployment_id": "d" * 10_000}).encode()),
    ("version_2_63", json.dumps({**GOOD, "bundle_version": 2**63}).encode()),
    ("unknown_key_60k", json.dumps({**GOOD, "k" * 60_000: 1}).encode()),
]


def stored(client: TestClient) -> int:
    with client.app.state.fleet.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(StatusReportRow)) or 0


def valid_report(seq: int) -> bytes:
    return encode(StatusReport(device_id="dev-p", deployment_id="d1", bundle_name="tiny", bundle_version=1,
                               state=UpdateState.ACTIVE, active_version=1, seq=seq, sent_at=datetime.now(timezone.utc)))


def dropped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fleet.messaging" and "dropped" in r.getMessage()]


@pytest.mark.parametrize("payload", [p for _, p in POISON], ids=[n for n, _ in POISON])
def test_poison_is_dropped_and_the_next_report_is_stored(client: TestClient, devices, caplog, payload: bytes) -> None:
    caplog.set_level(logging.WARNING, logger="fleet.messaging")
    peer = devices("slmops-agent-dev-p")
    peer.publish(STATUS, payload)
    peer.publish(STATUS, valid_report(1))
    wait_until(lambda: stored(client) == 1, what="the valid report after the poison")
    lines = dropped(caplog)
    assert len(lines) == 1, lines
    assert "\n" not in lines[0] and len(lines[0]) < 700, lines[0][:200]
    assert STATUS in lines[0]
    assert client.app.state.fleet.messaging.connected


def test_all_poison_in_a_row_then_reports_still_land(client: TestClient, devices, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="fleet.messaging")
    peer = devices("slmops-agent-dev-p")
    for _, payload in POISON:
        peer.publish(STATUS, payload)
    peer.publish(STATUS, valid_report(1))
    wait_until(lambda: stored(client) == 1, what="the valid report after every poison")
    assert len(dropped(caplog)) == len(POISON)
    assert max(len(line) for line in dropped(caplog)) < 700


def test_a_handler_bug_drops_one_message_only(client: TestClient, devices, caplog, monkeypatch) -> None:
    caplog.set_level(logging.WARNING)
    real, calls = crud.apply_status, []

    def buggy(**kw):  # a bug one message always sets off; the writer retries its batch one by one
        calls.append(kw["msg"].seq)
        if kw["msg"].seq == 1:
            raise OverflowError("Python int too large to convert to SQLite INTEGER " + "x" * 5000)
        return real(**kw)

    monkeypatch.setattr(crud, "apply_status", buggy)
    peer = devices("slmops-agent-dev-p")
    peer.publish(STATUS, valid_report(1))
    peer.publish(STATUS, valid_report(2))
    wait_until(lambda: stored(client) == 1, what="the report after the one the bug dropped")
    assert sorted(set(calls)) == [1, 2]
    with client.app.state.fleet.db.sessions() as s:
        assert s.scalars(select(StatusReportRow.seq)).all() == [2]
    [line] = [r.getMessage() for r in caplog.records if r.name == "fleet.ingest" and "unexpected error" in r.getMessage()]
    assert "OverflowError" in line and "dropped status" in line and len(line) < 700 and "\n" not in line
    assert client.app.state.fleet.messaging.ingest_stats().dropped_failed == 1
