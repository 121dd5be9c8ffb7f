"""The rollout engine: one persisted state machine per rollout, advanced by a reconciler that reads the database.

    running ──pause──▶ paused ──resume──▶ running
    running ──last wave reaches its success threshold──▶ succeeded
    running ──a wave reaches its success threshold, with pause_between_waves──▶ paused (resume starts the next)
    running/paused ──a wave's failures pass the error threshold──▶ aborted   (optionally sending devices back)
    running/paused ──cancel──▶ cancelled          running/paused ──a newer rollout to its devices──▶ superseded

Workflow: `create_rollout` resolves the target query to devices (never revoked ones), checks the bundle against the
quality gate (its manifest metrics: minimums and no regression against the bundles it replaces), records a
deployment with one target row per device, each assigned to a wave in a stable shuffled order (`fleet.strategy
.plan_waves`), starts the first wave and queues its commands in the outbox (`fleet.outbox`), all in the caller's
transaction. From then on `reconcile(s, rollout_id, ...)` is the only thing that moves it: it marks devices past
their timeout, asks silent devices again, judges the current wave (`fleet.strategy.judge_wave`) and starts the
next one, aborts, or finishes, then releases commands for the started waves up to `max_parallel` devices updating
at once and only inside the maintenance window. Because every decision is a row written in one transaction with
the commands it causes, a fleet killed at any point continues where it stopped: a device's target is released
once (`released_at`), so no device is skipped or updated twice.

A device counts as updated when it reported `active` (or `downloaded`, for a download-only rollout, whose commands
ask devices to fetch and verify the bundle without installing it; a later rollout of that bundle installs it
without fetching it again) and, where the bundle carries its own held-out evaluation set,
the score it measured there meets the gate; as failed when it reported `rejected`, `failed` or `rolled_back`,
scored below the gate, or (with `timeout_as="failed"`) passed its timeout.

`Reconciler` runs `reconcile` for every live rollout on a tick and whenever `poke()` says reports arrived; on
PostgreSQL each rollout row is locked while one replica reconciles it (SELECT ... FOR UPDATE SKIP LOCKED).
`adopt_device` gives a device that joined a rollout's target later (new, re-tagged, or back online) the newest
matching rollout's bundle.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from protocol.errors import one_line
from protocol.messages import CancelCommand

from . import crud, outbox, rollout_counts
from .deployments import deploy_commands, plan_deployment, sign
from .errors import NotFoundError, RolloutStateError
from .models import PENDING, Bundle, DeploymentTarget, Device, Rollout, RolloutWave
from .rollout_counts import DROPPED, OK_STATES, TERMINAL
from .settings import Settings
from .worker import Worker
from .strategy import Gate, Strategy, TargetQuery, Verdict, WaveTally, check_bundle_gate, in_window, judge_wave, plan_waves

log = logging.getLogger(__name__)

RUNNING, PAUSED, SUCCEEDED = "running", "paused", "succeeded"
ABORTED, CANCELLED, SUPERSEDED = "aborted", "cancelled", "superseded"
LIVE = (RUNNING, PAUSED)
WAITING, WAVE_RUNNING, WAVE_SUCCEEDED, WAVE_FAILED = "waiting", "running", "succeeded", "failed"
IN_CHUNK = 500  # ids per IN (...) list
KEEP_SENT = timedelta(days=1)  # acknowledged outbox rows are kept this long (to look into), then pruned
PRUNE_EVERY_RUNS = 100  # reconciler runs between two prunes


@dataclass(frozen=True)
class RolloutSpec:
    bundle_name: str
    bundle_version: int
    query: TargetQuery
    strategy: Strategy
    gate: Gate


# ---- creating -----------------------------------------------------------------------------------------------


def create_rollout(s: Session, spec: RolloutSpec, *, settings: Settings, actor: str, now: datetime,
                   rollout_id: str | None = None) -> Rollout:
    bundle = crud.get_bundle(s, name=spec.bundle_name, version=spec.bundle_version)
    if bundle is None:
        raise NotFoundError(f"bundle {spec.bundle_name} v{spec.bundle_version} is not stored; upload it first "
                            "(POST /api/v1/bundles)")
    devices = [d for d in matching_devices(s, spec.query) if d.revoked_at is None]
    if not devices:
        raise NotFoundError(f"no device that is not revoked matches {spec.query}; register devices with their groups "
                            "(POST /api/v1/devices), tag them (slmops fleet tag DEVICE key=value) or reinstate them")
    check_bundle_gate(spec.gate, bundle=f"{bundle.name} v{bundle.version}", metrics=_metrics(bundle),
                      replaced=_replaced_metrics(s, bundle, devices))
    rid = rollout_id or uuid.uuid4().hex
    ids = [d.id for d in devices]
    _supersede(s, set(ids), by=rid, now=now)
    deployment = crud.create_deployment(s, deployment_id=rid, bundle=bundle, target_kind="query",
                                        target_value=str(spec.query), device_ids=ids, now=now)
    gate = spec.gate.model_dump(mode="json")
    gate["device_metric"] = _device_metric(bundle, spec.gate)
    rollout = Rollout(id=rid, state=RUNNING, reason="started", query=str(spec.query),
                      strategy=spec.strategy.model_dump(mode="json"), gate=gate, current_wave=0, created_by=actor,
                      created_at=now, updated_at=now)
    plan = plan_waves(len(ids), spec.strategy)
    rollout.waves = [RolloutWave(index=i, name=name, size=size, state=WAITING) for i, (name, size) in enumerate(plan)]
    order = sorted(deployment.targets, key=lambda t: hashlib.sha256(f"{rid}/{t.device_id}".encode()).digest())
    start = 0
    for i, (_, size) in enumerate(plan):
        for t in order[start:start + size]:
            t.wave = i
        start += size
    s.add(rollout)
    s.flush()
    _start_wave(rollout, 0, now)
    release(s, rollout, settings=settings, now=now)
    return rollout


def matching_devices(s: Session, query: TargetQuery) -> list[Device]:
    groups = [v for k, v in query.terms if k == "group"]
    q = select(Device).options(selectinload(Device.groups), selectinload(Device.tags)).order_by(Device.id)
    if groups:  # narrow in SQL by the first group; the rest is checked below
        q = q.where(Device.id.in_(crud.group_member_ids(groups[0])))
    return [d for d in s.scalars(q) if query.matches(d.group_names, d.tag_map)]


def _metrics(bundle: Bundle) -> dict[str, float]:
    metrics = (bundle.manifest.get("eval") or {}).get("metrics") or {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _device_metric(bundle: Bundle, gate: Gate) -> str | None:
    """The metric devices measure on the bundle's own held-out set, when the bundle carries one."""
    ev = (bundle.manifest.get("eval") or {}).get("heldout")
    metric = ev.get("metric") if isinstance(ev, dict) else None
    return metric if isinstance(metric, str) and metric in gate.min else None


