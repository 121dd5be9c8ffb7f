"""The rollout engine on a real SQLite and a real PostgreSQL database, driven by the devices' own status reports and an injected clock:
canary and waves, thresholds, parallelism, timeouts, resends, the maintenance window, pause/resume/cancel, abort
(with rollback), both quality gates, supersession and devices that join late. Every command is read back from
the outbox, where the publisher would find it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from fleet import crud, rollout_counts, rollouts
from fleet.db import Database, open_database
from fleet.errors import GateError, NotFoundError, RolloutStateError
from fleet.models import DeploymentTarget, OutboxMessage, Rollout
from fleet.settings import Settings
from fleet.strategy import Gate, Step, Strategy, TargetQuery, Window
from protocol.manifest import EvalMetrics, FileEntry, Manifest
from protocol.messages import CancelCommand, DeployCommand, EvalScore, StatusReport, UpdateState, parse_message

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


class Fleet:
    """A database with devices and bundles, and the helpers a test needs to play the devices' side."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings, self.now, self._seq = db, settings, T0, 0

    def devices(self, n: int, group: str = "lab", *, active: tuple[str, int] | None = None) -> list[str]:
        ids = [f"dev-{i:03d}" for i in range(n)]
        with self.db.sessions() as s, s.begin():
            for d in ids:
                device, _ = crud.register_device(s, device_id=d, groups=[group], now=self.now)
                device.online = True
                if active:
                    device.active_name, device.active_version = active
        return ids

    def bundle(self, version: int, metrics: dict[str, float] | None = None, name: str = "tiny",
               eval_set_metric: str | None = None) -> None:
        manifest = Manifest(name=name, version=version, files=(FileEntry(path="m.onnx", size=1, sha256="a" * 64),),
                            created=T0, eval=EvalMetrics(dataset="held-out", metrics=metrics or {}))
        signed = manifest.to_signed()
        if eval_set_metric:  # what the manifest's eval.heldout says (the set itself is the device's business)
            signed["eval"] = dict(signed["eval"], heldout={"file": "eval/heldout.jsonl", "metric": eval_set_metric})
        with self.db.sessions() as s, s.begin():
            b = crud.add_bundle(s, manifest=manifest, sha256=f"{version:064x}", size=10, storage_path="x",
                                signer_keyids=[], now=T0)
            b.manifest = signed

    def start(self, version: int = 2, query: str = "group=lab", gate: Gate | None = None, **strategy: Any) -> str:
        spec = rollouts.RolloutSpec(bundle_name="tiny", bundle_version=version, query=TargetQuery.parse(query),
                                    strategy=Strategy(**strategy), gate=gate or Gate(no_regression=False))
        with self.db.sessions() as s, s.begin():
            return rollouts.create_rollout(s, spec, settings=self.settings, actor="op", now=self.now).id

    def report(self, rid: str, device: str, state: UpdateState, *, version: int = 2,
               score: float | None = None) -> None:
        self._seq += 1
        msg = StatusReport(message_id=uuid.uuid4().hex, seq=self._seq, sent_at=self.now, device_id=device,
                           deployment_id=rid, bundle_name="tiny", bundle_version=version, state=state,
                           active_version=version if state is UpdateState.ACTIVE else None,
                           eval=EvalScore(metric="accuracy", score=score, n=20) if score is not None else None)
        with self.db.sessions() as s, s.begin():
            crud.record_status(s, msg=msg, now=self.now)

    def tick(self, rid: str, advance_s: float = 0) -> Rollout:
        self.now += timedelta(seconds=advance_s)
        with self.db.sessions() as s, s.begin():
            rollouts.reconcile(s, rid, settings=self.settings, now=self.now)
        return self.show(rid)

    def counts(self, rid: str, wave: int | None = None) -> dict[str, int]:
        with self.db.sessions() as s:
            return rollouts.counts(s, rollouts.get_rollout(s, rid), wave)

    def score(self, rid: str, wave: int) -> dict | None:
        with self.db.sessions() as s:
            return rollout_counts.wave_scores(s, rollouts.get_rollout(s, rid)).get(wave)

    def show(self, rid: str) -> Rollout:
        with self.db.sessions() as s:
            r = rollouts.get_rollout(s, rid)
            r.deployment.targets, r.waves  # load while the session is open
            return r

    def commands(self, kind: type = DeployCommand) -> list[Any]:
        with self.db.sessions() as s:
            payloads = s.scalars(select(OutboxMessage.payload).order_by(OutboxMessage.id)).all()
        return [m for m in map(parse_message, payloads) if isinstance(m, kind)]

    def sent_to(self, rid: str) -> list[str]:
        return [c.device_id for c in self.commands() if c.deployment_id == rid]

    def outbox_rows(self) -> int:
        with self.db.sessions() as s:
            return s.scalar(select(func.count()).select_from(OutboxMessage)) or 0

    def finish(self, rid: str, devices: list[str], state: UpdateState = UpdateState.ACTIVE, **kw: Any) -> None:
        for d in devices:
            self.report(rid, d, state, **kw)


