"""The fleet at a glance, for the dashboard and `GET /api/v1/overview`: read-only queries over an open `Session`.

    device_states      devices by state: online, offline (both not revoked) and revoked
    active_versions    how many devices serve each bundle version (revoked ones left out)
    failed_devices     devices whose last finished update did not end active (failed, rolled back, rejected)
    recent_reports     the newest status reports, newest first

Each is one bounded SELECT; nothing here writes or reads the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import Subquery

from .models import Device, StatusReportRow

MAX_FAILED = 100  # devices listed as failed in one answer (the count is exact)
MAX_RECENT = 50  # status reports in one answer
TERMINAL = ("active", "rejected", "rolled_back", "failed")
NOT_ACTIVE = ("rejected", "rolled_back", "failed")


@dataclass(frozen=True)
class DeviceStates:
    total: int
    online: int
    offline: int
    revoked: int


@dataclass(frozen=True)
class VersionCount:
    name: str | None  # None: the device serves nothing yet
    version: int | None
    devices: int


def device_states(s: Session) -> DeviceStates:
    revoked = Device.revoked_at.is_not(None)
    q = select(
        func.count(),
        func.coalesce(func.sum(case((revoked, 1), else_=0)), 0),
        func.coalesce(func.sum(case((revoked, 0), (Device.online.is_(True), 1), else_=0)), 0),
    ).select_from(Device)
    total, n_revoked, online = s.execute(q).one()
    return DeviceStates(total=int(total), online=int(online), offline=int(total - n_revoked - online), revoked=int(n_revoked))


def active_versions(s: Session) -> list[VersionCount]:
    """Most served first; devices serving nothing are one row with name and version None."""
    q = (
        select(Device.active_name, Device.active_version, func.count())
        .where(Device.revoked_at.is_(None))
        .group_by(Device.active_name, Device.active_version)
        .order_by(func.count().desc(), Device.active_name, Device.active_version)
        .limit(MAX_RECENT)
    )
    return [VersionCount(name=n, version=v, devices=int(c)) for n, v, c in s.execute(q).tuples()]


def _last_terminal() -> Subquery:
    """Id of each device's newest terminal report."""
    return (
        select(func.max(StatusReportRow.id).label("id"))
        .where(StatusReportRow.state.in_(TERMINAL))
        .group_by(StatusReportRow.device_id)
        .subquery()
    )


def failed_devices(s: Session, *, limit: int = MAX_FAILED) -> tuple[int, list[StatusReportRow]]:
    """(how many devices, their last terminal reports up to `limit`, newest first)."""
    last = _last_terminal()
    where = (StatusReportRow.id.in_(select(last.c.id)), StatusReportRow.state.in_(NOT_ACTIVE))
    n = s.scalar(select(func.count()).select_from(StatusReportRow).where(*where)) or 0
    rows = s.scalars(select(StatusReportRow).where(*where).order_by(StatusReportRow.id.desc()).limit(limit))
    return int(n), list(rows)


def recent_reports(s: Session, *, limit: int = MAX_RECENT) -> list[StatusReportRow]:
    return list(s.scalars(select(StatusReportRow).order_by(StatusReportRow.id.desc()).limit(limit)))