def _replaced_metrics(s: Session, bundle: Bundle, devices: Iterable[Device]) -> dict[str, dict[str, float]]:
    active = {(d.active_name, d.active_version) for d in devices if d.active_name == bundle.name
              and d.active_version is not None and d.active_version != bundle.version}
    out: dict[str, dict[str, float]] = {}
    for name, version in sorted(active, key=lambda nv: (nv[0] or "", nv[1] or 0)):
        old = crud.get_bundle(s, name=name or "", version=version or 0)
        if old is not None:
            out[f"{name} v{version}"] = _metrics(old)
    return out


def _supersede(s: Session, device_ids: set[str], *, by: str, now: datetime) -> None:
    for old in s.scalars(select(Rollout).where(Rollout.state.in_(LIVE))).all():
        if device_ids & set(s.scalars(select(DeploymentTarget.device_id).where(DeploymentTarget.deployment_id == old.id))):
            _finish(old, SUPERSEDED, f"superseded by rollout {by}", now)
            _drop_unreleased(s, old, now)


# ---- operator actions ---------------------------------------------------------------------------------------


def get_rollout(s: Session, rollout_id: str, *, lock: bool = False) -> Rollout:
    q = select(Rollout).where(Rollout.id == rollout_id)
    if lock and s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update()
    rollout = s.scalar(q)
    if rollout is None:
        raise NotFoundError(f"rollout {rollout_id!r} does not exist; see GET /api/v1/rollouts")
    return rollout


