"""API tokens (admin only): create one (its secret is in that answer only), list them without secrets, revoke one."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Path, status

from ... import auth
from ..deps import Admin, SessionDep
from ..schemas import TokenCreate, TokenCreated, TokenPublic

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])
TokenId = Annotated[int, Path(ge=1, le=(1 << 63) - 1, description="the token's id from GET /api/v1/tokens")]


@router.post("", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, s: SessionDep, caller: Admin) -> TokenCreated:
    with s.begin():
        row, secret = auth.create_token(
            s, name=body.name, role=body.role, device_id=body.device_id, actor=caller.name, now=datetime.now(timezone.utc)
        )
        return TokenCreated(**TokenPublic.of(row).model_dump(), token=secret)


@router.get("", response_model=list[TokenPublic])
def list_tokens(s: SessionDep, _caller: Admin) -> list[TokenPublic]:
    return [TokenPublic.of(t) for t in auth.list_tokens(s)]


@router.post("/{token_id}/revoke", response_model=TokenPublic)
def revoke_token(token_id: TokenId, s: SessionDep, caller: Admin) -> TokenPublic:
    with s.begin():
        return TokenPublic.of(auth.revoke_token(s, token_id=token_id, actor=caller.name, now=datetime.now(timezone.utc)))
