"""The telemetry read API: buckets computed by the database (real SQLite, and a real PostgreSQL where one can be
started), gauges averaged and counters maxed per bucket, group aggregates over per-device means, the window's
bounds, and one table row per refused query (typed error, nothing answered)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from fastapi.testclient import TestClient

from fleet import crud, telemetry
from fleet.db import Database, open_database
from fleet.errors import TelemetryQueryError
from fleet.models import TelemetrySample


T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)  # a bucket boundary for every step used here


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A fresh database: SQLite, and PostgreSQL where the tests have one (`db_url`)."""
    database = open_database(db_url)
    try:
        yield database
    finally:
        database.close()


def sample(db: Database, device: str, at: datetime, *, cpu: float = 0, rss: float = 0, mem: float = 0, tps: float = 0,
           requests: int = 0, tokens: int = 0) -> None:  # fmt: skip
    """A stored sample received at `at` (rows written directly: what is read back is the subject here)."""
    with db.sessions() as s, s.begin():
        crud.heard_from(s, device_id=device, now=at)
        s.add(TelemetrySample(device_id=device, message_id=uuid.uuid4().hex, seq=0, sent_at=at, received_at=at,
                              uptime_s=1, requests_total=requests, tokens_generated_total=tokens, tokens_per_s=tps,
                              cpu_percent=cpu, memory_rss_mb=rss, memory_percent=mem))  # fmt: skip


def register(db: Database, device: str, *groups: str) -> None:
    with db.sessions() as s, s.begin():
        crud.register_device(s, device_id=device, groups=list(groups), now=T0)


def test_device_series_buckets_average_gauges_and_max_counters(db: Database) -> None:
    register(db, "dev-1")
    sample(db, "dev-1", T0 + timedelta(seconds=5), cpu=10, rss=100, mem=1, tps=2, requests=3, tokens=30)
    sample(db, "dev-1", T0 + timedelta(seconds=59, microseconds=999_999), cpu=30, rss=300, mem=3, tps=4, requests=5, tokens=50)
    sample(db, "dev-1", T0 + timedelta(seconds=60), cpu=50, rss=500, mem=5, tps=6, requests=7, tokens=70)
    sample(db, "dev-1", T0 + timedelta(seconds=185), cpu=70, requests=9, tokens=90)
    sample(db, "dev-1", T0 - timedelta(seconds=1), cpu=99)  # before the window
    sample(db, "dev-1", T0 + timedelta(seconds=240), cpu=99)  # at `until`: outside (the window is half open)
    sample(db, "dev-2", T0 + timedelta(seconds=5), cpu=99)  # another device
    w = telemetry.Window(since=T0, until=T0 + timedelta(seconds=240), step_s=60)
    with db.sessions() as s:
        points = telemetry.device_series(s, device_id="dev-1", w=w)
    got = [(p.t, p.cpu_percent, p.memory_rss_mb, p.memory_percent, p.tokens_per_s, p.requests_total,
            p.tokens_generated_total) for p in points]  # fmt: skip
    assert got == [
        (T0, 20.0, 200.0, 2.0, 3.0, 5, 50),  # 00:00:59.999999 stays in the first minute
        (T0 + timedelta(seconds=60), 50.0, 500.0, 5.0, 6.0, 7, 70),
        (T0 + timedelta(seconds=180), 70.0, 0.0, 0.0, 0.0, 9, 90),  # minute 2 had nothing: no point
    ]


def test_buckets_follow_the_step(db: Database) -> None:
    register(db, "dev-1")
    for i in range(12):  # one sample every 10 s for two minutes
        sample(db, "dev-1", T0 + timedelta(seconds=10 * i), cpu=i)
    with db.sessions() as s:
        by_30 = telemetry.device_series(s, device_id="dev-1", w=telemetry.Window(T0, T0 + timedelta(minutes=2), 30))
        by_10 = telemetry.device_series(s, device_id="dev-1", w=telemetry.Window(T0, T0 + timedelta(minutes=2), 10))
    assert [(p.t - T0).seconds for p in by_30] == [0, 30, 60, 90]
    assert [p.cpu_percent for p in by_30] == [1.0, 4.0, 7.0, 10.0]
    assert [p.cpu_percent for p in by_10] == [float(i) for i in range(12)]