@pytest.fixture
def fleet(tmp_path: Path, db_url: str) -> Iterator[Fleet]:
    """A fresh database: SQLite, and PostgreSQL where the tests have one (`db_url`)."""
    db = open_database(db_url)
    try:
        f = Fleet(db, Settings(data_dir=tmp_path))
        f.bundle(1, {"accuracy": 0.80})
        f.bundle(2, {"accuracy": 0.85})
        yield f
    finally:
        db.close()


# ---- canary, waves, thresholds ------------------------------------------------------------------------------


def test_canary_then_waves_until_every_device_updated(fleet: Fleet) -> None:
    ids = fleet.devices(10)
    rid = fleet.start(canary=Step(count=1), waves=[Step(percent=50), Step(percent=100)])
    r = fleet.show(rid)
    assert [(w.name, w.size, w.state) for w in r.waves] == [("canary", 1, "running"), ("wave 1", 4, "waiting"),
                                                            ("wave 2", 5, "waiting")]
    canary = fleet.sent_to(rid)
    assert len(canary) == 1, "only the canary hears of the rollout first"
    fleet.finish(rid, canary)
    r = fleet.tick(rid)
    assert r.current_wave == 1 and r.waves[0].state == "succeeded" and len(fleet.sent_to(rid)) == 5
    fleet.finish(rid, fleet.sent_to(rid)[1:])
    r = fleet.tick(rid)
    assert r.current_wave == 2 and sorted(fleet.sent_to(rid)) == ids
    fleet.finish(rid, fleet.sent_to(rid)[5:])
    r = fleet.tick(rid)
    assert r.state == "succeeded" and fleet.counts(rid)["succeeded"] == 10
    assert sorted(fleet.sent_to(rid)) == ids, "each device got exactly one command"


def test_a_failed_canary_aborts_before_anyone_else_hears_of_it(fleet: Fleet) -> None:
    fleet.devices(20)
    rid = fleet.start(canary=Step(count=1), waves=[Step(percent=100)], error_threshold=0.0)
    [canary] = fleet.sent_to(rid)
    fleet.report(rid, canary, UpdateState.ROLLED_BACK)
    r = fleet.tick(rid)
    assert r.state == "aborted" and "canary: 1 of 1 devices failed" in r.reason
    assert fleet.sent_to(rid) == [canary], "no other device was sent the bundle"
    assert fleet.counts(rid)["cancelled"] == 19 and r.waves[0].state == "failed"
    fleet.tick(rid, 3600)
    assert fleet.sent_to(rid) == [canary], "an aborted rollout stays stopped"


