"""Telemetry retention (fleet/retention.py) on real SQLite with an injected clock: raw samples older than the raw
retention become one row per device per step (gauges averaged, counters the newest), rollups older than theirs go;
the same result however the work is cut into chunks, however often it runs, and after a stop between chunks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from fleet.db import Database, open_database
from fleet.inbound import Item, store_batch
from fleet.models import TelemetrySample
from fleet.retention import RetentionJob, rollup_id, run_retention
from fleet.settings import Settings
from protocol.messages import Telemetry

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)  # a step boundary for 300 s steps
STEP, RAW, ROLLUPS = 300, 3600, 86_400  # seconds: rollup step, raw retention, rollup retention


def settings_for(tmp_path: Path, **kw: object) -> Settings:
    base = dict(telemetry_rollup_step_s=STEP, telemetry_raw_retention_s=RAW, telemetry_rollup_retention_s=ROLLUPS,
                telemetry_retention_chunk=1000)
    return Settings(data_dir=tmp_path / "fleet", **(base | kw))  # type: ignore[arg-type]


def sample(device: str, seq: int, *, cpu: float, requests: int) -> Telemetry:
    return Telemetry(device_id=device, uptime_s=seq * 10, requests_total=requests, tokens_generated_total=requests * 7,
                     tokens_per_s=cpu / 10, cpu_percent=cpu, memory_rss_mb=100 + seq, memory_percent=5,
                     seq=seq, sent_at=T0)


def ingest(db: Database, rows: list[tuple[Telemetry, datetime]]) -> None:
    with db.sessions() as s, s.begin():
        store_batch(s, [Item(m, t) for m, t in rows], settings_for(Path("/nonexistent")))


def table(db: Database) -> list[tuple]:
    """Every telemetry row without its autoincrement id, sorted."""
    with db.sessions() as s:
        return sorted(
            (r.device_id, r.message_id, r.step_s, r.samples, r.received_at, r.seq, r.requests_total, r.uptime_s,
             round(r.cpu_percent, 6), round(r.tokens_per_s, 6), round(r.memory_rss_mb, 6))
            for r in s.scalars(select(TelemetrySample))
        )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """dev-a: 7 samples in the step at T0, 2 in the next, 1 recent; dev-b: 3 in the step at T0. Sent out of seq order
    inside the first step (the newest by seq is not the last received)."""
    database = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    rows = [(sample("dev-a", seq, cpu=cpu, requests=seq * 100), T0 + timedelta(seconds=at))
            for seq, cpu, at in [(1, 10, 0), (2, 20, 30), (3, 30, 60), (4, 40, 90), (5, 50, 120), (7, 70, 150),
                                 (6, 60, 299)]]
    rows += [(sample("dev-a", 8, cpu=80, requests=800), T0 + timedelta(seconds=300)),
             (sample("dev-a", 9, cpu=90, requests=900), T0 + timedelta(seconds=599))]
    rows += [(sample("dev-a", 10, cpu=5, requests=1000), T0 + timedelta(seconds=3000))]
    rows += [(sample("dev-b", seq, cpu=cpu, requests=seq), T0 + timedelta(seconds=at))
             for seq, cpu, at in [(1, 1, 10), (2, 2, 20), (3, 6, 30)]]
    ingest(database, rows)
    yield database
    database.close()


NOW = T0 + timedelta(seconds=RAW + 700)  # cutoff = T0 + 600: the first two steps are rolled up, the recent one is not


def expected_after_rollup() -> list[tuple]:
    a1, a2, b1 = (rollup_id("dev-a", T0, STEP), rollup_id("dev-a", T0 + timedelta(seconds=STEP), STEP),
                  rollup_id("dev-b", T0, STEP))
    return sorted([
        # device, message_id, step_s, samples, received_at (the step's start), seq, requests, uptime: the newest by seq
        ("dev-a", a1, STEP, 7, T0, 7, 700, 70.0, 40.0, 4.0, 104.0),  # mean cpu of 10..70 = 40, mean rss 101..107 = 104
        ("dev-a", a2, STEP, 2, T0 + timedelta(seconds=STEP), 9, 900, 90.0, 85.0, 8.5, 108.5),
        ("dev-b", b1, STEP, 3, T0, 3, 3, 30.0, 3.0, 0.3, 102.0),
        ("dev-a", None, 0, 1, T0 + timedelta(seconds=3000), 10, 1000, 100.0, 5.0, 0.5, 110.0),  # recent: kept raw
    ], key=lambda r: (r[0], r[1] or "", r[2], r[3], r[4]))


def normalise(rows: list[tuple]) -> list[tuple]:
    """Raw rows' message_ids are random: compare them as None."""
    out = [(r[0], r[1] if r[2] else None, *r[2:]) for r in rows]
    return sorted(out, key=lambda r: (r[0], r[1] or "", r[2], r[3], r[4]))


