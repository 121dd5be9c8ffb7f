"""Devices: register one (with its groups), tag one, list them, show one with its desired bundle and status
history, and revoke or reinstate one. A registration or a tag change that brings a device into a running or
finished rollout's target gives it that rollout's bundle (`fleet.rollouts.adopt_device`).

Revoke workflow: in one transaction the device is stamped `revoked_at`, its API tokens are revoked and its broker
secret cleared (the embedded broker asks the database, so it refuses the device from then on); after the commit
the broker's own account list drops it (`Fleet.accounts.remove_device`, mosquitto's dynamic security). Should that
call fail, the answer is 502 and repeating the revoke (idempotent) tries the broker again.
"""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Response, status

from ... import auth, crud
from ...errors import BrokerAccountsError, NotFoundError
from ...rollouts import adopt_device
from ..deps import Admin, FleetDep, Operator, Reader, SessionDep
from ..schemas import DeviceCreate, DeviceDetail, DevicePublic, TagsUpdate

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.post("", response_model=DevicePublic, status_code=status.HTTP_201_CREATED)
def register_device(body: DeviceCreate, s: SessionDep, response: Response, fleet: FleetDep, caller: Admin) -> DevicePublic:
    """Create a device or update its groups (200 when it existed)."""
    now = datetime.now(timezone.utc)
    with s.begin():
        device, created = crud.register_device(s, device_id=body.id, groups=body.groups, now=now)
        auth.audit(s, actor=caller.name, action="device.registered", target=f"device:{body.id}",
                   detail=f"groups={','.join(device.group_names)} created={created}", now=now)  # fmt: skip
        adopt_device(s, device_id=body.id, settings=fleet.settings, now=now)
        out = DevicePublic.of(device)
    fleet.commands_queued()
    if not created:
        response.status_code = status.HTTP_200_OK
    return out


@router.patch("/{device_id}/tags", response_model=DevicePublic)
def tag_device(device_id: str, body: TagsUpdate, s: SessionDep, fleet: FleetDep, caller: Operator) -> DevicePublic:
    """Set (a value) or remove (null) tags; target queries of rollouts select devices by them."""
    now = datetime.now(timezone.utc)
    with s.begin():
        if crud.get_device(s, device_id=device_id) is None:
            raise NotFoundError(f"device {device_id!r} is not registered; see GET /api/v1/devices for the known ones")
        device = crud.set_tags(s, device_id=device_id, tags=body.tags)
        auth.audit(s, actor=caller.name, action="device.tagged", target=f"device:{device_id}",
                   detail=",".join(f"{k}={v}" for k, v in sorted(body.tags.items())), now=now)
        adopt_device(s, device_id=device_id, settings=fleet.settings, now=now)
        out = DevicePublic.of(device)
    fleet.commands_queued()
    return out


@router.get("", response_model=list[DevicePublic])
def list_devices(s: SessionDep, _caller: Reader, group: str | None = None) -> list[DevicePublic]:
    return [DevicePublic.of(d) for d in crud.list_devices(s, group=group)]


@router.get("/{device_id}", response_model=DeviceDetail)
def get_device(device_id: str, s: SessionDep, _caller: Reader, history: int = 50) -> DeviceDetail:
    device = crud.get_device(s, device_id=device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not registered; see GET /api/v1/devices for the known ones")
    return DeviceDetail.build(
        device,
        crud.desired_target(s, device_id=device_id),
        crud.status_history(s, device_id=device_id, limit=max(1, min(history, 1000))),
    )


@router.post("/{device_id}/revoke", response_model=DevicePublic)
def revoke_device(device_id: str, s: SessionDep, fleet: FleetDep, caller: Admin) -> DevicePublic:
    """Refuse the device from now on: broker, API tokens and enrolment (until an admin reinstates it)."""
    with s.begin():
        out = DevicePublic.of(auth.revoke_device(s, device_id=device_id, actor=caller.name, now=datetime.now(timezone.utc)))
    if fleet.accounts is not None:
        try:
            fleet.accounts.remove_device(out.id)
        except Exception as exc:  # the database already refuses it; the broker's list must follow
            raise BrokerAccountsError(
                f"device {out.id!r} is revoked in the fleet, but the broker did not drop its account ({exc.__class__.__name__}); "
                "revoke it again to retry"
            ) from exc
    return out


@router.post("/{device_id}/reinstate", response_model=DevicePublic)
def reinstate_device(device_id: str, s: SessionDep, caller: Admin) -> DevicePublic:
    """Lift a revocation; the device then needs a new enrolment token to get credentials again."""
    with s.begin():
        return DevicePublic.of(auth.reinstate_device(s, device_id=device_id, actor=caller.name, now=datetime.now(timezone.utc)))
