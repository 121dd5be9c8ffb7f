"""Telemetry retention and downsampling: raw samples older than a day become one row per device per step; rollups
older than a month go.

Workflow: `RetentionJob(settings, sessions).start()` runs `run_retention` in a daemon thread every
`telemetry_retention_interval_s` seconds (first run one interval after start); `stop()` ends it between chunks.
`run_retention(sessions, settings, now=...)` (the clock is injected) does two passes, each in bounded chunks, one short
transaction per chunk, so it never holds the database's write lock for long and the ingest writer gets in between:

1. roll up: the cutoff is `now - telemetry_raw_retention_s`, rounded down to a multiple of
   `telemetry_rollup_step_s` (so only whole steps are rolled up). Each chunk takes the oldest raw rows (`step_s = 0`)
   received before the cutoff, at most `telemetry_retention_chunk` of them, groups them by device and step (by
   `received_at`, in UTC epoch seconds), and writes one rollup row per group: `received_at` = the step's start,
   `step_s` = the step, `samples` = how many raw samples it stands for; gauges (tokens_per_s, cpu_percent,
   memory_rss_mb, memory_percent) are averaged, weighted by samples; counters and the rest (uptime_s, requests_total,
   tokens_generated_total, seq, sent_at) are those of the sample with the highest `seq` (the device's newest). The raw
   rows are deleted in the same transaction. A rollup's message_id is derived from (step, step start, device), so a
   group split across two chunks (or two runs) merges into the one row, weighted by its samples: running twice, or
   being killed between chunks, changes nothing that was done and loses nothing that was not;
2. expire: rollup rows (`step_s > 0`) whose step began before `now - telemetry_rollup_retention_s` are deleted,
   at most `telemetry_retention_chunk` per transaction.

Returns a `RetentionReport` (counts). A run that fails (the database is busy past its timeout) is logged on one line
and the job tries again at its next interval; what committed before stays done.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from protocol.errors import one_line

from .models import TelemetrySample
from .settings import Settings
from .worker import Worker

log = logging.getLogger(__name__)

GAUGES = ("tokens_per_s", "cpu_percent", "memory_rss_mb", "memory_percent")  # averaged, weighted by samples
LAST = ("seq", "sent_at", "uptime_s", "requests_total", "tokens_generated_total")  # the newest sample's (by seq)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class RetentionReport:
    rolled_up: int = 0  # raw samples replaced by rollups
    rollups_written: int = 0  # rollup rows created or merged into
    expired: int = 0  # rollup rows deleted for age
    chunks: int = 0  # transactions committed


def step_start(t: datetime, step_s: int) -> datetime:
    """The start of the step `t` falls in (UTC, aligned to the epoch)."""
    seconds = int((t - EPOCH).total_seconds())
    return datetime.fromtimestamp(seconds - seconds % step_s, timezone.utc)


def rollup_id(device_id: str, start: datetime, step_s: int) -> str:
    """The message_id of a device's rollup for one step: the same for every chunk and run (device ids may be 128
    characters, so the device is named by a hash)."""
    return f"rollup-{step_s}-{int((start - EPOCH).total_seconds())}-{hashlib.sha256(device_id.encode()).hexdigest()[:32]}"


def run_retention(sessions: sessionmaker[Session], settings: Settings, *, now: datetime,
                  stopping: Callable[[], bool] = lambda: False) -> RetentionReport:
    """Both passes (see the module docstring); `stopping()` is asked before each chunk."""
    step, chunk = settings.telemetry_rollup_step_s, settings.telemetry_retention_chunk
    cutoff = step_start(now - timedelta(seconds=settings.telemetry_raw_retention_s), step)
    too_old = now - timedelta(seconds=settings.telemetry_rollup_retention_s)
    rolled = written = expired = chunks = 0
    while not stopping():
        with sessions() as s, s.begin():
            raw = list(s.scalars(
                select(TelemetrySample)
                .where(TelemetrySample.step_s == 0, TelemetrySample.received_at < cutoff)
                .order_by(TelemetrySample.received_at, TelemetrySample.id)
                .limit(chunk)
            ))
            if not raw:
                break
            written += _roll_up(s, raw, step)
            s.execute(delete(TelemetrySample).where(TelemetrySample.id.in_([r.id for r in raw])))
        rolled += len(raw)
        chunks += 1
    while not stopping():
        with sessions() as s, s.begin():
            ids = list(s.scalars(
                select(TelemetrySample.id)
                .where(TelemetrySample.step_s > 0, TelemetrySample.received_at < too_old)
                .order_by(TelemetrySample.received_at)
                .limit(chunk)
            ))
            if not ids:
                break
            s.execute(delete(TelemetrySample).where(TelemetrySample.id.in_(ids)))
        expired += len(ids)
        chunks += 1
    return RetentionReport(rolled_up=rolled, rollups_written=written, expired=expired, chunks=chunks)


def _roll_up(s: Session, raw: list[TelemetrySample], step: int) -> int:
    """Merge raw rows into their (device, step) rollups; how many rollup rows were written."""
    groups: dict[str, list[TelemetrySample]] = {}
    starts: dict[str, tuple[str, datetime]] = {}
    for r in raw:
        start = step_start(r.received_at, step)
        key = rollup_id(r.device_id, start, step)
        groups.setdefault(key, []).append(r)
        starts[key] = (r.device_id, start)
    existing = {row.message_id: row for row in s.scalars(
        select(TelemetrySample).where(TelemetrySample.message_id.in_(sorted(groups))))}
    for key, rows in groups.items():
        device_id, start = starts[key]
        row = existing.get(key)
        if row is None:
            row = TelemetrySample(device_id=device_id, message_id=key, received_at=start, step_s=step, samples=0,
                                  **{g: 0.0 for g in GAUGES}, **{f: getattr(rows[0], f) for f in LAST})
            s.add(row)
        n = sum(r.samples for r in rows)
        total = row.samples + n
        for g in GAUGES:
            setattr(row, g, (getattr(row, g) * row.samples + sum(getattr(r, g) * r.samples for r in rows)) / total)
        newest = max(rows, key=lambda r: (r.seq, r.id))
        if row.samples == 0 or newest.seq >= row.seq:
            for f in LAST:
                setattr(row, f, getattr(newest, f))
        row.samples = total
    s.flush()
    return len(groups)


class RetentionJob(Worker):
    """`run_retention` on a timer in one daemon thread (see the module docstring)."""

    name = "fleet-telemetry-retention"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        super().__init__(idle_s=settings.telemetry_retention_interval_s)
        self.settings, self.sessions, self.clock = settings, sessions, clock
        self.last: RetentionReport | None = None  # the last successful run's counts

    def step(self) -> bool:
        self.run_once()
        return False

    def run_once(self) -> RetentionReport | None:
        """One run now; None if it failed (logged)."""
        try:
            report = run_retention(self.sessions, self.settings, now=self.clock(), stopping=lambda: self.stopping)
        except SQLAlchemyError as exc:
            log.error("telemetry retention failed, trying again in %.0f s: %s",
                      self.settings.telemetry_retention_interval_s, one_line(getattr(exc, "orig", None) or exc, 200))
            return None
        if report.chunks:
            log.info("telemetry retention: %d raw samples rolled up into %d rows, %d old rollups deleted",
                     report.rolled_up, report.rollups_written, report.expired)
        self.last = report
        return report
