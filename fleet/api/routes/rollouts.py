"""Rollouts: start one (a bundle to a group or a tag query, in waves behind a quality gate), follow it, pause,
resume or cancel it. The engine is fleet/rollouts.py; each change commits with the commands it causes, then the
outbox publisher and the reconciler are poked."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, status
from sqlalchemy import select

from ... import auth, rollouts
from ...models import Rollout
from ..deps import FleetDep, Operator, Reader, SessionDep
from ..schemas import RolloutControl, RolloutCreate, RolloutList, RolloutPublic

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])


@router.post("", response_model=RolloutPublic, status_code=status.HTTP_201_CREATED)
def create(body: RolloutCreate, s: SessionDep, fleet: FleetDep, caller: Operator) -> RolloutPublic:
    now = datetime.now(timezone.utc)
    spec = rollouts.RolloutSpec(bundle_name=body.bundle.name, bundle_version=body.bundle.version,
                                query=body.target.parsed(), strategy=body.strategy, gate=body.gate)
    with s.begin():
        rollout = rollouts.create_rollout(s, spec, settings=fleet.settings, actor=caller.name, now=now)
        auth.audit(s, actor=caller.name, action="rollout.created", target=f"rollout:{rollout.id}",
                   detail=f"{spec.bundle_name} v{spec.bundle_version} {spec.query} "
                          f"devices={len(rollout.deployment.targets)} waves={len(rollout.waves)}", now=now)
        out = RolloutPublic.of(s, rollout)
    fleet.commands_queued()
    return out


@router.get("", response_model=RolloutList)
def list_rollouts(s: SessionDep, _caller: Reader, limit: int = 50, state: str | None = None) -> RolloutList:
    q = select(Rollout).order_by(Rollout.created_at.desc()).limit(max(1, min(limit, 500)))
    if state is not None:
        q = q.where(Rollout.state == state)
    return RolloutList(rollouts=[RolloutPublic.of(s, r) for r in s.scalars(q).all()])


@router.get("/{rollout_id}", response_model=RolloutPublic)
def show(rollout_id: str, s: SessionDep, _caller: Reader) -> RolloutPublic:
    return RolloutPublic.of(s, rollouts.get_rollout(s, rollout_id))


@router.post("/{rollout_id}/pause", response_model=RolloutPublic)
def pause(rollout_id: str, s: SessionDep, fleet: FleetDep, caller: Operator) -> RolloutPublic:
    now = datetime.now(timezone.utc)
    with s.begin():
        out = RolloutPublic.of(s, rollouts.pause(s, rollout_id, now=now))
        auth.audit(s, actor=caller.name, action="rollout.paused", target=f"rollout:{rollout_id}", now=now)
    return out


@router.post("/{rollout_id}/resume", response_model=RolloutPublic)
def resume(rollout_id: str, s: SessionDep, fleet: FleetDep, caller: Operator) -> RolloutPublic:
    now = datetime.now(timezone.utc)
    with s.begin():
        out = RolloutPublic.of(s, rollouts.resume(s, rollout_id, settings=fleet.settings, now=now))
        auth.audit(s, actor=caller.name, action="rollout.resumed", target=f"rollout:{rollout_id}", now=now)
    fleet.commands_queued()
    return out


@router.post("/{rollout_id}/cancel", response_model=RolloutPublic)
def cancel(rollout_id: str, s: SessionDep, fleet: FleetDep, caller: Operator,
           body: RolloutControl | None = None) -> RolloutPublic:
    now = datetime.now(timezone.utc)
    rollback = body.rollback if body is not None else False
    with s.begin():
        out = RolloutPublic.of(s, rollouts.cancel(s, rollout_id, settings=fleet.settings, now=now, rollback=rollback))
        auth.audit(s, actor=caller.name, action="rollout.cancelled", target=f"rollout:{rollout_id}",
                   detail=f"rollback={rollback}", now=now)
    fleet.commands_queued()
    return out
