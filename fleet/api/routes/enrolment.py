"""Enrolment: admins make one-time enrolment tokens; a device trades one for its own credentials.

`POST /api/v1/enrol` takes no bearer token (the enrolment token is the credential). Every refusal counts as a
failed attempt of the caller's address (`FailureLimiter`), so guessing tokens runs into 429 like guessing API
tokens does. The broker password and the device API token are in the answer only; the fleet keeps their hashes.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from fastapi import APIRouter, Request, status

from ... import auth
from ...errors import DeviceRevokedError, EnrolmentError
from ..deps import Admin, FleetDep, SessionDep, client_address
from ..schemas import EnrolmentTokenCreate, EnrolmentTokenCreated, EnrolmentTokenPublic, EnrolRequest, EnrolResponse

router = APIRouter(prefix="/api/v1", tags=["enrolment"])


@router.post("/enrolment-tokens", response_model=EnrolmentTokenCreated, status_code=status.HTTP_201_CREATED)
def create_enrolment_token(body: EnrolmentTokenCreate, s: SessionDep, caller: Admin) -> EnrolmentTokenCreated:
    with s.begin():
        row, secret = auth.create_enrolment_token(
            s, groups=body.groups, device_id=body.device_id, ttl=timedelta(seconds=body.ttl_s), actor=caller.name,
            now=datetime.now(timezone.utc),
        )  # fmt: skip
        return EnrolmentTokenCreated(**EnrolmentTokenPublic.of(row).model_dump(), token=secret)


@router.get("/enrolment-tokens", response_model=list[EnrolmentTokenPublic])
def list_enrolment_tokens(s: SessionDep, _caller: Admin) -> list[EnrolmentTokenPublic]:
    return [EnrolmentTokenPublic.of(t) for t in auth.list_enrolment_tokens(s)]


@router.post("/enrol", response_model=EnrolResponse, status_code=status.HTTP_201_CREATED)
def enrol(body: EnrolRequest, request: Request, s: SessionDep, fleet: FleetDep) -> EnrolResponse:
    """Trade a one-time enrolment token for this device's broker credentials and device API token."""
    address = client_address(request)
    fleet.limiter.check(address)
    try:
        with s.begin():
            done = auth.enrol(s, token=body.token, device_id=body.device_id, accounts=fleet.accounts, now=datetime.now(timezone.utc))
    except (EnrolmentError, DeviceRevokedError) as exc:
        fleet.limiter.failed(address)
        auth.log_refusal(address, f"enrolment of {body.device_id!r} refused ({exc.code})", "POST /api/v1/enrol")
        raise
    return EnrolResponse(
        device_id=done.device_id,
        broker_username=done.device_id,
        broker_password=done.broker_password,
        api_token=done.api_token,
        broker_url=fleet.settings.public_broker_url,  # effective_broker_url unless devices reach it elsewhere
        fleet_url=fleet.settings.public_url,
    )
