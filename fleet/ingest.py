"""Inbound device messages into the database: a bounded queue drained by one writer thread, in batches.

Workflow: `FleetMessaging` parses and checks each inbound MQTT message on paho's network thread and hands the typed
message to `IngestWriter.submit`, which stamps the time it arrived and puts it on a bounded queue
(`settings.ingest_queue_max` messages). `start()` runs one writer thread that takes the first waiting message, then
more until it has `ingest_batch_max` of them or `ingest_batch_wait_ms` have passed, whichever comes first, and writes
the whole batch in ONE transaction through `fleet.crud` (`store_message` per message, in arrival order):

- a status report or telemetry sample already stored (same message_id: a QoS 1 redelivery, an outbox re-send) is
  skipped, and so is a second copy inside the same batch; a status report older (by `seq`) than the one that set its
  target's state lands in the history but does not move the target (`crud.record_status`);
- a device first heard from is created by an upsert, so an API registration at the same moment does not fail;
- a presence "online" from a device whose newest deployment is unfinished yields its deploy command again
  (`fleet.deployments.commands_to_resend`); those commands are published by the writer thread through the
  `publish` callable only after the transaction that logged them committed, never from paho's thread.

If a batch's transaction fails, it is rolled back and its messages are written again one transaction each, so one bad
row never costs the others; a message that still fails is logged on one line (kind, message_id, device, error; never
the payload), counted in `dropped_failed` and dropped.

Backpressure: when the queue is full `submit` blocks paho's network thread. paho 2.2 (`Client._handle_publish`)
calls `on_message` first and sends a QoS 1 message's PUBACK only after it returns, so while the fleet waits the broker
still holds the message, and TCP flow control slows the broker down. The wait is bounded by `ingest_put_timeout_s`
(below 1.5 x the 30 s keepalive, past which the broker would cut the fleet off): after it the one message is logged,
counted in `dropped_full` and dropped (paho then acknowledges it). A PUBACK means "queued in this process", not
"committed": a fleet that crashes loses what was queued but not yet written (at most `ingest_queue_max` messages).

`stop()` waits up to `ingest_stop_timeout_s` for the writer to write everything queued before it, then returns; what
is still queued then is counted in `dropped_stop` and logged. `stats()` is a consistent snapshot of the counters
(`IngestStats`) for `/metrics`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from enum import Enum

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from protocol.errors import one_line
from protocol.messages import DeployCommand, Presence, StatusReport, Telemetry

from . import crud
from .deployments import commands_to_resend
from .models import StatusReportRow, TelemetrySample
from .settings import Settings

log = logging.getLogger(__name__)

Inbound = StatusReport | Telemetry | Presence
POLL_S = 0.1  # seconds the idle writer sleeps between looks at the stop flag


class Outcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Item:
    """One checked message and the time the fleet received it (the `received_at` it is stored with)."""

    msg: Inbound
    received_at: datetime


@dataclass(frozen=True)
class IngestStats:
    """Counters since start; `queued` is the queue depth now. Seconds are wall-clock (monotonic) durations."""

    queued: int = 0  # messages waiting for the writer now
    batches: int = 0  # transactions committed for whole batches
    fallbacks: int = 0  # batches whose transaction failed and were written one message at a time
    stored: int = 0  # messages written (status, telemetry, presence)
    duplicates: int = 0  # messages already stored (or twice in one batch): skipped
    dropped_full: int = 0  # messages dropped because the queue stayed full for ingest_put_timeout_s
    dropped_failed: int = 0  # messages whose own transaction failed too
    dropped_stop: int = 0  # messages still queued when stop() gave up waiting
    resent: int = 0  # deploy commands published again after a presence "online"
    last_batch_size: int = 0  # messages in the last batch written
    last_batch_seconds: float = 0.0  # how long writing the last batch took
    last_batch_lag_seconds: float = 0.0  # from receiving the last batch's oldest message to its commit

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_failed + self.dropped_stop


StoreFn = Callable[[Session, Item, Settings], tuple[Outcome, list[DeployCommand]]]


def store_message(s: Session, item: Item, settings: Settings) -> tuple[Outcome, list[DeployCommand]]:
    """Write one message inside the caller's transaction; returns its outcome and the deploy commands to publish
    once that transaction has committed."""
    msg, now = item.msg, item.received_at
    if isinstance(msg, StatusReport):
        return (Outcome.STORED if crud.record_status(s, msg=msg, now=now) else Outcome.DUPLICATE), []
    if isinstance(msg, Telemetry):
        return (Outcome.STORED if crud.record_telemetry(s, msg=msg, now=now) else Outcome.DUPLICATE), []
    crud.record_presence(s, msg=msg, now=now)
    if msg.online:
        return Outcome.STORED, commands_to_resend(s, settings=settings, device_id=msg.device_id, now=now)
    return Outcome.STORED, []


def why(exc: BaseException) -> str:
    """The database's own complaint on one short line, without the SQL parameters SQLAlchemy appends (they hold the
    message's fields)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return one_line(exc.orig, 160)
    if isinstance(exc, SQLAlchemyError):
        return type(exc).__name__
    return one_line(exc, 160)


