"""The fleet at a glance (viewer): device counts by state, the bundle versions devices serve, the devices whose
last update failed and the newest status reports; what the dashboard's overview page polls."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import Match

from ... import overview
from ..deps import FleetDep, Reader, SessionDep
from ..schemas import StatusReportPublic

router = APIRouter(prefix="/api/v1", tags=["overview"])
ROLLOUTS_PATH = "/api/v1/rollouts"


class DeviceCounts(BaseModel):
    total: int
    online: int
    offline: int
    revoked: int


class VersionCountPublic(BaseModel):
    name: str | None
    version: int | None
    devices: int


class ReportPublic(StatusReportPublic):
    device_id: str


class Overview(BaseModel):
    at: datetime
    mqtt_connected: bool
    rollouts_api: bool  # this fleet serves GET /api/v1/rollouts (the dashboard asks only then)
    devices: DeviceCounts
    versions: list[VersionCountPublic]
    failed_count: int
    failed: list[ReportPublic]
    recent_reports: list[ReportPublic]


def serves(app: Starlette, method: str, path: str) -> bool:
    """Whether the app routes `method path` to a handler (asked the way routing asks, so routers included in
    routers count too)."""
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "path_params": {}}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


@router.get("/overview", response_model=Overview)
def get_overview(request: Request, s: SessionDep, fleet: FleetDep, _caller: Reader) -> Overview:
    n_failed, failed = overview.failed_devices(s)
    return Overview(
        at=datetime.now().astimezone(),
        mqtt_connected=fleet.messaging.connected,
        rollouts_api=serves(request.app, "GET", ROLLOUTS_PATH),
        devices=DeviceCounts(**vars(overview.device_states(s))),
        versions=[VersionCountPublic(**vars(v)) for v in overview.active_versions(s)],
        failed_count=n_failed,
        failed=[ReportPublic.model_validate(r, from_attributes=True) for r in failed],
        recent_reports=[ReportPublic.model_validate(r, from_attributes=True) for r in overview.recent_reports(s)],
    )
