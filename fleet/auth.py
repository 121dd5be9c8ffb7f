"""Who may use the fleet: API tokens and roles, enrolment and revocation of devices, the audit log, the broker's
authenticator, and the limit on failed attempts. One lifecycle, one file.

Tokens: `new_token()` makes `slm_` + 256 random bits; only `hash_secret(token)` is stored, and a presented token is
found by its hash and compared again with `hmac.compare_digest`. The bootstrap admin (`Settings.admin_token`) is
not stored at all; it acts as "bootstrap".

Roles, and what each may do (`MAY` is the one table the HTTP layer asks):
    admin     everything: keys, API tokens, devices (register, revoke, reinstate), enrolment tokens, the audit log,
              and whatever operator and viewer may
    operator  bundles (upload, download), deployments (and rollouts), and whatever viewer may
    viewer    read-only GETs of devices, bundles, deployments and /metrics
    device    download the bundles deployed to its own device id, nothing else

Enrolment: an admin makes a one-time enrolment token (groups, optional pinned device id, expiry). A device trades it
once (`enrol`) for its broker password and a device API token; both are shown only in that answer and stored as
hashes. `revoke_device` stamps `revoked_at`, revokes its API tokens and clears its broker secret, so the broker
(`DbAuthenticator`) and the API refuse it at once; it cannot enrol again until `reinstate_device`.

Every change goes into `audit_log` in the same transaction as the change itself (`audit`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, get_args

from sqlalchemy import exists, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from protocol.errors import IdentifierError, TopicError, clip, one_line
from protocol.topics import check_device_id

from . import crud
from .acl import BrokerAccounts, Principal
from .errors import (
    BrokerAccountsError,
    DeviceRevokedError,
    EnrolmentError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
)
from .models import ApiToken, AuditEntry, Deployment, DeploymentTarget, Device, EnrolmentToken

log = logging.getLogger("slmops.fleet.auth")

Role = Literal["admin", "operator", "viewer", "device"]
ROLES: tuple[Role, ...] = get_args(Role)
MAY: dict[str, tuple[Role, ...]] = {
    "read": ("admin", "operator", "viewer"),  # GET devices, bundles, deployments, /metrics
    "operate": ("admin", "operator"),  # upload bundles, create deployments and rollouts
    "download": ("admin", "operator", "device"),  # a bundle file; a device only what is deployed to it
    "admin": ("admin",),  # keys, API tokens, devices, enrolment tokens, the audit log
}

TOKEN_PREFIX = "slm_"
MAX_TOKEN_CHARS = 256  # a presented token longer than this is refused before it is hashed
TOKEN_RE = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces; always with fullmatch
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # token names an admin gives; ':' is kept for "device:"
BOOTSTRAP = "bootstrap"
RESERVED_NAMES = frozenset({BOOTSTRAP, "fleet"})
RESERVED_DEVICE_IDS = frozenset({"fleet"})  # the fleet's own broker username
FLEET_USERNAME = "fleet"
AUDIT_DETAIL_CHARS = 500  # characters of an audit row's detail
LAST_USED_EVERY = timedelta(seconds=60)  # last_used_at is written at most this often per token
MAX_ENROL_TTL = timedelta(days=30)


def new_token() -> str:
    """A new API or enrolment token: the prefix (so secret scanners spot one) and 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """sha256 hex of a secret. A plain, unsalted hash is sound here because every secret we store a hash of is
    256 random bits from `secrets`: nobody can guess or precompute it, so a slow password hash would add nothing
    but latency on every request (and it lets a token be found by its hash)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def same_secret(presented: str, expected: str) -> bool:
    """Constant-time equality of two secrets (hashed first, so lengths leak nothing either)."""
    return hmac.compare_digest(hash_secret(presented), hash_secret(expected))


def check_token_name(name: object) -> str:
    if not isinstance(name, str) or len(name) > 64 or not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise IdentifierError(
            f"token name {clip(name)} is not valid: use 1-64 letters, digits, '.', '_', '@', '-' (not 'bootstrap')"
        )
    return name


def check_enrol_device_id(device_id: object) -> str:
    device_id = check_device_id(device_id)
    if device_id in RESERVED_DEVICE_IDS:
        raise IdentifierError(f"device id {device_id!r} is reserved for the fleet's own broker account; pick another")
    return device_id


@dataclass(frozen=True)
class Caller:
    """Who sent an HTTP request: a token's name and role (and its device for role "device")."""

    name: str
    role: Role
    device_id: str | None = None
    token_id: int | None = None  # None: the bootstrap admin