@pytest.mark.parametrize(
    "ok, bad, expect",
    [
        (9, 0, "advance"),  # 90% updated meets 0.9
        (8, 0, "wait"),  # 80%: not yet, nobody failed
        (8, 2, "wait"),  # 20% failed: not above the 0.2 threshold
        (7, 3, "abort"),  # 30% failed
    ],
    ids=["meets-success", "below-success", "at-error-threshold", "above-error-threshold"],
)
def test_wave_thresholds(fleet: Fleet, ok: int, bad: int, expect: str) -> None:
    fleet.devices(10)
    rid = fleet.start(canary=None, waves=[Step(percent=100)], success_threshold=0.9, error_threshold=0.2)
    sent = fleet.sent_to(rid)
    fleet.finish(rid, sent[:ok])
    fleet.finish(rid, sent[ok:ok + bad], UpdateState.FAILED)
    r = fleet.tick(rid)
    assert r.state == {"advance": "succeeded", "wait": "running", "abort": "aborted"}[expect]


def test_max_parallel_keeps_that_many_updating(fleet: Fleet) -> None:
    fleet.devices(7)
    rid = fleet.start(canary=None, waves=[Step(percent=100)], max_parallel=3)
    first = fleet.sent_to(rid)
    assert len(first) == 3
    fleet.report(rid, first[0], UpdateState.DOWNLOADING)
    fleet.tick(rid)
    assert len(fleet.sent_to(rid)) == 3, "a device still downloading still counts as updating"
    fleet.finish(rid, first[:2])
    fleet.tick(rid)
    assert len(fleet.sent_to(rid)) == 5


def test_pause_between_waves_waits_for_an_operator(fleet: Fleet) -> None:
    fleet.devices(4)
    rid = fleet.start(canary=Step(count=1), waves=[Step(percent=100)], pause_between_waves=True)
    fleet.finish(rid, fleet.sent_to(rid))
    r = fleet.tick(rid)
    assert r.state == "paused" and "resume to start wave 1" in r.reason and len(fleet.sent_to(rid)) == 1
    with fleet.db.sessions() as s, s.begin():
        rollouts.resume(s, rid, settings=fleet.settings, now=fleet.now)
    assert len(fleet.sent_to(rid)) == 4


# ---- silence: timeouts and asking again ----------------------------------------------------------------------


@pytest.mark.parametrize("timeout_as, state, counted", [("failed", "aborted", "timed_out"),
                                                         ("pending", "running", "timed_out")])
def test_a_device_past_its_timeout(fleet: Fleet, timeout_as: str, state: str, counted: str) -> None:
    fleet.devices(2)
    rid = fleet.start(canary=None, waves=[Step(percent=100)], device_timeout_s=600, resend_after_s=7200,
                      timeout_as=timeout_as, error_threshold=0.2, success_threshold=1.0)
    a, b = fleet.sent_to(rid)
    fleet.report(rid, a, UpdateState.ACTIVE)
    r = fleet.tick(rid, 599)
    assert r.state == "running" and fleet.counts(rid)["sent"] == 1
    r = fleet.tick(rid, 2)
    assert r.state == state and fleet.counts(rid)[counted] == (1 if timeout_as == "pending" else 0) + (
        1 if timeout_as == "failed" else 0)


def test_a_silent_online_device_is_asked_again_with_a_new_seq(fleet: Fleet) -> None:
    [dev] = fleet.devices(1)
    rid = fleet.start(canary=None, waves=[Step(percent=100)], resend_after_s=60, device_timeout_s=3600)
    fleet.tick(rid, 59)
    assert len(fleet.sent_to(rid)) == 1
    fleet.tick(rid, 2)
    cmds = [c for c in fleet.commands() if c.deployment_id == rid]
    assert [c.device_id for c in cmds] == [dev, dev] and cmds[1].seq > cmds[0].seq
    fleet.report(rid, dev, UpdateState.DOWNLOADING)
    fleet.tick(rid, 59)
    assert len(fleet.sent_to(rid)) == 2, "a device that reported recently is not asked again"