def pause(s: Session, rollout_id: str, *, now: datetime) -> Rollout:
    rollout = get_rollout(s, rollout_id, lock=True)
    if rollout.state != RUNNING:
        raise RolloutStateError(f"rollout {rollout_id} is {rollout.state}; only a running rollout can be paused")
    rollout.state, rollout.reason, rollout.updated_at = PAUSED, "paused by an operator", now
    return rollout


def resume(s: Session, rollout_id: str, *, settings: Settings, now: datetime) -> Rollout:
    rollout = get_rollout(s, rollout_id, lock=True)
    if rollout.state != PAUSED:
        raise RolloutStateError(f"rollout {rollout_id} is {rollout.state}; only a paused rollout can be resumed")
    rollout.state, rollout.reason, rollout.updated_at = RUNNING, "resumed by an operator", now
    wave = rollout.waves[rollout.current_wave]
    if wave.state == WAITING:  # paused between waves: resuming starts the next one
        _start_wave(rollout, wave.index, now)
    reconcile_rollout(s, rollout, settings=settings, now=now)
    return rollout


def cancel(s: Session, rollout_id: str, *, settings: Settings, now: datetime, rollback: bool = False) -> Rollout:
    rollout = get_rollout(s, rollout_id, lock=True)
    if rollout.state not in LIVE:
        raise RolloutStateError(f"rollout {rollout_id} is {rollout.state}; only a running or paused rollout can be "
                                "cancelled")
    _stop(s, rollout, CANCELLED, "cancelled by an operator", settings=settings, now=now, rollback=rollback)
    return rollout


# ---- the reconciler's step ----------------------------------------------------------------------------------


def reconcile(s: Session, rollout_id: str, *, settings: Settings, now: datetime) -> Rollout | None:
    """One reconciler step of one rollout; None if it is gone or (PostgreSQL) another replica holds it right now."""
    q = select(Rollout).where(Rollout.id == rollout_id)
    if s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)  # one replica at a time; the others go on to the next rollout
    rollout = s.scalar(q)
    if rollout is not None:
        reconcile_rollout(s, rollout, settings=settings, now=now)
    return rollout


def reconcile_rollout(s: Session, rollout: Rollout, *, settings: Settings, now: datetime) -> None:
    strategy = Strategy.model_validate(rollout.strategy)
    _timeouts_and_resends(s, rollout, strategy, settings=settings, now=now)
    if rollout.state == RUNNING:
        s.flush()
        waves = rollout_counts.by_wave(s, rollout)
        while True:  # a wave may be judged done at once (empty, or already updated devices)
            wave = rollout.waves[rollout.current_wave]
            verdict, why = judge_wave(wave.name, tally(waves.get(wave.index, {}), strategy), strategy)
            if verdict is Verdict.ABORT:
                wave.state, wave.finished_at = WAVE_FAILED, now
                _stop(s, rollout, ABORTED, why, settings=settings, now=now, rollback=strategy.rollback_on_abort)
                return
            if verdict is Verdict.WAIT:
                break
            wave.state, wave.finished_at = WAVE_SUCCEEDED, now
            if rollout.current_wave + 1 >= len(rollout.waves):
                _finish(rollout, SUCCEEDED, why, now)
                break
            rollout.current_wave += 1
            nxt = rollout.waves[rollout.current_wave].name
            if strategy.pause_between_waves:  # an operator looks at the figures, then resumes into the next wave
                rollout.state, rollout.reason, rollout.updated_at = PAUSED, f"{why}; resume to start {nxt}", now
                break
            rollout.reason, rollout.updated_at = f"{why}; starting {nxt}", now
            _start_wave(rollout, rollout.current_wave, now)
    if rollout.state in (RUNNING, SUCCEEDED):
        release(s, rollout, settings=settings, now=now)


def _targets(s: Session, rollout: Rollout, *conditions: Any) -> Select[tuple[DeploymentTarget]]:
    return select(DeploymentTarget).where(DeploymentTarget.deployment_id == rollout.id, *conditions)


IN_FLIGHT = (DeploymentTarget.released_at.is_not(None), DeploymentTarget.state.not_in(TERMINAL))