# ---- failed attempts ------------------------------------------------------------------------------------------


class FailureLimiter:
    """Failed authentication attempts per client address in a sliding window; past `max_failures` the address
    gets 429 until its oldest counted failure leaves the window.

    Memory only: a restart forgets the counts and each replica counts its own, so N replicas allow N times the
    rate; at most `max_addresses` addresses are tracked (the stalest are dropped first). Thread-safe."""

    def __init__(
        self,
        max_failures: int = 10,
        window_s: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = 10_000,
    ) -> None:
        self.max_failures, self.window_s, self.clock, self.max_addresses = max_failures, window_s, clock, max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, address: str) -> None:
        """Raise RateLimitedError while `address` has too many recent failures."""
        with self._lock:
            now = self.clock()
            times = self._trim(address, now)
            if times is not None and len(times) >= self.max_failures:
                wait = max(1, math.ceil(times[0] + self.window_s - now))
                raise RateLimitedError(
                    f"too many failed authentication attempts from {clip(address)}; retry in {wait} s with a valid token",
                    retry_after_s=wait,
                )

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            times = self._trim(address, now)
            if times is None:
                while len(self._failures) >= self.max_addresses:
                    self._failures.popitem(last=False)
                times = self._failures[address] = deque()
            times.append(now)
            self._failures.move_to_end(address)

    def _trim(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times


def log_refusal(address: str, reason: str, where: str) -> None:
    """One line per refused credential, naming the address and the reason but never the credential."""
    log.warning("refused credentials from %s for %s: %s", clip(address, 64), clip(where, 80), reason)


# ---- API tokens -----------------------------------------------------------------------------------------------


def authenticate_token(s: Session, *, token: str, admin_token: str, now: datetime) -> Caller | None:
    """The caller a bearer token belongs to, or None (malformed, unknown, revoked, or its device is revoked)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not TOKEN_RE.fullmatch(token):
        return None
    if admin_token and same_secret(token, admin_token):
        return Caller(name=BOOTSTRAP, role="admin")
    digest = hash_secret(token)
    row = s.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, digest):
        return None
    if row.role not in ROLES:
        return None
    if row.device_id is not None:
        device = s.get(Device, row.device_id)
        if device is None or device.revoked_at is not None:
            return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        row.last_used_at = now
    return Caller(name=row.name, role=row.role, device_id=row.device_id, token_id=row.id)  # type: ignore[arg-type]


def create_token(
    s: Session, *, name: str, role: Role, device_id: str | None, actor: str, now: datetime
) -> tuple[ApiToken, str]:
    """A new API token row and its secret (returned once, never stored)."""
    if role not in ROLES:
        raise IdentifierError(f"role {clip(role)} is not one of {', '.join(ROLES)}")
    if (role == "device") != (device_id is not None):
        raise IdentifierError("a token of role 'device' names its device_id; tokens of other roles name none")
    if device_id is not None:
        device = s.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"device {device_id!r} is not registered; register or enrol it first")
        if device.revoked_at is not None:
            raise DeviceRevokedError(f"device {device_id!r} is revoked; reinstate it before giving it a token")
    secret = new_token()
    row = ApiToken(name=name, role=role, device_id=device_id, token_hash=hash_secret(secret), created_at=now, created_by=actor)
    s.add(row)
    s.flush()
    audit(s, actor=actor, action="token.created", target=f"token:{row.id}", detail=f"name={name} role={role}", now=now)
    return row, secret


def list_tokens(s: Session) -> list[ApiToken]:
    return list(s.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(s: Session, *, token_id: int, actor: str, now: datetime) -> ApiToken:
    row = s.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"API token {token_id} does not exist; see GET /api/v1/tokens")
    if row.revoked_at is None:
        row.revoked_at = now
        audit(s, actor=actor, action="token.revoked", target=f"token:{row.id}", detail=f"name={row.name}", now=now)
    return row


# ---- enrolment and revocation ---------------------------------------------------------------------------------


def create_enrolment_token(
    s: Session, *, groups: Sequence[str], device_id: str | None, ttl: timedelta, actor: str, now: datetime
) -> tuple[EnrolmentToken, str]:
    if not timedelta(seconds=1) <= ttl <= MAX_ENROL_TTL:
        raise IdentifierError(f"an enrolment token lives 1 s to {MAX_ENROL_TTL.days} days, not {ttl}")
    secret = new_token()
    row = EnrolmentToken(
        token_hash=hash_secret(secret), groups=sorted(set(groups)), device_id=device_id, created_at=now,
        expires_at=now + ttl, created_by=actor,
    )  # fmt: skip
    s.add(row)
    s.flush()
    pinned = f" device={device_id}" if device_id else ""
    audit(s, actor=actor, action="enrolment_token.created", target=f"enrolment:{row.id}",
          detail=f"groups={','.join(row.groups)}{pinned} expires={row.expires_at.isoformat()}", now=now)  # fmt: skip
    return row, secret


def list_enrolment_tokens(s: Session) -> list[EnrolmentToken]:
    return list(s.scalars(select(EnrolmentToken).order_by(EnrolmentToken.id)))


@dataclass(frozen=True)
class Enrolled:
    """What a device receives once: its broker password and its device API token."""

    device_id: str
    broker_password: str
    api_token: str


def enrol(
    s: Session, *, token: str, device_id: str, accounts: BrokerAccounts | None, now: datetime
) -> Enrolled:
    """Trade a one-time enrolment token for the device's own credentials (see the module docstring).

    The token is claimed with one conditional UPDATE, so two devices racing with the same token cannot both win.
    `accounts.add_device` runs inside the caller's transaction: if the broker refuses, nothing is kept and the token
    stays unused."""
    device_id = check_enrol_device_id(device_id)
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not TOKEN_RE.fullmatch(token):
        raise EnrolmentError("the enrolment token is malformed; ask an admin for one ('slmops fleet enrol-token create')")
    digest = hash_secret(token)
    row = s.scalars(select(EnrolmentToken).where(EnrolmentToken.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise EnrolmentError("the enrolment token is unknown; ask an admin for one ('slmops fleet enrol-token create')")
    if row.used_at is not None:
        raise EnrolmentError("the enrolment token was already used; each works once, ask an admin for a new one")
    if now >= row.expires_at:
        raise EnrolmentError(f"the enrolment token expired at {row.expires_at.isoformat()}; ask an admin for a new one")
    if row.device_id is not None and row.device_id != device_id:
        raise EnrolmentError(f"the enrolment token is for another device id, not {device_id!r}; use the id it names")
    existing = s.get(Device, device_id)
    if existing is not None and existing.revoked_at is not None:
        raise DeviceRevokedError(
            f"device {device_id!r} was revoked; an admin must reinstate it (POST /api/v1/devices/{device_id}/reinstate)"
        )
    claimed = s.execute(
        update(EnrolmentToken)
        .where(EnrolmentToken.id == row.id, EnrolmentToken.used_at.is_(None))
        .values(used_at=now, used_by_device=device_id)
    )
    if claimed.rowcount != 1:
        raise EnrolmentError("the enrolment token was already used; each works once, ask an admin for a new one")
    device, _ = crud.register_device(s, device_id=device_id, groups=row.groups, now=now)
    password = secrets.token_urlsafe(32)
    device.broker_secret_hash = hash_secret(password)
    _revoke_device_tokens(s, device_id=device_id, now=now)  # a re-enrolled device gets fresh credentials only
    _, api_token = create_token(s, name=f"device:{device_id}", role="device", device_id=device_id, actor=f"device:{device_id}", now=now)
    s.flush()
    audit(s, actor=f"device:{device_id}", action="device.enrolled", target=f"device:{device_id}",
          detail=f"enrolment={row.id} groups={','.join(row.groups)}", now=now)  # fmt: skip
    if accounts is not None:
        try:
            accounts.add_device(device_id, password)
        except Exception as exc:  # any failure of the broker's account API undoes the enrolment
            raise BrokerAccountsError(f"the broker did not add device {device_id!r}: {one_line(exc)}; enrol again") from exc
    return Enrolled(device_id=device_id, broker_password=password, api_token=api_token)


def revoke_device(s: Session, *, device_id: str, actor: str, now: datetime) -> Device:
    """Stamp the device revoked, revoke its API tokens and clear its broker secret (idempotent). The caller commits
    and then calls `accounts.remove_device`, so the database refuses the device even if the broker call fails."""
    device = s.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not registered; see GET /api/v1/devices")
    if device.revoked_at is None:
        device.revoked_at = now
    device.broker_secret_hash = None
    device.online = False  # its broker session is dropped (mosquitto sends no last will for a deleted client)
    revoked = _revoke_device_tokens(s, device_id=device_id, now=now)
    audit(s, actor=actor, action="device.revoked", target=f"device:{device_id}", detail=f"api_tokens_revoked={revoked}", now=now)
    return device


def reinstate_device(s: Session, *, device_id: str, actor: str, now: datetime) -> Device:
    """Lift a revocation; the device must enrol again (with a new enrolment token) to get credentials."""
    device = s.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not registered; see GET /api/v1/devices")
    if device.revoked_at is not None:
        device.revoked_at = None
        audit(s, actor=actor, action="device.reinstated", target=f"device:{device_id}", now=now)
    return device


def _revoke_device_tokens(s: Session, *, device_id: str, now: datetime) -> int:
    result = s.execute(
        update(ApiToken).where(ApiToken.device_id == device_id, ApiToken.revoked_at.is_(None)).values(revoked_at=now)
    )
    return result.rowcount or 0


def device_may_download(s: Session, *, device_id: str, name: str, version: int) -> bool:
    """Is this bundle the subject of a deployment that sent this device a command? (A rollout's wave that has not
    reached the device yet does not count.)"""
    q = select(
        exists()
        .where(DeploymentTarget.device_id == device_id, DeploymentTarget.released_at.is_not(None))
        .where(DeploymentTarget.deployment_id == Deployment.id)
        .where(Deployment.bundle_name == name, Deployment.bundle_version == version)
    )
    return bool(s.scalar(q))


def require_role(caller: Caller, allowed: Sequence[Role], what: str) -> None:
    if caller.role not in allowed:
        raise ForbiddenError(f"a token of role {caller.role!r} may not {what}; that needs role {' or '.join(allowed)}")


# ---- audit ----------------------------------------------------------------------------------------------------


def audit(s: Session, *, actor: str, action: str, target: str, detail: str = "", now: datetime) -> AuditEntry:
    """Append one audit row (in the caller's transaction, so it exists exactly when the change does)."""
    row = AuditEntry(at=now, actor=actor[:160], action=action[:64], target=target[:200], detail=detail[:AUDIT_DETAIL_CHARS])
    s.add(row)
    return row


def list_audit(s: Session, *, limit: int = 100) -> list[AuditEntry]:
    """The newest `limit` rows, newest first."""
    return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)))