def test_group_series_averages_devices_not_samples(db: Database) -> None:
    register(db, "dev-a", "lab")
    register(db, "dev-b", "lab", "field")
    register(db, "dev-c", "field")
    at = T0 + timedelta(seconds=1)
    sample(db, "dev-a", at, cpu=10, rss=100, tps=10)
    sample(db, "dev-a", at + timedelta(seconds=1), cpu=30, rss=300, tps=20)  # dev-a reports twice
    sample(db, "dev-b", at, cpu=80, rss=400, tps=40)
    sample(db, "dev-c", at, cpu=99, rss=999, tps=999)  # not in lab
    sample(db, "dev-b", at + timedelta(seconds=60), cpu=5, rss=50, tps=1)
    w = telemetry.Window(since=T0, until=T0 + timedelta(minutes=5), step_s=60)
    with db.sessions() as s:
        points = telemetry.group_series(s, group="lab", w=w)
        members = telemetry.group_members(s, group="lab")
    assert members == 2
    first, second = points
    assert (first.t, first.devices) == (T0, 2)
    assert first.cpu_percent_mean == pytest.approx((20 + 80) / 2)  # dev-a's mean 20, dev-b's 80
    assert first.cpu_percent_max == 80
    assert first.memory_rss_mb_mean == pytest.approx((200 + 400) / 2)
    assert first.tokens_per_s_mean == pytest.approx((15 + 40) / 2)
    assert first.tokens_per_s_sum == pytest.approx(15 + 40)  # the group's throughput, not 10 + 20 + 40
    assert (second.t, second.devices, second.tokens_per_s_sum) == (T0 + timedelta(seconds=60), 1, 1.0)


NOW = datetime(2026, 3, 1, 12, 0, 30, tzinfo=timezone.utc)
REFUSED = [
    ("step below 10 s", {"step_s": 9}, "out of range"),
    ("step above a day", {"step_s": 86_401}, "out of range"),
    ("step a bool", {"step_s": True}, "out of range"),
    ("since not ISO", {"since": "yesterday"}, "not an ISO time"),
    ("since without timezone", {"since": "2026-03-01T11:00:00"}, "no timezone"),
    ("until with a newline", {"until": "2026-03-01T11:00:00Z\n"}, "not an ISO time"),
    ("since too long", {"since": "2026-03-01T11:00:00" + "0" * 40 + "Z"}, "over 40"),
    ("since in year 1 (east of UTC)", {"since": "0001-01-01T00:00:00+01:00"}, "is outside 1970-01-02 to 2200-01-01"),
    ("until in year 9999 (west of UTC)", {"until": "9999-12-31T23:59:59-01:00"}, "is outside"),
    ("before 1970", {"since": "1969-12-31T23:00:00Z", "until": "1970-01-01T00:10:00Z"}, "is outside"),
    ("until in year 1", {"until": "0001-01-01T01:00:00Z"}, "is outside"),
    ("since equals until", {"since": "2026-03-01T11:00:00Z", "until": "2026-03-01T11:00:00+00:00"}, "not before"),
    ("since after until", {"since": "2026-03-02T00:00:00Z", "until": "2026-03-01T00:00:00Z"}, "not before"),
    ("1,001 points", {"since": "2026-03-01T00:00:00Z", "until": "2026-03-01T02:46:40Z", "step_s": 10}, "use step_s >= 11"),
    ("a year by the minute", {"since": "2025-03-01T00:00:00Z", "step_s": 60}, "over 1000; use step_s >= "),
    ("four years even by the day", {"since": "2022-03-01T00:00:00Z", "step_s": 60}, "shorten the window to at most 999 days"),
]


@pytest.mark.parametrize("case, asked, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_windows_outside_the_bounds_are_refused(case: str, asked: dict, message: str) -> None:
    kwargs = {"since": None, "until": None, "step_s": 60} | asked
    with pytest.raises(TelemetryQueryError, match=message) as info:
        telemetry.window(**kwargs, now=NOW)
    if "use step_s >= " in str(info.value):  # the step it suggests is one the same window is served with
        suggested = int(str(info.value).split("use step_s >= ")[1].split()[0])
        assert telemetry.window(**(kwargs | {"step_s": suggested}), now=NOW).step_s == suggested


def test_window_defaults_and_largest_allowed() -> None:
    w = telemetry.window(since=None, until=None, step_s=60, now=NOW)
    assert (w.since, w.until, w.step_s) == (NOW - timedelta(hours=1), NOW, 60)
    edge = telemetry.window(since="2026-03-01T00:00:00Z", until="2026-03-01T02:46:30Z", step_s=10, now=NOW)
    assert (edge.until - edge.since) == timedelta(seconds=9990)  # 1,000 buckets exactly
    other_zone = telemetry.window(since="2026-03-01T13:00:00+02:00", until=None, step_s=10, now=NOW)
    assert other_zone.since == datetime(2026, 3, 1, 11, 0, tzinfo=timezone.utc)


# ---- over HTTP (real app, real SQLite, bearer tokens) -------------------------------------------------------------


def seed(client: TestClient) -> datetime:
    """dev-a (lab) with three samples over the last minutes; dev-b (lab) registered, silent."""
    for dev in ("dev-a", "dev-b"):
        assert client.post("/api/v1/devices", json={"id": dev, "groups": ["lab"]}).status_code == 201
    db: Database = client.app.state.fleet.db
    now = datetime.now(timezone.utc)
    for i, cpu in enumerate((10.0, 20.0, 30.0)):
        sample(db, "dev-a", now - timedelta(minutes=3 - i), cpu=cpu, tps=cpu / 10, requests=i)
    return now


def test_device_telemetry_over_http(client: TestClient) -> None:
    seed(client)
    r = client.get("/api/v1/devices/dev-a/telemetry", params={"step_s": 60})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["device_id"], body["step_s"]) == ("dev-a", 60)
    assert [p["cpu_percent"] for p in body["points"]] == [10.0, 20.0, 30.0]
    assert set(body["points"][0]) == {"t", "cpu_percent", "memory_rss_mb", "memory_percent", "tokens_per_s",
                                      "requests_total", "tokens_generated_total"}  # fmt: skip
    assert client.get("/api/v1/devices/dev-b/telemetry").json()["points"] == []


