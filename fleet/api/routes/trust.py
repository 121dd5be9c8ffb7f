"""The trust root devices walk to: the current root and every earlier one, as signed by `slmops keys`.

`GET /api/v1/trust/root.json` is the current root (what a new device is provisioned with);
`GET /api/v1/trust/root/{n}.json` is root n, which a device that missed rotations fetches for n = its version + 1,
+2, ... until a 404. The bytes are served as signed; devices verify them (protocol/root.py). 404 without a trust
folder.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Response

from protocol.manifest import MAX_VERSION

from ...errors import NotFoundError
from ...trust import trust_for
from ..deps import FleetDep

router = APIRouter(prefix="/api/v1/trust", tags=["trust"])
VERSION_RE = re.compile(r"[1-9][0-9]{0,18}")  # a root version in the path: fullmatch, then <= 2**63 - 1


@router.get("/root.json", response_class=Response)
def current_root(fleet: FleetDep) -> Response:
    trust = trust_for(fleet.settings)
    if trust is None:
        raise NotFoundError("this fleet has no trust folder; start it with SLMOPS_FLEET_TRUST_DIR (slmops keys init)")
    return Response(trust.root.raw, media_type="application/json")


@router.get("/root/{name}", response_class=Response)
def root_by_version(name: str, fleet: FleetDep) -> Response:
    stem = name[: -len(".json")] if name.endswith(".json") else ""
    if not VERSION_RE.fullmatch(stem) or int(stem) > MAX_VERSION:
        raise NotFoundError("ask for /api/v1/trust/root/<n>.json with n a root version from 1")
    trust = trust_for(fleet.settings)
    data = trust.root_bytes(int(stem)) if trust is not None else None
    if data is None:
        raise NotFoundError(f"no trust root v{stem}; the newest is /api/v1/trust/root.json")
    return Response(data, media_type="application/json")