def test_the_maintenance_window_holds_commands_until_it_opens(fleet: Fleet) -> None:
    fleet.devices(3)
    fleet.now = T0.replace(hour=22)
    rid = fleet.start(canary=None, waves=[Step(percent=100)], window=Window(start="01:00", end="05:00"))
    assert fleet.sent_to(rid) == []
    fleet.tick(rid, 2 * 3600)  # 00:00: still closed
    assert fleet.sent_to(rid) == []
    fleet.tick(rid, 3600 + 60)  # 01:01: open
    assert len(fleet.sent_to(rid)) == 3


# ---- operators ----------------------------------------------------------------------------------------------


def test_pause_stops_new_commands_and_resume_continues(fleet: Fleet) -> None:
    fleet.devices(6)
    rid = fleet.start(canary=None, waves=[Step(percent=100)], max_parallel=2)
    with fleet.db.sessions() as s, s.begin():
        rollouts.pause(s, rid, now=fleet.now)
    fleet.finish(rid, fleet.sent_to(rid))
    r = fleet.tick(rid)
    assert r.state == "paused" and len(fleet.sent_to(rid)) == 2
    with fleet.db.sessions() as s, s.begin():
        rollouts.resume(s, rid, settings=fleet.settings, now=fleet.now)
    assert len(fleet.sent_to(rid)) == 4


def test_cancel_drops_the_rest_and_cancels_devices_not_yet_done(fleet: Fleet) -> None:
    fleet.devices(5)
    rid = fleet.start(canary=None, waves=[Step(percent=100)], max_parallel=2)
    first = fleet.sent_to(rid)
    fleet.report(rid, first[0], UpdateState.ACTIVE)
    with fleet.db.sessions() as s, s.begin():
        rollouts.cancel(s, rid, settings=fleet.settings, now=fleet.now)
    r = fleet.tick(rid, 3600)
    assert r.state == "cancelled" and fleet.counts(rid)["cancelled"] == 3
    assert [c.device_id for c in fleet.commands(CancelCommand)] == [first[1]]
    assert fleet.sent_to(rid) == first


@pytest.mark.parametrize("action", ["pause", "resume", "cancel"])
def test_actions_a_finished_rollout_refuses(fleet: Fleet, action: str) -> None:
    fleet.devices(1)
    rid = fleet.start(canary=None, waves=[Step(percent=100)])
    fleet.finish(rid, fleet.sent_to(rid))
    assert fleet.tick(rid).state == "succeeded"
    rows = fleet.outbox_rows()
    with fleet.db.sessions() as s, s.begin(), pytest.raises(RolloutStateError, match="succeeded"):
        if action == "pause":
            rollouts.pause(s, rid, now=fleet.now)
        elif action == "resume":
            rollouts.resume(s, rid, settings=fleet.settings, now=fleet.now)
        else:
            rollouts.cancel(s, rid, settings=fleet.settings, now=fleet.now)
    assert fleet.show(rid).state == "succeeded" and fleet.outbox_rows() == rows


def test_abort_with_rollback_sends_updated_devices_their_previous_bundle(fleet: Fleet) -> None:
    fleet.devices(4, active=("tiny", 1))
    rid = fleet.start(canary=Step(count=2), waves=[Step(percent=100)], error_threshold=0.4, rollback_on_abort=True)
    a, b = fleet.sent_to(rid)
    fleet.report(rid, a, UpdateState.ACTIVE)
    fleet.report(rid, b, UpdateState.FAILED)
    r = fleet.tick(rid)
    assert r.state == "aborted"
    back = [c for c in fleet.commands() if c.deployment_id != rid]
    assert [(c.device_id, c.bundle.version) for c in back] == [(a, 1)], "only the device that updated goes back"


