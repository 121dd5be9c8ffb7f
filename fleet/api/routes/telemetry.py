"""Telemetry read API (viewer): a device's time series and a group's aggregates, bucketed by `fleet.telemetry`.

Ids in the path are full-matched (device ids as in MQTT topics, group names as at registration) before any query;
an unknown device or an empty group is 404; a bad window or step is 422 `bad_telemetry_query`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from protocol.topics import check_device_id

from ... import crud, telemetry
from ...errors import NotFoundError, TelemetryQueryError
from ..deps import Reader, SessionDep
from ..schemas import check_group

router = APIRouter(prefix="/api/v1", tags=["telemetry"])

Since = Annotated[str | None, Query(max_length=telemetry.MAX_TIME_CHARS, description="ISO time with a timezone; default: until - 1 h")]
Until = Annotated[str | None, Query(max_length=telemetry.MAX_TIME_CHARS, description="ISO time with a timezone; default: now")]
Step = Annotated[int, Query(description=f"bucket width in seconds, {telemetry.MIN_STEP_S} to {telemetry.MAX_STEP_S}")]


class DeviceSeries(BaseModel):
    device_id: str
    step_s: int
    since: datetime
    until: datetime
    points: list[telemetry.DevicePoint]  # the query's own records: one shape, in one place


class GroupSeries(BaseModel):
    group: str
    step_s: int
    devices: int  # members of the group now
    since: datetime
    until: datetime
    points: list[telemetry.GroupPoint]


@router.get("/devices/{device_id}/telemetry", response_model=DeviceSeries)
def device_telemetry(device_id: str, s: SessionDep, _caller: Reader, since: Since = None, until: Until = None,
                     step_s: Step = telemetry.DEFAULT_STEP_S) -> DeviceSeries:  # fmt: skip
    check_device_id(device_id)
    w = telemetry.window(since=since, until=until, step_s=step_s, now=datetime.now(timezone.utc))
    if crud.get_device(s, device_id=device_id) is None:
        raise NotFoundError(f"device {device_id!r} is not registered; see GET /api/v1/devices for the known ones")
    points = telemetry.device_series(s, device_id=device_id, w=w)
    return DeviceSeries(device_id=device_id, step_s=w.step_s, since=w.since, until=w.until,
                        points=points)  # fmt: skip


@router.get("/groups/{group}/telemetry", response_model=GroupSeries)
def group_telemetry(group: str, s: SessionDep, _caller: Reader, since: Since = None, until: Until = None,
                    step_s: Step = telemetry.DEFAULT_STEP_S) -> GroupSeries:  # fmt: skip
    try:
        check_group(group)
    except ValueError as exc:
        raise TelemetryQueryError(str(exc)) from None
    w = telemetry.window(since=since, until=until, step_s=step_s, now=datetime.now(timezone.utc))
    members = telemetry.group_members(s, group=group)
    if members == 0:
        raise NotFoundError(f"no device is in group {group!r}; register devices with that group first")
    points = telemetry.group_series(s, group=group, w=w)
    return GroupSeries(group=group, step_s=w.step_s, devices=members, since=w.since, until=w.until,
                       points=points)  # fmt: skip
