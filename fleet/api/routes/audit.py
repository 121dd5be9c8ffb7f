"""The audit log (admin only): who changed what and when, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ... import auth
from ..deps import Admin, SessionDep
from ..schemas import AuditPublic

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=list[AuditPublic])
def list_audit(s: SessionDep, _caller: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditPublic]:
    return [AuditPublic.model_validate(row) for row in auth.list_audit(s, limit=limit)]