def test_group_telemetry_over_http(client: TestClient) -> None:
    seed(client)
    r = client.get("/api/v1/groups/lab/telemetry", params={"step_s": 3600})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["group"], body["devices"]) == ("lab", 2)
    assert sum(p["devices"] for p in body["points"]) >= 1
    assert body["points"][-1]["cpu_percent_max"] in (20.0, 30.0)  # the last hour bucket holds the newest sample


HTTP_REFUSED = [
    ("device id with a space", "/api/v1/devices/dev%20a/telemetry", {}, 422, "bad_topic"),
    ("device id with a newline", "/api/v1/devices/dev-a%0A/telemetry", {}, 422, "bad_topic"),
    ("device id dot-dot", "/api/v1/devices/..%2F/telemetry", {}, 404, None),
    ("unknown device", "/api/v1/devices/dev-zz/telemetry", {}, 404, "not_found"),
    ("group with a slash", "/api/v1/groups/l%2Fab/telemetry", {}, 404, None),
    ("group with a colon", "/api/v1/groups/lab:x/telemetry", {}, 422, "bad_telemetry_query"),
    ("empty group", "/api/v1/groups/nobody/telemetry", {}, 404, "not_found"),
    ("step too small", "/api/v1/devices/dev-a/telemetry", {"step_s": 1}, 422, "bad_telemetry_query"),
    ("step not a number", "/api/v1/devices/dev-a/telemetry", {"step_s": "1e9"}, 422, None),
    ("naive since", "/api/v1/groups/lab/telemetry", {"since": "2026-01-01T00:00:00"}, 422, "bad_telemetry_query"),
    ("since too long", "/api/v1/devices/dev-a/telemetry", {"since": "9" * 41}, 422, None),
    ("too many points", "/api/v1/devices/dev-a/telemetry", {"since": "2020-01-01T00:00:00Z", "step_s": 10}, 422,
     "bad_telemetry_query"),
]


@pytest.mark.parametrize("case, path, params, status, code", HTTP_REFUSED, ids=[r[0] for r in HTTP_REFUSED])
def test_refused_queries_over_http(client: TestClient, case, path, params, status, code) -> None:
    seed(client)
    before = client.get("/api/v1/devices").json()
    r = client.get(path, params=params)
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["code"] == code
    assert '"points"' not in r.text
    assert client.get("/api/v1/devices").json() == before  # a refused read registers nothing


ISO_ISH = st.one_of(st.none(), st.text(max_size=50), st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
                    st.datetimes().map(lambda d: d.isoformat()))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(since=ISO_ISH, until=ISO_ISH, step_s=st.one_of(st.integers(-10, 200_000), st.booleans()))
def test_any_query_is_a_bounded_window_or_a_typed_refusal(since, until, step_s) -> None:
    try:
        w = telemetry.window(since=since, until=until, step_s=step_s, now=NOW)
    except TelemetryQueryError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300
        return
    assert w.since.tzinfo is not None and w.until.tzinfo is not None and w.since < w.until
    assert telemetry.MIN_STEP_S <= w.step_s <= telemetry.MAX_STEP_S
    assert int(w.until.timestamp()) // w.step_s - int(w.since.timestamp()) // w.step_s + 1 <= telemetry.MAX_POINTS


def test_a_rollup_row_weighs_as_many_samples_as_it_stands_for(db: Database) -> None:
    """One raw sample at cpu 10 and one rollup of 3 samples at cpu 30 in the same bucket: the mean is 25, not 20."""
    register(db, "dev", "lab")
    sample(db, "dev", T0 + timedelta(seconds=5), cpu=10)
    with db.sessions() as s, s.begin():
        s.add(TelemetrySample(device_id="dev", message_id="rollup-x", seq=0, sent_at=T0, received_at=T0, uptime_s=1,
                              requests_total=0, tokens_generated_total=0, tokens_per_s=0, cpu_percent=30,
                              memory_rss_mb=0, memory_percent=0, samples=3, step_s=300))
    with db.sessions() as s:
        [point] = telemetry.device_series(s, device_id="dev", w=telemetry.Window(T0, T0 + timedelta(seconds=60), 60))
    assert point.cpu_percent == pytest.approx(25.0)