def release(s: Session, rollout: Rollout, *, settings: Settings, now: datetime) -> int:
    """Queue first commands for started waves' devices, keeping at most `max_parallel` updating; returns how many."""
    strategy = Strategy.model_validate(rollout.strategy)
    if not in_window(strategy.window, now.time()):
        return 0
    s.flush()
    busy = s.scalar(select(func.count()).select_from(_targets(s, rollout, *IN_FLIGHT,
                                                              DeploymentTarget.timed_out_at.is_(None)).subquery())) or 0
    room = strategy.max_parallel - busy
    if room <= 0:
        return 0
    started = rollout.current_wave if rollout.state == RUNNING else len(rollout.waves) - 1
    waiting = s.scalars(_targets(s, rollout, DeploymentTarget.released_at.is_(None), DeploymentTarget.state == PENDING,
                                 DeploymentTarget.wave <= started)
                        .order_by(DeploymentTarget.wave, DeploymentTarget.id).limit(room)).all()
    if not waiting:
        return 0
    bundle = crud.get_bundle(s, name=rollout.deployment.bundle_name, version=rollout.deployment.bundle_version)
    if bundle is None:
        return 0
    devices = {d.id: d for d in _chunked(s, select(Device), Device.id, [t.device_id for t in waiting])}
    go = []
    for t in waiting:
        device = devices.get(t.device_id)
        if device is None or device.revoked_at is not None:
            t.state, t.detail, t.updated_at = DROPPED, "revoked before its wave", now
            continue
        t.prev_name, t.prev_version = device.active_name, device.active_version
        t.released_at = now
        go.append(t)
    _ask(s, go, bundle, settings=settings, now=now, download_only=strategy.download_only)
    return len(go)


def _ask(s: Session, targets: list[DeploymentTarget], bundle: Bundle, *, settings: Settings, now: datetime,
         download_only: bool) -> None:
    """Queue a signed deploy command for each target in the outbox (one INSERT for the commands' seqs)."""
    if not targets:
        return
    commands = deploy_commands(s, settings=settings, deployment_id=targets[0].deployment_id, bundle=bundle,
                               device_ids=[t.device_id for t in targets], now=now, download_only=download_only)
    outbox.enqueue_many(s, commands, now=now)
    for t in targets:
        t.asked_at, t.attempts = now, t.attempts + 1


def _timeouts_and_resends(s: Session, rollout: Rollout, strategy: Strategy, *, settings: Settings,
                          now: datetime) -> None:
    """Mark devices past their timeout; ask online devices silent for `resend_after_s` again. Only the targets in
    flight are read, and only those with something due."""
    if rollout.state not in (RUNNING, PAUSED, SUCCEEDED):
        return
    timeout = timedelta(seconds=strategy.device_timeout_s)
    resend = timedelta(seconds=strategy.resend_after_s)
    T = DeploymentTarget
    for t in s.scalars(_targets(s, rollout, *IN_FLIGHT, T.timed_out_at.is_(None), T.released_at <= now - timeout)):
        t.timed_out_at = now
        log.info("rollout %s: device %s passed its %d s timeout (%s)", rollout.id, t.device_id,
                 strategy.device_timeout_s, strategy.timeout_as)
    quiet = now - resend
    due = _targets(s, rollout, *IN_FLIGHT, T.released_at <= quiet, T.updated_at <= quiet,
                   or_(T.asked_at.is_(None), T.asked_at <= quiet))
    if strategy.timeout_as == "failed":
        due = due.where(T.timed_out_at.is_(None))
    due = due.where(T.device_id.in_(select(Device.id).where(Device.online.is_(True))))
    silent = s.scalars(due.order_by(T.id).limit(strategy.max_parallel)).all()
    if not silent:
        return
    bundle = crud.get_bundle(s, name=rollout.deployment.bundle_name, version=rollout.deployment.bundle_version)
    if bundle is None:
        return
    for t in silent:
        last = max(x for x in (t.asked_at, t.updated_at, t.released_at) if x is not None)
        log.info("rollout %s: device %s silent for %d s; asking again", rollout.id, t.device_id,
                 (now - last).total_seconds())
    _ask(s, list(silent), bundle, settings=settings, now=now, download_only=strategy.download_only)


