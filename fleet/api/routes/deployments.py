"""Deployments: ask for a bundle on a device or a group, then follow each device's state.

POST to a device records its desired bundle and queues one DeployCommand in the outbox (see `fleet.deployments`);
POST to a group starts a plain rollout (fleet/rollouts.py: every device at once, no canary, never aborted), so a
device that joins the group later gets the bundle too. Each target's state then follows the devices' reports.
"""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, status

from ... import auth, crud
from ...deployments import plan_deployment
from ...rollouts import RolloutSpec, create_rollout
from ...strategy import Gate, Strategy, TargetQuery
from ...errors import NotFoundError
from ..deps import FleetDep, Operator, Reader, SessionDep
from ..schemas import DeploymentCreate, DeploymentPublic

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"])


@router.post("", response_model=DeploymentPublic, status_code=status.HTTP_201_CREATED)
def create_deployment(body: DeploymentCreate, s: SessionDep, fleet: FleetDep, caller: Operator) -> DeploymentPublic:
    now = datetime.now(timezone.utc)
    with s.begin():
        if body.device_id is not None:
            deployment = plan_deployment(s, settings=fleet.settings, bundle_name=body.bundle, version=body.version,
                                         device_id=body.device_id, now=now)
            target = f"device={body.device_id}"
        else:
            assert body.group is not None
            spec = RolloutSpec(bundle_name=body.bundle, bundle_version=body.version, query=TargetQuery.group(body.group),
                               strategy=Strategy.immediate(), gate=Gate(no_regression=False))
            deployment = create_rollout(s, spec, settings=fleet.settings, actor=caller.name, now=now).deployment
            target = f"group={body.group}"
        auth.audit(s, actor=caller.name, action="deployment.created", target=f"deployment:{deployment.id}",
                   detail=f"{body.bundle} v{body.version} {target} devices={len(deployment.targets)}", now=now)  # fmt: skip
        out = DeploymentPublic.of(deployment)
    fleet.commands_queued()
    return out


@router.get("", response_model=list[DeploymentPublic])
def list_deployments(s: SessionDep, _caller: Reader, limit: int = 100) -> list[DeploymentPublic]:
    return [DeploymentPublic.of(d) for d in crud.list_deployments(s, limit=max(1, min(limit, 1000)))]


@router.get("/{deployment_id}", response_model=DeploymentPublic)
def get_deployment(deployment_id: str, s: SessionDep, _caller: Reader) -> DeploymentPublic:
    deployment = crud.get_deployment(s, deployment_id=deployment_id)
    if deployment is None:
        raise NotFoundError(f"deployment {deployment_id!r} does not exist; see GET /api/v1/deployments")
    return DeploymentPublic.of(deployment)