class IngestWriter:
    """The bounded queue and its one writer thread (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        publish: Callable[[DeployCommand], None],
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        store: StoreFn = store_message,
    ) -> None:
        self.settings, self.sessions, self.publish, self.clock, self.store = settings, sessions, publish, clock, store
        self.queue: queue.Queue[tuple[Item, float]] = queue.Queue(maxsize=settings.ingest_queue_max)
        self._stats = IngestStats()
        self._lock = threading.Lock()  # guards _stats: the writer and paho's thread both count
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the ingest writer is already started; make a new IngestWriter to start again")
        self._thread = threading.Thread(target=self._run, name="fleet-ingest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Write what was queued before this call, waiting at most `timeout` seconds (default
        `ingest_stop_timeout_s`); True if the queue was drained."""
        self._stopping.set()
        if self._thread is None:
            return self.queue.empty()
        self._thread.join(self.settings.ingest_stop_timeout_s if timeout is None else timeout)
        left = self.queue.qsize()
        if self._thread.is_alive() or left:
            self._count(dropped_stop=left)
            log.error("ingest writer stopped with %d messages not written (raise ingest_stop_timeout_s)", left)
            return False
        return True

    @property
    def writer_thread(self) -> threading.Thread | None:
        return self._thread

    # ---- paho's thread ----------------------------------------------------------------------------------------

    def submit(self, msg: Inbound) -> bool:
        """Queue a checked message; blocks while the queue is full, at most `ingest_put_timeout_s`. False: the wait
        ran out and the message was dropped (logged, counted)."""
        item = Item(msg, self.clock())
        try:
            self.queue.put((item, time.monotonic()), timeout=self.settings.ingest_put_timeout_s)
        except queue.Full:
            self._count(dropped_full=1)
            log.error("dropped %s %s from %s: the ingest queue stayed full for %.0f s (the database is too slow)",
                      msg.kind, msg.message_id, msg.device_id, self.settings.ingest_put_timeout_s)
            return False
        return True

    # ---- the writer thread ------------------------------------------------------------------------------------

    def stats(self) -> IngestStats:
        with self._lock:
            return replace(self._stats, queued=self.queue.qsize())

    def _count(self, **add: int) -> None:
        with self._lock:
            self._stats = replace(self._stats, **{k: getattr(self._stats, k) + v for k, v in add.items()})

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch:
                try:
                    self._write(batch)
                except Exception as exc:  # the writer must outlive any batch; _write already catches the database's
                    self._count(dropped_failed=len(batch))
                    log.error("dropped a batch of %d messages after an unexpected error: %s", len(batch), one_line(exc))
                    log.debug("the error's traceback", exc_info=True)
            elif self._stopping.is_set():
                return

    def _take(self) -> list[tuple[Item, float]]:
        """The next batch: block for the first message (polling the stop flag), then gather until full or late."""
        try:
            first = self.queue.get(timeout=POLL_S)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.ingest_batch_wait_ms / 1000
        while len(batch) < self.settings.ingest_batch_max:
            wait = deadline - time.monotonic()
            try:
                batch.append(self.queue.get_nowait() if wait <= 0 else self.queue.get(timeout=wait))
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[tuple[Item, float]]) -> None:
        started = time.monotonic()
        items: list[Item] = []
        seen: set[str] = set()
        for item, _ in batch:  # a second copy inside one batch (a redelivery that came quickly) is a duplicate
            key = f"{item.msg.kind}:{item.msg.message_id}"
            if key not in seen:
                seen.add(key)
                items.append(item)
        duplicates, stored, resend = len(batch) - len(items), 0, []
        try:
            with self.sessions() as s, s.begin():
                for item in items:
                    outcome, commands = self.store(s, item, self.settings)
                    stored += outcome is Outcome.STORED
                    duplicates += outcome is Outcome.DUPLICATE
                    resend += commands
        except Exception as exc:  # the database, or a bug one message set off: the others must still be stored
            log.warning("a batch of %d messages failed (%s); writing them one at a time", len(items), why(exc))
            self._count(fallbacks=1, duplicates=len(batch) - len(items))
            for item in items:
                self._write_one(item)
        else:
            self._count(batches=1, stored=stored, duplicates=duplicates)
            self._publish(resend)
        done = time.monotonic()
        with self._lock:
            self._stats = replace(self._stats, last_batch_size=len(batch), last_batch_seconds=done - started,
                                  last_batch_lag_seconds=done - batch[0][1])

    def _write_one(self, item: Item) -> None:
        msg = item.msg
        try:
            with self.sessions() as s, s.begin():
                outcome, commands = self.store(s, item, self.settings)
        except IntegrityError as exc:
            if self._already_stored(msg):  # stored by someone else (another replica) since we looked
                self._count(duplicates=1)
                log.info("dropped duplicate %s %s from %s", msg.kind, msg.message_id, msg.device_id)
                return
            self._count(dropped_failed=1)
            log.error("could not store %s %s from %s: %s", msg.kind, msg.message_id, msg.device_id, why(exc))
            return
        except SQLAlchemyError as exc:
            self._count(dropped_failed=1)
            log.error("could not store %s %s from %s: %s", msg.kind, msg.message_id, msg.device_id, why(exc))
            return
        except Exception as exc:  # a bug: this message is lost, the writer goes on
            self._count(dropped_failed=1)
            log.error("dropped %s %s from %s after an unexpected error: %s", msg.kind, msg.message_id, msg.device_id,
                      one_line(exc))
            log.debug("the error's traceback", exc_info=True)
            return
        self._count(stored=outcome is Outcome.STORED, duplicates=outcome is Outcome.DUPLICATE)
        self._publish(commands)

    def _already_stored(self, msg: Inbound) -> bool:
        table = {StatusReport: StatusReportRow, Telemetry: TelemetrySample}.get(type(msg))
        if table is None:
            return False
        try:
            with self.sessions() as s:
                return s.scalar(select(table.id).where(table.message_id == msg.message_id)) is not None
        except SQLAlchemyError:
            return False

    def _publish(self, commands: list[DeployCommand]) -> None:
        for command in commands:
            log.info("device %s is back; sending deployment %s again", command.device_id, command.deployment_id)
            try:
                self.publish(command)
            except Exception as exc:  # a publish that fails is resent at the device's next presence anyway
                log.error("could not send deployment %s to %s again: %s", command.deployment_id, command.device_id,
                          one_line(exc))
                continue
            self._count(resent=1)