def _chunked(s: Session, q, column, ids: list[str]) -> list:  # type: ignore[no-untyped-def]
    """Rows of `q` whose `column` is in `ids`, asked IN_CHUNK ids at a time (databases bound how many parameters
    one statement may carry)."""
    out: list = []
    for i in range(0, len(ids), IN_CHUNK):
        out += s.scalars(q.where(column.in_(ids[i:i + IN_CHUNK]))).all()
    return out


def tally(c: dict[str, int], strategy: Strategy) -> WaveTally:
    """A wave's counts (fleet.rollout_counts) as the thresholds see them."""
    bad = c.get("failed", 0) + c.get("rolled_back", 0) + (c.get("timed_out", 0) if strategy.timeout_as == "failed" else 0)
    return WaveTally(size=sum(c.values()) - c.get("cancelled", 0), ok=c.get("succeeded", 0), bad=bad)


def counts(s: Session, rollout: Rollout, wave: int | None = None) -> dict[str, int]:
    return rollout_counts.counts(s, rollout, wave)


# ---- stopping -----------------------------------------------------------------------------------------------


def _start_wave(rollout: Rollout, index: int, now: datetime) -> None:
    wave = rollout.waves[index]
    wave.state, wave.started_at = WAVE_RUNNING, now


def _finish(rollout: Rollout, state: str, reason: str, now: datetime) -> None:
    rollout.state, rollout.reason, rollout.updated_at = state, reason, now
    log.info("rollout %s %s: %s", rollout.id, state, reason)


def _drop_unreleased(s: Session, rollout: Rollout, now: datetime) -> None:
    s.flush()
    s.execute(update(DeploymentTarget)
              .where(DeploymentTarget.deployment_id == rollout.id, DeploymentTarget.released_at.is_(None),
                     DeploymentTarget.state == PENDING)
              .values(state=DROPPED, detail=f"rollout {rollout.state}", updated_at=now)
              .execution_options(synchronize_session="fetch"))


def _stop(s: Session, rollout: Rollout, state: str, reason: str, *, settings: Settings, now: datetime,
          rollback: bool) -> None:
    _finish(rollout, state, reason, now)
    _drop_unreleased(s, rollout, now)
    for t in s.scalars(_targets(s, rollout, *IN_FLIGHT)):  # stop what has not begun installing
            message_id = uuid.uuid4().hex
            seq = crud.record_command(s, deployment_id=rollout.id, device_id=t.device_id, message_id=message_id,
                                      now=now).id
            cancel_cmd = CancelCommand(message_id=message_id, seq=seq, sent_at=now, deployment_id=rollout.id,
                                       device_id=t.device_id)
            outbox.enqueue(s, sign(settings, cancel_cmd), now=now)
    if rollback:
        _roll_back(s, rollout, settings=settings, now=now)


def _roll_back(s: Session, rollout: Rollout, *, settings: Settings, now: datetime) -> None:
    """Devices this rollout updated get the bundle they served before, as a plain deployment each (queued in the
    outbox by `plan_deployment`). The agent accepts it below its version floor only because it is the version it
    kept as `previous`, verified and committed before."""
    back: dict[tuple[str, int], list[str]] = {}
    for t in s.scalars(_targets(s, rollout, DeploymentTarget.state.in_(OK_STATES))):
        if t.prev_name and t.prev_version is not None:
            back.setdefault((t.prev_name, t.prev_version), []).append(t.device_id)
    for (name, version), ids in sorted(back.items()):
        for device_id in sorted(ids):
            try:
                plan_deployment(s, settings=settings, bundle_name=name, version=version, device_id=device_id, now=now)
            except NotFoundError as exc:
                log.warning("rollout %s: cannot send %s back: %s", rollout.id, device_id, one_line(exc))


# ---- devices that arrive late -------------------------------------------------------------------------------


def adopt_device(s: Session, *, device_id: str, settings: Settings, now: datetime) -> str | None:
    """Give a device the newest running or succeeded rollout that targets it but does not list it yet (it joined
    the group, was tagged, or registered after the rollout began); returns that rollout's id."""
    return adopt_devices(s, device_ids=[device_id], settings=settings, now=now).get(device_id)


