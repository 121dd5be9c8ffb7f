"""Devices: register one (with its groups), list them, show one with its desired bundle and status history."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Response, status

from ... import crud
from ...errors import NotFoundError
from ..deps import SessionDep
from ..schemas import DeviceCreate, DeviceDetail, DevicePublic

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.post("", response_model=DevicePublic, status_code=status.HTTP_201_CREATED)
def register_device(body: DeviceCreate, s: SessionDep, response: Response) -> DevicePublic:
    """Create a device or update its groups (200 when it existed)."""
    with s.begin():
        device, created = crud.register_device(s, device_id=body.id, groups=body.groups, now=datetime.now(timezone.utc))
        out = DevicePublic.of(device)
    if not created:
        response.status_code = status.HTTP_200_OK
    return out


@router.get("", response_model=list[DevicePublic])
def list_devices(s: SessionDep, group: str | None = None) -> list[DevicePublic]:
    return [DevicePublic.of(d) for d in crud.list_devices(s, group=group)]


@router.get("/{device_id}", response_model=DeviceDetail)
def get_device(device_id: str, s: SessionDep, history: int = 50) -> DeviceDetail:
    device = crud.get_device(s, device_id=device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not registered; see GET /api/v1/devices for the known ones")
    return DeviceDetail.build(
        device,
        crud.desired_target(s, device_id=device_id),
        crud.status_history(s, device_id=device_id, limit=max(1, min(history, 1000))),
    )
