"""Reading telemetry back: time series per device and aggregates per group, bucketed by the database.

Workflow: `window(since=, until=, step_s=, now=)` turns what a caller asked (ISO strings or nothing, a step in
seconds) into a checked `Window`, or raises `TelemetryQueryError` saying what to change; then `device_series` or
`group_series` runs ONE grouped SELECT over `telemetry_samples` and returns typed points, oldest first.

Buckets are computed in SQL as floor(epoch seconds / step_s), on SQLite and PostgreSQL alike (`epoch_seconds`
compiles per dialect), so a week of samples is never pulled into Python. Samples are placed by `received_at`: the
fleet's own clock, indexed with the device id (a device's clock may be wrong; a sample that waited in the device's
outbox shows when it arrived). Within a bucket gauges (cpu, memory, tokens/s) are averaged and counters
(requests_total, tokens_generated_total) take their maximum; both stay right whether a row is one sample or an
already downsampled one. A group point first averages each device over the bucket, then aggregates the devices,
so a device that reports twice as often does not weigh twice as much, and `tokens_per_s_sum` is the group's
throughput.

Bounds: step_s from MIN_STEP_S to MAX_STEP_S, at most MAX_POINTS buckets per answer, since/until default to the
last DEFAULT_WINDOW, timestamps need a timezone, at most MAX_TIME_CHARS characters and to lie between EARLIEST and
LATEST.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Integer, func, literal_column, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from protocol.errors import clip

from .errors import TelemetryQueryError
from .models import DeviceGroup, TelemetrySample

MIN_STEP_S = 10  # seconds: the finest bucket (devices sample every few seconds at most)
MAX_STEP_S = 86_400  # seconds: the coarsest bucket, one day
MAX_POINTS = 1_000  # buckets one answer may span; ask for a larger step for a longer window
DEFAULT_STEP_S = 60  # seconds
DEFAULT_WINDOW = timedelta(hours=1)  # since/until default to the last hour
MAX_TIME_CHARS = 40  # characters of an ISO timestamp in a query string
EARLIEST = datetime(1970, 1, 2, tzinfo=timezone.utc)  # times outside [EARLIEST, LATEST) are refused: epoch seconds
LATEST = datetime(2200, 1, 1, tzinfo=timezone.utc)  # stay positive (SQL division truncates) and dates never overflow


@dataclass(frozen=True)
class Window:
    """A checked query window: aware UTC times, since < until, step within bounds, at most MAX_POINTS buckets."""

    since: datetime
    until: datetime
    step_s: int


@dataclass(frozen=True)
class DevicePoint:
    t: datetime  # start of the bucket
    cpu_percent: float
    memory_rss_mb: float
    memory_percent: float
    tokens_per_s: float
    requests_total: int
    tokens_generated_total: int


@dataclass(frozen=True)
class GroupPoint:
    t: datetime  # start of the bucket
    devices: int  # devices with at least one sample in the bucket
    cpu_percent_mean: float
    cpu_percent_max: float
    memory_rss_mb_mean: float
    tokens_per_s_mean: float
    tokens_per_s_sum: float


def parse_time(value: str | None, what: str) -> datetime | None:
    """An ISO 8601 timestamp with a timezone -> aware UTC datetime; None stays None."""
    if value is None:
        return None
    if len(value) > MAX_TIME_CHARS:
        raise TelemetryQueryError(f"{what} is {len(value)} chars, over {MAX_TIME_CHARS}; send an ISO time like 2026-01-01T00:00:00Z")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise TelemetryQueryError(f"{what} {clip(value)} is not an ISO time; send one like 2026-01-01T00:00:00Z") from None
    if t.tzinfo is None:
        raise TelemetryQueryError(f"{what} {clip(value)} has no timezone; add Z or +00:00")
    try:
        t = t.astimezone(timezone.utc)
    except OverflowError:
        t = LATEST if t.year > 1970 else datetime.min.replace(tzinfo=timezone.utc)
    if not EARLIEST <= t < LATEST:
        raise TelemetryQueryError(f"{what} {clip(value)} is outside {EARLIEST:%Y-%m-%d} to {LATEST:%Y-%m-%d}; send a time in it")
    return t


def window(*, since: str | None, until: str | None, step_s: int, now: datetime) -> Window:
    """Check what the caller asked; defaults: until = now, since = until - DEFAULT_WINDOW."""
    if isinstance(step_s, bool) or not isinstance(step_s, int) or not MIN_STEP_S <= step_s <= MAX_STEP_S:
        raise TelemetryQueryError(f"step_s {clip(step_s)} is out of range; use {MIN_STEP_S} to {MAX_STEP_S} seconds")
    end = parse_time(until, "until") or now
    start = parse_time(since, "since") or max(EARLIEST, end - DEFAULT_WINDOW)
    if start >= end:
        raise TelemetryQueryError(f"since ({start.isoformat()}) is not before until ({end.isoformat()}); swap or widen them")
    buckets = _bucket(end, step_s) - _bucket(start, step_s) + 1
    if buckets > MAX_POINTS:
        # buckets <= floor(span / step) + 2 wherever the window starts, so this step always fits
        need = max(MIN_STEP_S, math.ceil((end - start).total_seconds()) // (MAX_POINTS - 1) + 1)
        fix = (f"use step_s >= {need} or a shorter window" if need <= MAX_STEP_S
               else f"shorten the window to at most {MAX_POINTS - 1} days")
        raise TelemetryQueryError(f"{buckets} points of {step_s} s asked, over {MAX_POINTS}; {fix}")
    return Window(since=start, until=end, step_s=step_s)


def _bucket(t: datetime, step_s: int) -> int:
    return int(t.timestamp()) // step_s


class epoch_seconds(FunctionElement[int]):
    """Whole seconds since 1970 of a stored (naive UTC) timestamp column, per dialect."""

    type = Integer()
    inherit_cache = True


@compiles(epoch_seconds)
def _epoch_default(element: epoch_seconds, compiler: Any, **kw: Any) -> str:  # PostgreSQL and the SQL standard
    return f"CAST(FLOOR(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)})) AS BIGINT)"


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    # SQLite keeps 'YYYY-MM-DD HH:MM:SS.ffffff'; strftime rounds a fraction up to the next second, so cut it first
    return f"CAST(strftime('%s', substr({compiler.process(element.clauses, **kw)}, 1, 19)) AS INTEGER)"


def wavg(column):  # type: ignore[no-untyped-def]
    """The mean of a gauge over raw samples and rollups alike: a rollup row (fleet/retention.py) stands for `samples`
    raw samples, so each row weighs as many."""
    return func.sum(column * TelemetrySample.samples) / func.sum(TelemetrySample.samples)


def bucket_of(column: Any, step_s: int) -> ColumnElement[int]:
    """floor(epoch seconds / step_s) in SQL (integer division: epoch seconds are never negative here). The step is
    written into the SQL as a literal (a checked int), so GROUP BY and SELECT are the same expression to PostgreSQL,
    which refuses two bind parameters it cannot tell are equal."""
    if isinstance(step_s, bool) or not isinstance(step_s, int) or not MIN_STEP_S <= step_s <= MAX_STEP_S:
        raise TelemetryQueryError(f"step_s {clip(step_s)} is out of range; use {MIN_STEP_S} to {MAX_STEP_S} seconds")
    return (epoch_seconds(column) // literal_column(str(step_s), Integer())).label("bucket")


def _start(bucket: int, step_s: int) -> datetime:
    return datetime.fromtimestamp(bucket * step_s, tz=timezone.utc)


def _in_window(w: Window) -> list[ColumnElement[bool]]:
    return [TelemetrySample.received_at >= w.since, TelemetrySample.received_at < w.until]


def device_series(s: Session, *, device_id: str, w: Window) -> list[DevicePoint]:
    """One point per bucket in which the device sent anything, oldest first."""
    T = TelemetrySample
    bucket = bucket_of(T.received_at, w.step_s)
    q = (
        select(bucket, wavg(T.cpu_percent), wavg(T.memory_rss_mb), wavg(T.memory_percent),
               wavg(T.tokens_per_s), func.max(T.requests_total), func.max(T.tokens_generated_total))
        .where(T.device_id == device_id, *_in_window(w))
        .group_by(bucket)
        .order_by(bucket)
        .limit(MAX_POINTS)
    )  # fmt: skip
    return [
        DevicePoint(t=_start(int(b), w.step_s), cpu_percent=float(cpu), memory_rss_mb=float(rss),
                    memory_percent=float(mem), tokens_per_s=float(tps), requests_total=int(req),
                    tokens_generated_total=int(gen))
        for b, cpu, rss, mem, tps, req, gen in s.execute(q).tuples()
    ]  # fmt: skip


def group_members(s: Session, *, group: str) -> int:
    return s.scalar(select(func.count()).select_from(DeviceGroup).where(DeviceGroup.group == group)) or 0


def group_series(s: Session, *, group: str, w: Window) -> list[GroupPoint]:
    """One point per bucket in which any member sent anything: per-device means first, then across devices."""
    T = TelemetrySample
    bucket = bucket_of(T.received_at, w.step_s)
    members = select(DeviceGroup.device_id).where(DeviceGroup.group == group)
    per_device = (
        select(bucket, T.device_id, wavg(T.cpu_percent).label("cpu"), func.max(T.cpu_percent).label("cpu_max"),
               wavg(T.memory_rss_mb).label("rss"), wavg(T.tokens_per_s).label("tps"))
        .where(T.device_id.in_(members), *_in_window(w))
        .group_by(bucket, T.device_id)
        .subquery()
    )  # fmt: skip
    d = per_device.c
    q = (
        select(d.bucket, func.count(), func.avg(d.cpu), func.max(d.cpu_max), func.avg(d.rss), func.avg(d.tps),
               func.sum(d.tps))
        .group_by(d.bucket)
        .order_by(d.bucket)
        .limit(MAX_POINTS)
    )  # fmt: skip
    return [
        GroupPoint(t=_start(int(b), w.step_s), devices=int(n), cpu_percent_mean=float(cpu), cpu_percent_max=float(cmax),
                   memory_rss_mb_mean=float(rss), tokens_per_s_mean=float(tps), tokens_per_s_sum=float(tsum))
        for b, n, cpu, cmax, rss, tps, tsum in s.execute(q).tuples()
    ]  # fmt: skip
