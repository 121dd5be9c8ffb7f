"""Groups: the names devices were registered with, and how many devices each holds."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from ... import crud
from ..deps import Reader, SessionDep

router = APIRouter(prefix="/api/v1/groups", tags=["groups"])


class GroupPublic(BaseModel):
    name: str
    devices: int


@router.get("", response_model=list[GroupPublic])
def list_groups(s: SessionDep, _caller: Reader) -> list[GroupPublic]:
    return [GroupPublic(name=g, devices=n) for g, n in crud.list_groups(s)]