def test_old_raw_samples_become_one_row_per_device_per_step(tmp_path: Path, db: Database) -> None:
    report = run_retention(db.sessions, settings_for(tmp_path), now=NOW)
    assert normalise(table(db)) == expected_after_rollup()
    assert (report.rolled_up, report.rollups_written, report.expired) == (12, 3, 0)


@pytest.mark.parametrize("chunk", [1, 3, 5, 1000], ids=lambda c: f"chunk_{c}")
def test_the_result_does_not_depend_on_the_chunk_size(tmp_path: Path, db: Database, chunk: int) -> None:
    report = run_retention(db.sessions, settings_for(tmp_path, telemetry_retention_chunk=chunk), now=NOW)
    assert normalise(table(db)) == expected_after_rollup()
    assert report.chunks == -(-12 // chunk)  # every transaction held at most `chunk` raw rows


def test_running_again_changes_nothing(tmp_path: Path, db: Database) -> None:
    run_retention(db.sessions, settings_for(tmp_path), now=NOW)
    once = table(db)
    again = run_retention(db.sessions, settings_for(tmp_path), now=NOW + timedelta(seconds=1))
    assert table(db) == once
    assert (again.rolled_up, again.expired, again.chunks) == (0, 0, 0)


def test_stopped_between_chunks_then_run_again_gives_the_same_rows(tmp_path: Path, db: Database) -> None:
    calls = []

    def stop_after_two_chunks() -> bool:
        calls.append(1)
        return len(calls) > 2

    part = run_retention(db.sessions, settings_for(tmp_path, telemetry_retention_chunk=4), now=NOW,
                         stopping=stop_after_two_chunks)
    assert (part.rolled_up, part.chunks) == (8, 2)  # killed here: two chunks committed, the rest still raw
    rest = run_retention(db.sessions, settings_for(tmp_path, telemetry_retention_chunk=4), now=NOW)
    assert rest.rolled_up == 4
    assert normalise(table(db)) == expected_after_rollup()


def test_samples_arriving_in_a_step_already_rolled_up_merge_into_its_row(tmp_path: Path, db: Database) -> None:
    run_retention(db.sessions, settings_for(tmp_path), now=NOW)
    late = sample("dev-b", 4, cpu=13, requests=4)  # e.g. the fleet's clock was set back: lands in dev-b's first step
    ingest(db, [(late, T0 + timedelta(seconds=40))])
    run_retention(db.sessions, settings_for(tmp_path), now=NOW)
    [row] = [r for r in table(db) if r[0] == "dev-b"]
    assert row[3:8] == (4, T0, 4, 4, 40.0)  # 4 samples, counters from seq 4 (the newest)
    assert row[8] == pytest.approx((1 + 2 + 6 + 13) / 4)


def test_rollups_older_than_their_retention_are_deleted(tmp_path: Path, db: Database) -> None:
    run_retention(db.sessions, settings_for(tmp_path), now=NOW)
    later = T0 + timedelta(seconds=ROLLUPS + 1)  # the two rollups of the step at T0 are now too old; T0+300's is not
    report = run_retention(db.sessions, settings_for(tmp_path, telemetry_retention_chunk=1), now=later)
    kept = sorted((r[0], r[2], r[3], r[4]) for r in table(db))
    assert kept == [("dev-a", STEP, 1, T0 + timedelta(seconds=3000)),  # the recent sample, now rolled up in turn
                    ("dev-a", STEP, 2, T0 + timedelta(seconds=STEP))]
    assert (report.rolled_up, report.expired, report.chunks) == (1, 2, 3)  # one row per transaction


REFUSED = [
    ("rollups_kept_shorter_than_raw", {"telemetry_raw_retention_s": 7200, "telemetry_rollup_retention_s": 3600},
     "telemetry_rollup_retention_s must be at least"),
    ("zero_step", {"telemetry_rollup_step_s": 0}, "greater than or equal to 1"),
    ("zero_chunk", {"telemetry_retention_chunk": 0}, "greater than or equal to 1"),
    ("zero_interval", {"telemetry_retention_interval_s": 0}, "greater than 0"),
]


@pytest.mark.parametrize("kw,match", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_bad_retention_settings_are_refused(tmp_path: Path, db: Database, kw: dict, match: str) -> None:
    before = table(db)
    with pytest.raises(ValidationError, match=match):
        settings_for(tmp_path, **kw)
    assert table(db) == before  # nothing ran


def test_the_job_runs_on_its_timer_until_stopped(tmp_path: Path, db: Database) -> None:
    job = RetentionJob(settings_for(tmp_path, telemetry_retention_interval_s=0.05), db.sessions, clock=lambda: NOW)
    job.start()
    try:
        deadline = time.monotonic() + 5
        while job.last is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        job.stop(5)
    assert job.last is not None and not job._thread.is_alive()  # type: ignore[union-attr]
    assert normalise(table(db)) == expected_after_rollup()
