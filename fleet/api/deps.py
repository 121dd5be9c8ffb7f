"""What route handlers receive: the running fleet's parts, a database session and the authenticated caller, as
`Annotated` aliases.

Authentication: `get_caller` reads `Authorization: Bearer <token>` (the OpenAPI schema shows it as the HTTP bearer
scheme), refuses an address with too many recent failures (429, Retry-After), then finds the token
(`fleet.auth.authenticate_token`): none or unknown -> 401 with `WWW-Authenticate: Bearer`. `require(*roles)` turns
that into 403 for a known token without one of the roles. The rule for every route:

    open           /healthz, POST /api/v1/enrol (it carries its own one-time token), GET /api/v1/trust/...,
                   the dashboard's static files under /dashboard/ (no data; the page sends the token to the API)
    Reader         every other GET (viewer, operator, admin); /metrics too unless `metrics_public`
    Operator       bundle upload, deployments (and rollouts)
    Downloader     a bundle file: operator or admin, or a device token whose device a deployment of it targets
    Admin          keys, API tokens, devices (register, revoke, reinstate), enrolment tokens, the audit log

`tests/fleet/test_auth.py` checks each route against this table and that no other route is left open.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from protocol.trust import Keyring

from .. import auth
from ..acl import BrokerAccounts
from ..auth import Caller, FailureLimiter, Role
from ..bundles import BundleStore
from ..db import Database
from ..errors import UnauthenticatedError
from ..messaging import FleetMessaging
from ..outbox import OutboxPublisher
from ..rollouts import Reconciler
from ..settings import Settings
from ..trust import trust_for


@dataclass(frozen=True)
class Fleet:
    """The parts the app's lifespan started; none of them holds state the database does not (the limiter's counts
    are memory only, by design)."""

    settings: Settings
    db: Database
    store: BundleStore
    messaging: FleetMessaging
    keyring: Keyring | None  # None: uploads need a signature, but from any key
    limiter: FailureLimiter
    accounts: BrokerAccounts | None = None  # the broker's account list, where it keeps one (mosquitto dynsec)
    publisher: OutboxPublisher | None = None  # sends the outbox's commands
    reconciler: Reconciler | None = None  # advances rollouts

    def commands_queued(self) -> None:
        """A transaction that queued commands (or changed a rollout) committed: act on it now."""
        if self.reconciler is not None:
            self.reconciler.poke()
        if self.publisher is not None:
            self.publisher.poke()

    def upload_keyring(self) -> Keyring | None:
        """The keys an upload must be signed by now: with a trust folder, its current root's bundles role (so a
        rotation or revocation applies at once, without a restart); else the trusted keys read at start."""
        trust = trust_for(self.settings)
        return trust.upload_keyring() if trust is not None else self.keyring


def get_fleet(request: Request) -> Fleet:
    return request.app.state.fleet


FleetDep = Annotated[Fleet, Depends(get_fleet)]


def get_session(fleet: FleetDep) -> Iterator[Session]:
    """One session per request; handlers open the transaction (`with s.begin():`) where they write."""
    with fleet.db.sessions() as s:
        yield s


SessionDep = Annotated[Session, Depends(get_session)]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="an API token (`slmops fleet token create`), the bootstrap admin token, or a device's token from enrolment",
)


def client_address(request: Request) -> str:
    """The peer's address as the socket saw it (a proxy in front makes every client one address)."""
    return request.client.host if request.client else "unknown"


def get_caller(
    request: Request, fleet: FleetDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Caller:
    address = client_address(request)
    where = f"{request.method} {request.url.path}"
    fleet.limiter.check(address)
    if creds is None:
        auth.log_refusal(address, "no bearer token", where)
        raise UnauthenticatedError("this route needs an API token: send 'Authorization: Bearer <token>'")
    with fleet.db.sessions() as s, s.begin():
        caller = auth.authenticate_token(
            s, token=creds.credentials, admin_token=fleet.settings.admin_token.get_secret_value(), now=datetime.now(timezone.utc)
        )
    if caller is None:
        fleet.limiter.failed(address)
        auth.log_refusal(address, "unknown, revoked or malformed token", where)
        raise UnauthenticatedError("the API token is unknown or revoked; ask an admin for a valid one")
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def require(*roles: Role) -> Callable[..., Caller]:
    """A dependency: the caller, if its role is one of `roles`; 403 otherwise."""

    def dependency(request: Request, caller: CallerDep) -> Caller:
        route = request.scope.get("route")
        auth.require_role(caller, roles, f"{request.method} {getattr(route, 'path', 'this route')}")
        return caller

    return dependency


Reader = Annotated[Caller, Depends(require(*auth.MAY["read"]))]
Operator = Annotated[Caller, Depends(require(*auth.MAY["operate"]))]
Downloader = Annotated[Caller, Depends(require(*auth.MAY["download"]))]
Admin = Annotated[Caller, Depends(require(*auth.MAY["admin"]))]


def metrics_access(
    request: Request, fleet: FleetDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Any:
    """/metrics: open when `metrics_public`, else a Reader."""
    if fleet.settings.metrics_public:
        return None
    caller = get_caller(request, fleet, creds)
    auth.require_role(caller, auth.MAY["read"], "read /metrics")
    return caller
