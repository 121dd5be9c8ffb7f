"""The command outbox: every command to a device is a row first, and one publisher sends the rows in order.

Workflow: whoever decides a device gets a command (a deployment, the rollout engine, a device back online) calls
`enqueue(s, command, now=)` inside the same transaction that records the decision, so a crash either keeps both or
neither: no command is lost between the database and the broker, and none is sent for a decision rolled back.
After the commit it calls `OutboxPublisher.poke()`.

`OutboxPublisher` (one thread per fleet process) reads unsent rows in id order, `batch` at a time, publishes each
at QoS 1 through the link, and marks rows sent (`sent_at`) only once the broker acknowledged them (PUBACK,
`on_published(mid)` from paho's thread, which only appends to a deque: paho calls it holding its own locks).
Rows published but not acknowledged within `republish_after_s`, and every unacknowledged row after a reconnect,
are published again: a device may see a command twice, and drops the second as a replay of a seq it has passed.
At most `max_unacked` rows are in flight (paho's 16-bit message ids must never wrap onto an unacknowledged one).
Rows sent more than `keep_sent_s` ago are pruned by `prune()`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Protocol

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from protocol import topics
from protocol.messages import CancelCommand, DeployCommand, encode

from .models import OutboxMessage
from .worker import Worker

log = logging.getLogger(__name__)

Command = DeployCommand | CancelCommand


class Link(Protocol):
    """What the publisher needs from MQTT (fleet.messaging.FleetMessaging provides it)."""

    @property
    def generation(self) -> int: ...  # grows on every (re)connect; 0 while never connected

    @property
    def connected(self) -> bool: ...

    def publish_raw(self, topic: str, payload: bytes) -> int | None: ...  # paho mid, or None if not queued


def enqueue(s: Session, command: Command, *, now: datetime) -> OutboxMessage:
    row = OutboxMessage(device_id=command.device_id, topic=str(topics.cmd(command.device_id)), payload=encode(command),
                        created_at=now, sent_at=None)
    s.add(row)
    return row


def enqueue_many(s: Session, commands: list[Command], *, now: datetime) -> None:
    """`enqueue` for many commands with one multi-row INSERT."""
    if commands:
        s.execute(insert(OutboxMessage), [dict(device_id=c.device_id, topic=str(topics.cmd(c.device_id)),
                                               payload=encode(c), created_at=now, sent_at=None) for c in commands])


def unsent_count(s: Session) -> int:
    from sqlalchemy import func

    return s.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))) or 0


def prune(s: Session, *, before: datetime, limit: int = 10_000) -> int:
    """Delete at most `limit` rows acknowledged before `before`; returns how many."""
    ids = s.scalars(select(OutboxMessage.id).where(OutboxMessage.sent_at < before).limit(limit)).all()
    if ids:
        s.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))
    return len(ids)


class OutboxPublisher(Worker):
    name = "slmops-outbox"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        link: Link,
        *,
        batch: int = 1000,
        max_unacked: int = 20_000,
        republish_after_s: float = 30.0,
        idle_s: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        super().__init__(idle_s=idle_s)
        self.sessions, self.link, self.clock = sessions, link, clock
        self.batch, self.max_unacked, self.republish_after_s = batch, max_unacked, republish_after_s
        self._acked: deque[int] = deque()  # mids paho reported acknowledged (appended from paho's thread)
        self._inflight: dict[int, tuple[int, float]] = {}  # mid -> (row id, monotonic time published)
        self._highwater = 0  # rows up to this id were published on the current connection
        self._generation = -1
        self.published = 0  # counters for /metrics
        self.acknowledged = 0
        self.republished = 0

    def on_published(self, mid: int) -> None:
        """paho's thread: the broker acknowledged `mid`. Only records it (paho holds its locks here)."""
        self._acked.append(mid)

    @property
    def unacked(self) -> int:
        return len(self._inflight)

    # ---- the loop (fleet/worker.py runs it) --------------------------------------------------------------------

    def step(self) -> bool:
        return self.drain_once()

    def drain_once(self) -> bool:
        """Mark acknowledged rows sent, then publish the next batch; True if there may be more to do at once."""
        self._settle_acks()
        if not self.link.connected:
            return False
        if self.link.generation != self._generation:  # a new connection: everything unacknowledged goes again
            self._generation, self._highwater = self.link.generation, 0
            self.republished += len(self._inflight)
            self._inflight.clear()
        self._expire_stale()
        room = self.max_unacked - len(self._inflight)
        if room <= 0:
            return False
        with self.sessions() as s:
            rows = s.execute(
                select(OutboxMessage.id, OutboxMessage.topic, OutboxMessage.payload)
                .where(OutboxMessage.sent_at.is_(None), OutboxMessage.id > self._highwater)
                .order_by(OutboxMessage.id)
                .limit(min(self.batch, room))
            ).all()
        busy_rows = {row_id for row_id, _ in self._inflight.values()}
        for row_id, topic, payload in rows:
            self._highwater = max(self._highwater, row_id)
            if row_id in busy_rows:  # still awaiting its PUBACK from an earlier publish
                continue
            mid = self.link.publish_raw(topic, payload)
            if mid is None:  # paho refused it (disconnected meanwhile): start over on the next connection
                return False
            self._inflight[mid] = (row_id, time.monotonic())
            self.published += 1
        return len(rows) == min(self.batch, room) and len(rows) > 0

    def _settle_acks(self) -> None:
        done: list[int] = []
        while self._acked:
            entry = self._inflight.pop(self._acked.popleft(), None)
            if entry is not None:
                done.append(entry[0])
        if not done:
            return
        now = self.clock()
        with self.sessions() as s, s.begin():
            for i in range(0, len(done), 500):
                s.execute(update(OutboxMessage).where(OutboxMessage.id.in_(done[i:i + 500])).values(sent_at=now))
        self.acknowledged += len(done)

    def _expire_stale(self) -> None:
        limit = time.monotonic() - self.republish_after_s
        stale = [mid for mid, (_, at) in self._inflight.items() if at < limit]
        if stale:
            log.warning("outbox: %d commands unacknowledged after %.0f s; publishing them again", len(stale),
                        self.republish_after_s)
            first = min(self._inflight[mid][0] for mid in stale)
            for mid in stale:
                self._inflight.pop(mid, None)
            self._highwater = min(self._highwater, first - 1)
            self.republished += len(stale)


def keep_until(now: datetime, keep_sent_s: float) -> datetime:
    return now - timedelta(seconds=keep_sent_s)