def test_a_download_only_rollout_asks_devices_to_fetch_without_installing(fleet: Fleet) -> None:
    ids = fleet.devices(3)
    rid = fleet.start(canary=None, waves=[Step(percent=100)], download_only=True, resend_after_s=60)
    cmds = [c for c in fleet.commands() if c.deployment_id == rid]
    assert sorted(c.device_id for c in cmds) == ids and all(c.download_only for c in cmds)
    fleet.finish(rid, ids[:2], UpdateState.DOWNLOADED)
    assert fleet.tick(rid, 61).state == "running"  # the silent third device is asked again, still download-only
    again = [c for c in fleet.commands() if c.deployment_id == rid][3:]
    assert [(c.device_id, c.download_only) for c in again] == [(ids[2], True)]
    assert fleet.counts(rid)["succeeded"] == 2
    fleet.report(rid, ids[2], UpdateState.DOWNLOADED)
    assert fleet.tick(rid).state == "succeeded"
    install = fleet.start(canary=None, waves=[Step(percent=100)])
    assert not any(c.download_only for c in fleet.commands() if c.deployment_id == install)


# ---- quality gates --------------------------------------------------------------------------------------------

GATE_REFUSALS = [
    ("metric-missing", {"accuracy": 0.99}, Gate(min={"f1": 0.9}), "carries no 'f1' metric"),
    ("below-minimum", None, Gate(min={"accuracy": 0.9}), "below the gate's minimum of 0.9"),
    ("regression", None, Gate(no_regression=True), "below the 0.95 of tiny v3"),
]


@pytest.mark.parametrize("case, metrics, gate, message", GATE_REFUSALS, ids=[c[0] for c in GATE_REFUSALS])
def test_the_bundle_gate_refuses_and_changes_nothing(fleet: Fleet, case: str, metrics: dict | None, gate: Gate,
                                                     message: str) -> None:
    fleet.bundle(3, {"accuracy": 0.95})
    fleet.devices(3, active=("tiny", 3))
    if metrics is not None:
        fleet.bundle(4, metrics)
    version = 4 if metrics is not None else 2
    with pytest.raises(GateError, match=message):
        fleet.start(version=version, gate=gate)
    with fleet.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Rollout)) == 0
        assert s.scalar(select(func.count()).select_from(DeploymentTarget)) == 0
    assert fleet.outbox_rows() == 0


def test_the_bundle_gate_passes_a_better_bundle(fleet: Fleet) -> None:
    fleet.bundle(3, {"accuracy": 0.80, "latency_ms_mean": 9.0, "tokens_per_s": 300.0})
    fleet.bundle(4, {"accuracy": 0.85, "latency_ms_mean": 4.0, "tokens_per_s": 200.0})
    fleet.devices(2, active=("tiny", 3))
    rid = fleet.start(version=4, gate=Gate(min={"accuracy": 0.8}, no_regression=True), canary=None)
    assert fleet.show(rid).state == "running", "lower latency and a lower speed figure are not a quality regression"


def test_a_wave_advances_only_on_scores_the_devices_measured(fleet: Fleet) -> None:
    fleet.bundle(5, {"accuracy": 0.9}, eval_set_metric="accuracy")
    fleet.devices(4)
    rid = fleet.start(version=5, gate=Gate(min={"accuracy": 0.8}), canary=None, waves=[Step(percent=100)],
                      success_threshold=1.0, error_threshold=0.3)
    sent = fleet.sent_to(rid)
    for d, score in zip(sent, (0.9, 0.85, 0.95)):
        fleet.report(rid, d, UpdateState.ACTIVE, version=5, score=score)
    fleet.report(rid, sent[3], UpdateState.ACTIVE, version=5)  # no score: not proven
    r = fleet.tick(rid)
    assert r.state == "running" and fleet.counts(rid)["succeeded"] == 3 and fleet.counts(rid)["failed"] == 1
    score = fleet.score(rid, 0)
    assert score is not None and score["n"] == 3 and score["min"] == 0.85
    fleet.report(rid, sent[3], UpdateState.ACTIVE, version=5, score=0.5)
    assert fleet.tick(rid).state == "running", "0.5 is below the gate: one failure of four stays under 30%"


# ---- who is targeted ------------------------------------------------------------------------------------------


