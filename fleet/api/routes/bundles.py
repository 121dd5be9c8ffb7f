"""Bundles: upload (streamed, verified, then stored), list, show a manifest, and serve the file with HTTP Range.

Upload workflow: the request body streams into a temp file in the store (hashed on the way, refused once it passes
`max_bundle_bytes`); `verify_bundle` checks the signatures against the trusted keys, every member's tar header
against the manifest (a plain file, its exact path, its declared size: a sparse or lying member is refused before
any of its bytes is hashed) and every file's hash; only then is the row inserted and the file moved into
`bundles/<name>/<version>.bundle`. The same name and version with the same bytes is accepted again (200); with
other bytes it is a 409. Anything refused leaves nothing behind. Names and versions in URLs pass
`protocol.manifest`'s strict identifier checks (422 `bad_identifier` otherwise) before they reach the database.

Who: uploads need an operator (or admin); reads a viewer; the file an operator, an admin, or a device token whose
device is a target of a deployment of that very bundle (403 for any other bundle).
"""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import FileResponse
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from protocol.errors import ManifestError
from protocol.manifest import check_name, check_version

from ... import auth, crud
from ...bundles import Upload, read_bundle_envelope, signer_keyids, verify_bundle
from ...errors import ConflictError, ForbiddenError, NotFoundError, TooLargeError
from ...models import Bundle
from ..deps import Downloader, Fleet, FleetDep, Operator, Reader, SessionDep
from ..schemas import BundleDetail, BundleSummary

router = APIRouter(prefix="/api/v1/bundles", tags=["bundles"])


@router.post("", response_model=BundleSummary, status_code=status.HTTP_201_CREATED)
async def upload_bundle(request: Request, fleet: FleetDep, response: Response, caller: Operator) -> BundleSummary:
    """Store a bundle sent as the raw request body (201 new, 200 already stored with the same bytes)."""
    cap = fleet.settings.max_bundle_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise TooLargeError(f"bundle is {declared} bytes, over the fleet's {cap} byte limit (SLMOPS_FLEET_MAX_BUNDLE_BYTES)")
    with fleet.store.incoming() as upload:
        async for chunk in request.stream():
            upload.write(chunk)
            if upload.size > cap:
                raise TooLargeError(f"bundle passed the fleet's {cap} byte limit (SLMOPS_FLEET_MAX_BUNDLE_BYTES)")
        if upload.size == 0:
            raise ManifestError("the request body is empty; send the bundle file's bytes (Content-Type: application/octet-stream)")
        summary, created = await run_in_threadpool(_ingest, fleet, upload, caller.name)
    if not created:
        response.status_code = status.HTTP_200_OK
    return summary


def _ingest(fleet: Fleet, upload: Upload, actor: str) -> tuple[BundleSummary, bool]:
    now = datetime.now(timezone.utc)
    upload.finish()
    manifest = verify_bundle(upload.path, fleet.upload_keyring(), now=now)
    keyids = signer_keyids(read_bundle_envelope(upload.path))
    name, version = manifest.name, manifest.version
    with fleet.db.sessions() as s, s.begin():
        existing = crud.get_bundle(s, name=name, version=version)
        if existing is not None:
            if existing.sha256 != upload.sha256:
                raise ConflictError(
                    f"bundle {name} v{version} is already stored with other content (sha256 {existing.sha256[:12]}...); "
                    "a published version never changes: build the new model as a higher version"
                )
            if not fleet.store.path(existing.storage_path).is_file():
                fleet.store.commit(upload, name=name, version=version)
            return BundleSummary.of(existing), False
        latest = crud.latest_version(s, name=name)
        try:
            row = crud.add_bundle(
                s,
                manifest=manifest,
                sha256=upload.sha256,
                size=upload.size,
                storage_path=fleet.store.relpath(name, version),
                signer_keyids=keyids,
                now=now,
            )
        except IntegrityError as exc:
            raise ConflictError(f"bundle {name} v{version} is being stored by another upload right now; retry") from exc
        auth.audit(s, actor=actor, action="bundle.uploaded", target=f"bundle:{name}:{version}",
                   detail=f"sha256={upload.sha256} size={upload.size} signers={','.join(k[:16] for k in keyids)}", now=now)  # fmt: skip
        fleet.store.commit(upload, name=name, version=version)
    warning = None
    if latest is not None and version < latest:
        warning = (
            f"v{version} is older than v{latest}, the newest stored {name}; devices that already run v{latest} "
            "will refuse it as a rollback (bad_version)"
        )
    return BundleSummary.of(row, warning=warning), True


@router.get("", response_model=list[BundleSummary])
def list_bundles(s: SessionDep, _caller: Reader, name: str | None = None) -> list[BundleSummary]:
    if name is not None:
        check_name(name)
    return [BundleSummary.of(b) for b in crud.list_bundles(s, name=name)]


@router.get("/{name}/{version}", response_model=BundleDetail)
def get_bundle(name: str, version: int, s: SessionDep, _caller: Reader) -> BundleDetail:
    return BundleDetail.full(_bundle(s, name, version))


@router.get("/{name}/{version}/file", response_class=FileResponse)
def download_bundle(name: str, version: int, s: SessionDep, fleet: FleetDep, caller: Downloader) -> FileResponse:
    """The bundle file; `Range: bytes=a-b` gets 206 with those bytes, and the ETag is the file's sha256."""
    check_name(name)
    check_version(version)
    if caller.role == "device":
        assert caller.device_id is not None
        if not auth.device_may_download(s, device_id=caller.device_id, name=name, version=version):
            raise ForbiddenError(f"bundle {name} v{version} is not deployed to device {caller.device_id!r}")
    bundle = _bundle(s, name, version)
    path = fleet.store.path(bundle.storage_path)
    if not path.is_file():
        raise NotFoundError(f"bundle {name} v{version} is recorded but its file is gone from the store; upload it again")
    return FileResponse(
        path,
        media_type="application/x-tar",
        filename=f"{name}-{version}.bundle",
        headers={"ETag": f'"{bundle.sha256}"'},
    )


router.add_api_route(  # the same handler for HEAD (size and ETag without the bytes), under its own operation id
    "/{name}/{version}/file", download_bundle, methods=["HEAD"], response_class=FileResponse, operation_id="head_bundle_file"
)


def _bundle(s: SessionDep, name: str, version: int) -> Bundle:
    check_name(name)  # IdentifierError (422) before the database sees them
    check_version(version)
    bundle = crud.get_bundle(s, name=name, version=version)
    if bundle is None:
        raise NotFoundError(f"bundle {name} v{version} is not stored; see GET /api/v1/bundles, or upload it")
    return bundle