# ---- the broker's authenticator -------------------------------------------------------------------------------


class DbAuthenticator:
    """`fleet.acl.Authenticator` over the fleet's database: username "fleet" with the fleet's broker password, or a
    device id with that device's broker secret. Unknown, revoked, secretless or malformed -> None."""

    def __init__(self, sessions: sessionmaker[Session], fleet_password: str) -> None:
        self.sessions = sessions
        self._fleet_hash = hash_secret(fleet_password) if fleet_password else None

    def authenticate(self, username: str | None, password: str | None) -> Principal | None:
        if not isinstance(username, str) or not isinstance(password, str) or not password:
            return None
        if len(password) > MAX_TOKEN_CHARS:
            return None
        digest = hash_secret(password)
        if username == FLEET_USERNAME:
            ok = self._fleet_hash is not None and hmac.compare_digest(digest, self._fleet_hash)
            return Principal(role="fleet") if ok else None
        try:
            device_id = check_device_id(username)
        except TopicError:
            return None
        try:
            with self.sessions() as s:
                device = s.get(Device, device_id)
                stored = device.broker_secret_hash if device is not None and device.revoked_at is None else None
        except SQLAlchemyError as exc:
            log.error("broker authentication of %s failed on the database: %s", clip(device_id), one_line(exc))
            return None
        if stored is None or not hmac.compare_digest(digest, stored):
            return None
        return Principal(role="device", device_id=device_id)


__all__ = [
    "BOOTSTRAP", "MAY", "ROLES", "Caller", "DbAuthenticator", "Enrolled", "FailureLimiter", "Role",
    "audit", "authenticate_token", "create_enrolment_token", "create_token", "device_may_download", "enrol",
    "hash_secret", "list_audit", "list_enrolment_tokens", "list_tokens", "new_token", "reinstate_device",
    "revoke_device", "revoke_token",
]  # fmt: skip
