"""The fleet's HTTP app: `create_app(settings)` wires the database, the broker, MQTT messaging and the routers.

`create_app` first refuses settings the fleet must not serve with (`Settings.check_startable`: no trusted bundle
key, an empty, short or default secret) with a ConfigError, outside demo mode.

Lifespan: open the database (creating tables), start the embedded MQTT broker unless `broker_url` names one
(with TLS when `embedded_broker_tls_cert_file` is set),
connect messaging and wait briefly for its subscriptions (the app serves even while the broker is away; paho keeps
retrying), start the outbox publisher (fleet/outbox.py), the rollout reconciler (fleet/rollouts.py) and the
telemetry retention job (fleet/retention.py), load the trust folder (`settings.trust_dir`: its bundles role keys
uploads) or the trusted keys. On shutdown everything stops in reverse order.

The embedded broker admits only clients its `fleet.acl.Authenticator` knows: the one given to `create_app` (or
set on `app.state.authenticator` before start-up), else `fleet.auth.DbAuthenticator`: the fleet's own account
(`broker_username` / `broker_password`) and every enrolled device that is not revoked. `Fleet.accounts` is how enrolment and revocation reach
the broker: the embedded broker's own accounts, the `accounts` given to `create_app` (or `app.state.accounts`),
or, with `broker_admin_username` set, mosquitto's dynamic security (`fleet.dynsec.DynsecAccounts`).

Errors raised on purpose (`protocol.errors.SlmopsError` and the fleet's own) become JSON `{"detail", "code"}`
with one status code per family: 401 unauthenticated (with `WWW-Authenticate: Bearer`), 403 forbidden (a known
caller without the role, a revoked device), 404 not found, 409 conflict, 413 too large, 429 rate limited (with
`Retry-After`), 502 the broker refused an account change, 422 unacceptable content or input.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from protocol.errors import ConfigError, SlmopsError
from protocol.trust import Keyring, PublicKey

from ..bundles import BundleStore
from ..db import open_database
from ..acl import Authenticator, BrokerAccounts
from ..auth import FailureLimiter
from ..errors import (
    BrokerAccountsError,
    ConflictError,
    DeviceRevokedError,
    EnrolmentError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    TooLargeError,
    UnauthenticatedError,
)
from ..messaging import FleetMessaging
from ..outbox import OutboxPublisher
from ..retention import RetentionJob
from ..rollouts import Reconciler
from ..settings import Settings
from .deps import Fleet
from ..trust import trust_for
from .. import dashboard
from .routes import (audit, bundles, deployments, devices, enrolment, groups, health, metrics, overview, rollouts,
                     telemetry, tokens, trust)

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 5.0  # seconds start-up waits for the MQTT subscriptions before serving anyway
_STATUS = (
    (UnauthenticatedError, 401), (EnrolmentError, 401), (ForbiddenError, 403), (DeviceRevokedError, 403),
    (NotFoundError, 404), (ConflictError, 409), (TooLargeError, 413), (RateLimitedError, 429), (BrokerAccountsError, 502),
)  # fmt: skip
DEMO_SECRETS_FILE = "demo-secrets.json"


def create_app(
    settings: Settings | None = None,
    *,
    limiter: FailureLimiter | None = None,
    authenticator: Authenticator | None = None,
    accounts: BrokerAccounts | None = None,
) -> FastAPI:
    """The fleet app. Seams for tests and for deployments with mosquitto: `limiter` (failed-attempt counting,
    injectable clock), `authenticator` (who may use the embedded broker; default: the database's devices and the
    fleet's own account) and `accounts` (the broker's account list, where it keeps one)."""
    given = settings or Settings()
    given.check_startable()
    limiter = limiter or FailureLimiter()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = given
        async with AsyncExitStack() as stack:
            keyring = load_keyring(settings)
            if settings.demo:
                where = write_demo_secrets(settings)
                log.warning("demo mode: the admin token and the fleet's broker password are in %s", where)
            db = open_database(settings.database_url)
            stack.callback(db.close)
            store = BundleStore(settings.data_dir)
            broker_accounts = accounts or getattr(app.state, "accounts", None)
            if settings.broker_url is None:
                from ..auth import DbAuthenticator
                from ..broker import EmbeddedBroker, listener_tls

                auth = authenticator or getattr(app.state, "authenticator", None)
                if auth is None:  # the fleet's own account and every enrolled device that is not revoked
                    auth = DbAuthenticator(db.sessions, settings.broker_password.get_secret_value())
                broker = EmbeddedBroker(settings.embedded_broker_host, settings.embedded_broker_port, authenticator=auth,
                                        tls=listener_tls(settings))
                await run_in_threadpool(broker.start)
                stack.callback(broker.stop)
                broker_accounts = broker_accounts or broker.accounts
            elif broker_accounts is None and settings.broker_admin_username:
                from ..dynsec import DynsecAccounts

                broker_accounts = DynsecAccounts.from_settings(settings)
                stack.callback(broker_accounts.close)
            messaging = FleetMessaging(settings, db.sessions)
            publisher = OutboxPublisher(db.sessions, messaging)
            reconciler = Reconciler(db.sessions, settings, on_commands=publisher.poke, tick_s=settings.rollout_tick_s)
            messaging.on_published = publisher.on_published
            messaging.on_stored = lambda kinds: reconciler.poke() if kinds - {"telemetry"} else None
            messaging.start()
            stack.callback(messaging.stop)
            publisher.start()
            stack.callback(publisher.stop)
            reconciler.start()
            stack.callback(reconciler.stop)
            reconciler.poke()  # rollouts a stopped fleet left running continue at once
            retention = RetentionJob(settings, db.sessions)
            retention.start()
            stack.callback(retention.stop)
            if not await run_in_threadpool(messaging.wait_connected, CONNECT_WAIT_S):
                log.warning("MQTT broker %s not reachable yet; still trying", settings.effective_broker_url)
            app.state.fleet = Fleet(settings=settings, db=db, store=store, messaging=messaging, keyring=keyring,
                                    limiter=limiter, accounts=broker_accounts, publisher=publisher,
                                    reconciler=reconciler)
            yield

    app = FastAPI(title="slmops fleet", version="1", lifespan=lifespan)
    for module in (devices, groups, bundles, deployments, rollouts, tokens, enrolment, audit, trust, health, metrics,
                   telemetry, overview):
        app.include_router(module.router)
    app.include_router(dashboard.router)  # static pages at /dashboard/; they call the API with the user's token

    @app.exception_handler(SlmopsError)
    async def _slmops_error(_request: Request, exc: SlmopsError) -> JSONResponse:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 422)
        headers = {}
        if isinstance(exc, UnauthenticatedError):
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, RateLimitedError):
            headers["Retry-After"] = str(exc.retry_after_s)
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=status, headers=headers)

    return app


def load_keyring(settings: Settings) -> Keyring | None:
    """The keys uploads must be signed by: the trust root's bundles role with `settings.trust_dir` (checked at start,
    so a broken trust folder stops the fleet), else `settings.trusted_keys`; None when neither is set."""
    fleet_trust = trust_for(settings)
    if fleet_trust is not None:
        return fleet_trust.upload_keyring()
    if not settings.trusted_keys:
        return None
    keys = []
    for path in settings.trusted_keys:
        try:
            keys.append(PublicKey.from_pem(path.read_bytes()))
        except OSError as exc:
            raise ConfigError(f"trusted key {path} cannot be read: {exc}") from exc
    return Keyring(keys=tuple(keys), threshold=settings.trust_threshold)


def write_demo_secrets(settings: Settings) -> str:
    """Write the demo's generated secrets to `<data_dir>/demo-secrets.json`, created 0600; return its path."""
    path = settings.data_dir / DEMO_SECRETS_FILE
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    body = {
        "admin_token": settings.admin_token.get_secret_value(),
        "broker_username": "fleet",
        "broker_password": settings.broker_password.get_secret_value(),
    }
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2)
    os.replace(tmp, path)
    return str(path)