def test_a_tag_query_selects_devices_and_revoked_devices_are_left_out(fleet: Fleet) -> None:
    ids = fleet.devices(4)
    with fleet.db.sessions() as s, s.begin():
        for d in ids[:3]:
            crud.set_tags(s, device_id=d, tags={"site": "berlin"})
        crud.set_tags(s, device_id=ids[0], tags={"tier": "a"})
        crud.get_device(s, device_id=ids[1]).revoked_at = T0  # type: ignore[union-attr]
    rid = fleet.start(query="site=berlin,group=lab", canary=None)
    assert sorted(fleet.sent_to(rid)) == [ids[0], ids[2]]
    with pytest.raises(NotFoundError, match="no device"):
        fleet.start(query="site=paris")


def test_a_newer_rollout_supersedes_the_older_one(fleet: Fleet) -> None:
    fleet.devices(4)
    fleet.bundle(3, {"accuracy": 0.9})
    old = fleet.start(canary=Step(count=1))
    new = fleet.start(version=3, canary=None)
    r = fleet.show(old)
    assert r.state == "superseded" and fleet.counts(old)["cancelled"] == 3
    fleet.tick(old, 3600)
    assert len(fleet.sent_to(old)) == 1 and len(fleet.sent_to(new)) == 4


def test_devices_that_join_later_get_the_groups_current_bundle(fleet: Fleet) -> None:
    fleet.devices(2)
    rid = fleet.start(canary=None)
    fleet.finish(rid, fleet.sent_to(rid))
    assert fleet.tick(rid).state == "succeeded"
    with fleet.db.sessions() as s, s.begin():
        crud.register_device(s, device_id="late", groups=["lab"], now=fleet.now)
        assert rollouts.adopt_device(s, device_id="late", settings=fleet.settings, now=fleet.now) == rid
        assert rollouts.adopt_device(s, device_id="late", settings=fleet.settings, now=fleet.now) is None
        crud.register_device(s, device_id="elsewhere", groups=["other"], now=fleet.now)
        assert rollouts.adopt_device(s, device_id="elsewhere", settings=fleet.settings, now=fleet.now) is None
    assert fleet.sent_to(rid).count("late") == 1 and "elsewhere" not in fleet.sent_to(rid)
    with fleet.db.sessions() as s:
        desired = crud.desired_target(s, device_id="late")
        assert desired is not None and desired.deployment_id == rid


def test_a_waiting_wave_is_not_the_desired_bundle_of_its_devices(fleet: Fleet) -> None:
    fleet.devices(3)
    rid = fleet.start(canary=Step(count=1))
    [canary] = fleet.sent_to(rid)
    with fleet.db.sessions() as s:
        others = [d for d in ("dev-000", "dev-001", "dev-002") if d != canary]
        assert all(crud.desired_target(s, device_id=d) is None for d in others)
        assert crud.desired_target(s, device_id=canary) is not None


def test_a_rollout_another_replica_holds_is_skipped_not_waited_for(tmp_path: Path, postgres: str) -> None:
    """On PostgreSQL the reconciler locks each rollout row with SKIP LOCKED: a second replica passes it by.
    (SQLite has no row locks: it serialises writers.)"""
    from tests.pg import fresh_database

    url, drop = fresh_database(postgres)
    db = open_database(url)
    try:
        fleet = Fleet(db, Settings(data_dir=tmp_path))
        fleet.bundle(2, {"accuracy": 0.85})
        fleet.devices(2)
        rid = fleet.start(canary=None)
        with fleet.db.sessions() as holder, holder.begin():
            rollouts.get_rollout(holder, rid, lock=True)  # replica A is reconciling it
            with fleet.db.sessions() as s, s.begin():
                s.execute(text("SET LOCAL lock_timeout = '2s'"))  # waiting for the lock would fail, not hang
                assert rollouts.reconcile(s, rid, settings=fleet.settings, now=fleet.now) is None
        with fleet.db.sessions() as s, s.begin():
            assert rollouts.reconcile(s, rid, settings=fleet.settings, now=fleet.now) is not None
    finally:
        db.close()
        drop()