def adopt_devices(s: Session, *, device_ids: Sequence[str], settings: Settings, now: datetime) -> dict[str, str]:
    """`adopt_device` for many devices at once (one ingest batch); device id -> the rollout it joined. Reads the
    live rollouts' ids and queries once, the devices' groups and tags once, and each candidate rollout's existing
    targets among those devices once: a presence never loads a big rollout's targets."""
    newest = s.execute(select(Rollout.id, Rollout.query).where(Rollout.state.in_((RUNNING, SUCCEEDED)))
                       .order_by(Rollout.created_at.desc()).limit(200)).all()
    if not newest:
        return {}
    devices = _chunked(s, select(Device).options(selectinload(Device.groups), selectinload(Device.tags)), Device.id,
                       sorted(set(device_ids)))
    candidates: dict[str, list[str]] = {}
    for device in devices:
        if device.revoked_at is not None:
            continue
        groups, tags = device.group_names, device.tag_map
        first = next((rid for rid, query in newest if _query(query).matches(groups, tags)), None)
        if first is not None:  # only the newest rollout that targets a device counts
            candidates.setdefault(first, []).append(device.id)
    joined: dict[str, str] = {}
    for rid, ids in candidates.items():
        listed = set(_chunked(s, select(DeploymentTarget.device_id).where(DeploymentTarget.deployment_id == rid),
                              DeploymentTarget.device_id, ids))
        new = [d for d in ids if d not in listed]
        if not new:
            continue
        rollout = s.get_one(Rollout, rid)
        last = len(rollout.waves) - 1
        s.add_all(DeploymentTarget(deployment_id=rid, device_id=d, state=PENDING, detail="joined late", last_seq=-1,
                                   created_at=now, updated_at=now, wave=last, attempts=0) for d in new)
        release(s, rollout, settings=settings, now=now)
        joined.update(dict.fromkeys(new, rid))
    return joined


@functools.lru_cache(maxsize=1024)
def _query(text: str) -> TargetQuery:
    return TargetQuery.parse(text)


def live_rollout_ids(s: Session) -> list[str]:
    """Rollouts the reconciler visits: running or paused, and succeeded ones with devices still to answer."""
    busy = select(DeploymentTarget.deployment_id).where(
        or_(DeploymentTarget.released_at.is_(None), DeploymentTarget.state.not_in(TERMINAL)),
        DeploymentTarget.state != DROPPED)
    q = select(Rollout.id).where(or_(Rollout.state.in_(LIVE), (Rollout.state == SUCCEEDED) & Rollout.id.in_(busy)))
    return list(s.scalars(q.order_by(Rollout.created_at)))


class Reconciler(Worker):
    """Runs `reconcile` for every live rollout every `tick_s` seconds and soon after `poke()` (at most one run every
    `min_gap_s`); commits each rollout in its own transaction and then pokes the outbox publisher."""

    name = "slmops-rollouts"

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, *, on_commands: Callable[[], None],
                 tick_s: float = 5.0, min_gap_s: float = 0.5,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        super().__init__(idle_s=tick_s, gap_s=min_gap_s)
        self.sessions, self.settings, self.on_commands, self.clock = sessions, settings, on_commands, clock
        self.runs = 0

    def step(self) -> bool:
        self.run_once()
        return False

    def run_once(self) -> None:
        try:
            with self.sessions() as s:
                ids = live_rollout_ids(s)
        except Exception as exc:
            log.error("rollout reconciler: cannot list rollouts: %s", one_line(exc))
            return
        for rid in ids:
            try:
                with self.sessions() as s, s.begin():
                    reconcile(s, rid, settings=self.settings, now=self.clock())
            except Exception as exc:  # one broken rollout must not stop the others
                log.error("rollout %s: reconcile failed: %s", rid, one_line(exc))
                log.debug("traceback", exc_info=True)
        self.runs += 1
        self.on_commands()
        if self.runs % PRUNE_EVERY_RUNS == 1:
            try:
                with self.sessions() as s, s.begin():
                    outbox.prune(s, before=self.clock() - KEEP_SENT)
            except Exception as exc:
                log.warning("could not prune the outbox: %s", one_line(exc))
