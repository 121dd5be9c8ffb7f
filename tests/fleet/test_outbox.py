"""The command outbox on a real SQLite database, with the MQTT link behind its interface: rows are marked sent only
on PUBACK, in order, everything unacknowledged goes again after a reconnect or after `republish_after_s`, paho's
message ids never wrap onto an unacknowledged one, and old rows are pruned."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from fleet import outbox
from fleet.db import Database, open_database
from fleet.models import OutboxMessage
from fleet.outbox import OutboxPublisher
from protocol.messages import CancelCommand, parse_message

from .conftest import NOW


class Link:
    """Stands in for FleetMessaging: records what was published and hands out paho-like message ids."""

    def __init__(self) -> None:
        self.generation, self.connected, self.refuse = 1, True, False
        self.sent: list[tuple[int, bytes]] = []
        self._mid = 0

    def publish_raw(self, topic: str, payload: bytes) -> int | None:
        if self.refuse:
            return None
        self._mid = self._mid % 65535 + 1
        self.sent.append((self._mid, payload))
        return self._mid


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield d
    d.close()


def queue(db: Database, n: int, device: str = "dev") -> list[str]:
    ids = []
    with db.sessions() as s, s.begin():
        for i in range(n):
            cmd = CancelCommand(message_id=uuid.uuid4().hex, seq=i + 1, sent_at=NOW, deployment_id="d1", device_id=device)
            outbox.enqueue(s, cmd, now=NOW)
            ids.append(cmd.message_id)
    return ids


def unsent(db: Database) -> int:
    with db.sessions() as s:
        return outbox.unsent_count(s)


def test_rows_go_out_in_order_and_count_as_sent_only_on_puback(db: Database) -> None:
    ids = queue(db, 5)
    link = Link()
    pub = OutboxPublisher(db.sessions, link, batch=2, clock=lambda: NOW)
    while pub.drain_once():
        pass
    assert [parse_message(p).message_id for _, p in link.sent] == ids, "in the order they were queued"
    assert unsent(db) == 5 and pub.unacked == 5
    for mid, _ in link.sent[:3]:
        pub.on_published(mid)
    pub.drain_once()
    assert unsent(db) == 2 and pub.acknowledged == 3
    pub.drain_once()
    assert len(link.sent) == 5, "nothing is published twice while its PUBACK may still come"


def test_a_reconnect_publishes_again_what_was_not_acknowledged(db: Database) -> None:
    queue(db, 3)
    link = Link()
    pub = OutboxPublisher(db.sessions, link, clock=lambda: NOW)
    pub.drain_once()
    pub.on_published(link.sent[0][0])
    link.connected = False
    assert pub.drain_once() is False and len(link.sent) == 3, "nothing goes out while disconnected"
    link.connected, link.generation = True, 2
    pub.drain_once()
    again = [parse_message(p).seq for _, p in link.sent[3:]]
    assert again == [2, 3] and pub.republished == 2 and unsent(db) == 2


def test_a_missing_puback_is_republished_after_the_limit(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    queue(db, 2)
    link = Link()
    pub = OutboxPublisher(db.sessions, link, republish_after_s=30, clock=lambda: NOW)
    t = [1000.0]
    monkeypatch.setattr("fleet.outbox.time.monotonic", lambda: t[0])
    pub.drain_once()
    pub.on_published(link.sent[0][0])
    t[0] += 29
    pub.drain_once()
    assert len(link.sent) == 2
    t[0] += 2
    pub.drain_once()
    assert [parse_message(p).seq for _, p in link.sent[2:]] == [2] and unsent(db) == 1


def test_unacknowledged_messages_stay_under_the_cap(db: Database) -> None:
    queue(db, 10)
    link = Link()
    pub = OutboxPublisher(db.sessions, link, max_unacked=4, clock=lambda: NOW)
    while pub.drain_once():
        pass
    assert len(link.sent) == 4 and pub.unacked == 4
    pub.on_published(link.sent[0][0])
    pub.drain_once()
    assert len(link.sent) == 5


def test_a_refused_publish_is_tried_again_later(db: Database) -> None:
    queue(db, 1)
    link = Link()
    link.refuse = True
    pub = OutboxPublisher(db.sessions, link, clock=lambda: NOW)
    assert pub.drain_once() is False and link.sent == [] and unsent(db) == 1
    link.refuse, link.generation = False, 2
    pub.drain_once()
    assert len(link.sent) == 1


def test_prune_deletes_only_old_acknowledged_rows(db: Database) -> None:
    queue(db, 3)
    with db.sessions() as s, s.begin():
        rows = s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
        rows[0].sent_at = NOW - timedelta(days=2)
        rows[1].sent_at = NOW
    with db.sessions() as s, s.begin():
        assert outbox.prune(s, before=NOW - timedelta(days=1)) == 1
    with db.sessions() as s:
        assert s.scalar(select(OutboxMessage.id).order_by(OutboxMessage.id)) == rows[1].id
        assert outbox.unsent_count(s) == 1


def test_the_reconciler_prunes_old_acknowledged_rows(db: Database) -> None:
    from fleet.rollouts import Reconciler
    from fleet.settings import Settings

    queue(db, 2)
    with db.sessions() as s, s.begin():
        for row in s.scalars(select(OutboxMessage)):
            row.sent_at = NOW - timedelta(days=3)
    poked = []
    Reconciler(db.sessions, Settings(data_dir=Path("unused")), on_commands=lambda: poked.append(1),
               clock=lambda: NOW).run_once()
    assert poked == [1]
    with db.sessions() as s:
        assert s.scalar(select(OutboxMessage.id)) is None
