"""Inbound device messages into the database: a bounded queue drained by one writer thread, in batches, each message
acknowledged to the broker only once it is committed.

Workflow: `FleetMessaging` parses and checks each inbound MQTT message on paho's network thread and hands the typed
message, with a callable that acknowledges it, to `IngestWriter.submit`, which stamps the time it arrived and puts it
on a bounded queue (`settings.ingest_queue_max` messages). `start()` runs one writer thread that takes the first
waiting message, then more until it has `ingest_batch_max` of them or `ingest_batch_wait_ms` have passed, whichever
comes first, and writes the whole batch in ONE transaction with bulk statements (`fleet.inbound.store_batch`: the
rules for duplicates, old status reports, unknown devices and resends live there). After the commit it calls each
message's ack (paho sends the QoS 1 PUBACK: `Client.ack` only appends to paho's outgoing deque and wakes its loop, so
it is safe from this thread), then tells `after_batch` which kinds of message the batch held (the app pokes the
rollout reconciler and the outbox publisher, which sends any deploy command the batch queued again).
A second copy inside one batch is skipped as a duplicate and acknowledged with the batch.

Acknowledge after commit: the broker keeps every message the fleet has not acknowledged in the fleet's persistent
session and sends it again, flagged DUP, when the fleet reconnects. So a fleet that dies (killed, crashed, power cut)
with messages queued or in an uncommitted batch loses none of them: its successor (same client id) gets them again
and stores what is missing, skipping what was committed (message_id). The broker's in-flight window bounds how many
unacknowledged messages it sends: MQTT 5 `ingest_receive_maximum` (in CONNECT), mosquitto's
`max_inflight_messages` for MQTT 3.1.1; the embedded broker has no window (fleet/broker.py keeps each until its ack).

If a batch's transaction fails, it is rolled back and its messages are written again one transaction each, so one bad
row never costs the others; a message that still fails is logged on one line (kind, message_id, device, error; never
the payload), counted in `dropped_failed`, acknowledged (the broker would only send it again, and it would fail again)
and dropped.

Backpressure: with the receive maximum at most the queue size the queue cannot fill from the broker. When it does
(an MQTT 3.1.1 broker with a larger window, the embedded broker) `submit` blocks paho's network thread, at most
`ingest_put_timeout_s` (below 1.5 x the 30 s keepalive, past which the broker would cut the fleet off); the broker
then waits for TCP to drain. After the wait that one message is refused: counted in `dropped_full`, logged, NOT
acknowledged, so the broker still holds it and sends it again when the fleet next reconnects (not lost, but late).

`stop()` waits up to `ingest_stop_timeout_s` for the writer to write everything queued before it, then returns; what
is still queued then is counted in `dropped_stop`, logged and not acknowledged (the broker sends it again to the next
fleet). `stats()` is a consistent snapshot of the counters (`IngestStats`) for `/metrics`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from protocol.errors import one_line
from protocol.messages import DeployCommand, StatusReport, Telemetry

from .inbound import Inbound, Item, Outcome, Written, store_batch, store_message
from .models import StatusReportRow, TelemetrySample
from .settings import Settings

log = logging.getLogger(__name__)

__all__ = ["IngestStats", "IngestWriter", "Item", "Outcome", "store_batch", "store_message"]

POLL_S = 0.1  # seconds the idle writer sleeps between looks at the stop flag
Ack = Callable[[], None]  # tells the broker one message is safe (paho's Client.ack for its mid); a no-op for QoS 0


def no_ack() -> None:
    """The ack of a message nobody needs to acknowledge (QoS 0, or handed in without a broker)."""


@dataclass(frozen=True)
class Queued:
    item: Item
    at: float  # time.monotonic() when it was queued: the start of its ingest lag
    ack: Ack


@dataclass(frozen=True)
class IngestStats:
    """Counters since start; `queued` is the queue depth now. Seconds are wall-clock (monotonic) durations."""

    queued: int = 0  # messages waiting for the writer now
    batches: int = 0  # transactions committed for whole batches
    fallbacks: int = 0  # batches whose transaction failed and were written one message at a time
    stored: int = 0  # messages written (status, telemetry, presence)
    duplicates: int = 0  # messages already stored (or twice in one batch): skipped
    acked: int = 0  # messages acknowledged to the broker (after their commit, or refused by the database)
    dropped_full: int = 0  # messages refused unacknowledged: the queue stayed full for ingest_put_timeout_s
    dropped_failed: int = 0  # messages whose own transaction failed too (acknowledged: a resend would fail again)
    dropped_stop: int = 0  # messages still queued when stop() gave up waiting (unacknowledged)
    resent: int = 0  # deploy commands published again after a presence "online"
    last_batch_size: int = 0  # messages in the last batch written
    last_batch_seconds: float = 0.0  # how long writing the last batch took
    last_batch_lag_seconds: float = 0.0  # from receiving the last batch's oldest message to its commit

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_failed + self.dropped_stop


StoreFn = Callable[[Session, Sequence[Item], Settings], Written]  # fleet.inbound.store_batch, or a test's wrapper


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
        after_batch: Callable[[set[str]], None] = lambda kinds: None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        store: StoreFn = store_batch,
    ) -> None:
        self.settings, self.sessions, self.clock, self.store = settings, sessions, clock, store
        self.after_batch = after_batch  # told the kinds of message each committed batch held
        self.queue: queue.Queue[Queued] = queue.Queue(maxsize=settings.ingest_queue_max)
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
        if self._thread is not None:
            self._thread.join(self.settings.ingest_stop_timeout_s if timeout is None else timeout)
        left = self.queue.qsize()
        if (self._thread is not None and self._thread.is_alive()) or left:
            self._count(dropped_stop=left)
            log.error("ingest writer stopped with %d messages not written (raise ingest_stop_timeout_s)", left)
            return False
        return True

    @property
    def writer_thread(self) -> threading.Thread | None:
        return self._thread

    # ---- paho's thread ----------------------------------------------------------------------------------------

    def submit(self, msg: Inbound, ack: Ack = no_ack) -> bool:
        """Queue a checked message, to be acknowledged with `ack` once committed; blocks while the queue is full, at
        most `ingest_put_timeout_s`. False: the wait ran out and the message was refused, NOT acknowledged (logged,
        counted), so the broker sends it again when the fleet reconnects."""
        item = Item(msg, self.clock())
        try:
            self.queue.put(Queued(item, time.monotonic(), ack), timeout=self.settings.ingest_put_timeout_s)
        except queue.Full:
            self._count(dropped_full=1)
            log.error("refused %s %s from %s unacknowledged: the ingest queue stayed full for %.0f s (the database is "
                      "too slow); the broker sends it again at the next reconnect",
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

    def _take(self) -> list[Queued]:
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

    def _write(self, batch: list[Queued]) -> None:
        started = time.monotonic()
        items: list[Item] = []
        seen: set[str] = set()
        for q in batch:  # a second copy inside one batch (a redelivery that came quickly) is a duplicate
            key = f"{q.item.msg.kind}:{q.item.msg.message_id}"
            if key not in seen:
                seen.add(key)
                items.append(q.item)
        copies = len(batch) - len(items)
        try:
            with self.sessions() as s, s.begin():
                written = self.store(s, items, self.settings)
        except Exception as exc:  # the database, or a bug one message set off: the others must still be stored
            log.warning("a batch of %d messages failed (%s); writing them one at a time", len(items), why(exc))
            self._count(fallbacks=1, duplicates=copies)
            resend: list[DeployCommand] = []
            for item in items:
                resend += self._write_one(item)
        else:
            self._count(batches=1, stored=written.stored, duplicates=written.duplicates + copies)
            resend = written.commands
        self._ack(batch)  # every message now has its final outcome: committed, duplicate, or refused by the database
        self._resent(resend)
        try:
            self.after_batch({item.msg.kind for item in items} | ({"command"} if resend else set()))
        except Exception as exc:  # a hook's bug must not stop the writer
            log.error("after-batch hook failed: %s", one_line(exc))
        done = time.monotonic()
        with self._lock:
            self._stats = replace(self._stats, last_batch_size=len(batch), last_batch_seconds=done - started,
                                  last_batch_lag_seconds=done - batch[0].at)

    def _ack(self, batch: list[Queued]) -> None:
        for q in batch:
            try:
                q.ack()
            except Exception as exc:  # the broker will send it again; the copy is then skipped as a duplicate
                log.warning("could not acknowledge %s %s: %s", q.item.msg.kind, q.item.msg.message_id, one_line(exc))
        self._count(acked=len(batch))

    def _write_one(self, item: Item) -> list[DeployCommand]:
        """One message in its own transaction; the deploy commands to publish (none if it failed)."""
        msg = item.msg
        try:
            with self.sessions() as s, s.begin():
                written = self.store(s, [item], self.settings)
        except IntegrityError as exc:
            if self._already_stored(msg):  # stored by someone else (another replica) since we looked
                self._count(duplicates=1)
                log.info("dropped duplicate %s %s from %s", msg.kind, msg.message_id, msg.device_id)
                return []
            self._count(dropped_failed=1)
            log.error("could not store %s %s from %s: %s", msg.kind, msg.message_id, msg.device_id, why(exc))
            return []
        except SQLAlchemyError as exc:
            self._count(dropped_failed=1)
            log.error("could not store %s %s from %s: %s", msg.kind, msg.message_id, msg.device_id, why(exc))
            return []
        except Exception as exc:  # a bug: this message is lost, the writer goes on
            self._count(dropped_failed=1)
            log.error("dropped %s %s from %s after an unexpected error: %s", msg.kind, msg.message_id, msg.device_id,
                      one_line(exc))
            log.debug("the error's traceback", exc_info=True)
            return []
        self._count(stored=written.stored, duplicates=written.duplicates)
        return written.commands

    def _already_stored(self, msg: Inbound) -> bool:
        table = {StatusReport: StatusReportRow, Telemetry: TelemetrySample}.get(type(msg))
        if table is None:
            return False
        try:
            with self.sessions() as s:
                return s.scalar(select(table.id).where(table.message_id == msg.message_id)) is not None
        except SQLAlchemyError:
            return False

    def _resent(self, commands: list[DeployCommand]) -> None:
        """Count the commands the batch queued in the outbox again (the outbox publisher sends them)."""
        for command in commands:
            log.info("device %s is back; sending deployment %s again", command.device_id, command.deployment_id)
        self._count(resent=len(commands))
