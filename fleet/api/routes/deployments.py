"""Deployments: ask for a bundle on a device or a group, then follow each device's state.

POST records every target device's desired bundle and commits, then publishes one DeployCommand per device
(see `fleet.deployments`); each target's state then follows the devices' status reports.
"""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, status

from ... import auth, crud
from ...deployments import plan_deployment
from ...errors import NotFoundError
from ..deps import FleetDep, Operator, Reader, SessionDep
from ..schemas import DeploymentCreate, DeploymentPublic

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"])


@router.post("", response_model=DeploymentPublic, status_code=status.HTTP_201_CREATED)
def create_deployment(body: DeploymentCreate, s: SessionDep, fleet: FleetDep, caller: Operator) -> DeploymentPublic:
    now = datetime.now(timezone.utc)
    with s.begin():
        deployment, commands = plan_deployment(
            s,
            settings=fleet.settings,
            bundle_name=body.bundle,
            version=body.version,
            device_id=body.device_id,
            group=body.group,
            now=now,
        )
        target = f"device={body.device_id}" if body.device_id is not None else f"group={body.group}"
        auth.audit(s, actor=caller.name, action="deployment.created", target=f"deployment:{deployment.id}",
                   detail=f"{body.bundle} v{body.version} {target} devices={len(commands)}", now=now)  # fmt: skip
        out = DeploymentPublic.of(deployment)
    for command in commands:
        fleet.messaging.publish_deploy(command)
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
