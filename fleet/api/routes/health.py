"""Health: is the database answering, and is the fleet subscribed on the MQTT broker."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from ..deps import FleetDep, SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(s: SessionDep, fleet: FleetDep) -> JSONResponse:
    """200 while the database answers (the broker's state is reported, not required); 503 otherwise."""
    try:
        s.execute(text("SELECT 1"))
        database = "ok"
    except SQLAlchemyError as exc:
        database = f"error: {exc.__class__.__name__}"
    body = {
        "status": "ok" if database == "ok" else "degraded",
        "database": database,
        "broker": "connected" if fleet.messaging.connected else "disconnected",
        "broker_url": fleet.settings.effective_broker_url,
    }
    return JSONResponse(body, status_code=200 if database == "ok" else 503)
