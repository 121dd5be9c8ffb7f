"""What a rollout's devices have done, counted by the database: one GROUP BY per question, never a row per device
loaded into Python, so reconciling a rollout of tens of thousands of devices costs a few small queries.

Each target row falls in exactly one of COUNT_KEYS (`status_of`, a SQL CASE):

    cancelled    never sent: its rollout stopped (or it was revoked) before its wave reached it
    succeeded    reported active (or downloaded, for a download-only command), and, where the bundle carries its own
                 held-out set, measured it at or above the gate
    failed       reported rejected or failed, or measured the held-out set below the gate (or did not say)
    rolled_back  installed, failed its health check, serves the previous version again
    timed_out    released, past the device timeout, no final report yet
    pending      its wave has not reached it yet
    sent         released, nothing heard yet
    updating     released, reported a step that is not final
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, case, false, func, literal, or_, select
from sqlalchemy.orm import Session

from protocol.messages import UpdateState

from .models import PENDING, DeploymentTarget as T, Rollout

DROPPED = "cancelled"  # the target state of a device never released because its rollout stopped
OK_STATES = frozenset({UpdateState.ACTIVE.value, UpdateState.DOWNLOADED.value})  # downloaded: a download-only command
BAD_STATES = frozenset({UpdateState.REJECTED.value, UpdateState.FAILED.value, UpdateState.ROLLED_BACK.value})
TERMINAL = OK_STATES | BAD_STATES | {DROPPED}
COUNT_KEYS = ("pending", "sent", "updating", "succeeded", "failed", "timed_out", "rolled_back", "cancelled")


def below_gate(rollout: Rollout) -> Any:
    """SQL: the device did not prove the bundle's held-out score meets the gate (false where there is nothing to
    prove: no gate on the metric the bundle's set measures, or no set)."""
    metric = rollout.gate.get("device_metric")
    if not metric:
        return false()
    floor = float(rollout.gate.get("min", {}).get(metric, 0.0))
    return or_(T.eval_metric.is_(None), T.eval_metric != metric, T.eval_score.is_(None), T.eval_score < floor)


def status_of(rollout: Rollout) -> Any:
    """SQL: the COUNT_KEYS entry of a target row of `rollout`."""
    ok = T.state.in_(OK_STATES)
    return case(
        (T.state == DROPPED, literal("cancelled")),
        (and_(ok, below_gate(rollout)), literal("failed")),
        (ok, literal("succeeded")),
        (T.state == UpdateState.ROLLED_BACK.value, literal("rolled_back")),
        (T.state.in_(BAD_STATES), literal("failed")),
        (T.timed_out_at.is_not(None), literal("timed_out")),
        (and_(T.released_at.is_(None), T.state == PENDING, T.wave.is_not(None)), literal("pending")),
        (T.state == PENDING, literal("sent")),
        else_=literal("updating"),
    )


def by_wave(s: Session, rollout: Rollout) -> dict[int | None, dict[str, int]]:
    """wave index -> {count key: devices}, every key present."""
    status = status_of(rollout).label("status")
    q = select(T.wave, status, func.count()).where(T.deployment_id == rollout.id).group_by(T.wave, status)
    out: dict[int | None, dict[str, int]] = {}
    for wave, key, n in s.execute(q).tuples():
        out.setdefault(wave, dict.fromkeys(COUNT_KEYS, 0))[key] += n
    return out


def counts(s: Session, rollout: Rollout, wave: int | None = None) -> dict[str, int]:
    """Devices per COUNT_KEYS entry, of one wave or (wave None) of the whole rollout."""
    waves = by_wave(s, rollout)
    total = dict.fromkeys(COUNT_KEYS, 0)
    for w, c in waves.items():
        if wave is None or w == wave:
            for k, n in c.items():
                total[k] += n
    return total


def wave_scores(s: Session, rollout: Rollout) -> dict[int | None, dict[str, object]]:
    """wave index -> the held-out score its devices measured: metric, mean, min, n (waves without one left out;
    a wave whose devices name different metrics has no single score)."""
    finished = T.state.in_(OK_STATES | BAD_STATES)
    q = (select(T.wave, func.min(T.eval_metric), func.max(T.eval_metric), func.avg(T.eval_score),
                func.min(T.eval_score), func.count())
         .where(T.deployment_id == rollout.id, T.eval_score.is_not(None), finished)
         .group_by(T.wave))
    out: dict[int | None, dict[str, object]] = {}
    for wave, lo, hi, mean, least, n in s.execute(q).tuples():
        if lo is not None and lo == hi:
            out[wave] = {"metric": lo, "mean": float(mean), "min": float(least), "n": int(n)}
    return out
