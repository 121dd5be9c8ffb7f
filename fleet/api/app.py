"""The fleet's HTTP app: `create_app(settings)` wires the database, the broker, MQTT messaging and the routers.

Lifespan: open the database (creating tables), start the embedded MQTT broker unless `broker_url` names one,
connect messaging and wait briefly for its subscriptions (the app serves even while the broker is away; paho keeps
retrying), load the trusted keys. On shutdown everything stops in reverse order.

The embedded broker admits only clients its `fleet.acl.Authenticator` knows: the one given to `create_app` (or
set on `app.state.authenticator` before start-up), else one that knows the fleet alone. Without a configured
`broker_password` the fleet gets a random one for this run. `Fleet.accounts` is how enrolment and revocation reach
the broker: the embedded broker's own accounts, the `accounts` given to `create_app` (or `app.state.accounts`),
or, with `broker_admin_username` set, mosquitto's dynamic security (`fleet.dynsec.DynsecAccounts`).

Errors raised on purpose (`protocol.errors.SlmopsError` and the fleet's own) become JSON `{"detail", "code"}`
with one status code per family: 404 not found, 409 conflict, 413 too large, 422 unacceptable content or input,
502 the broker refused a change to its accounts.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from protocol.errors import ConfigError, SlmopsError
from protocol.trust import Keyring, PublicKey

from ..acl import Authenticator, BrokerAccounts
from ..bundles import BundleStore
from ..db import open_database
from ..errors import BrokerAccountsError, ConflictError, NotFoundError, TooLargeError
from ..messaging import FleetMessaging
from ..settings import Settings
from .deps import Fleet
from .routes import bundles, deployments, devices, health, metrics

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 5.0  # seconds start-up waits for the MQTT subscriptions before serving anyway
_STATUS = ((NotFoundError, 404), (ConflictError, 409), (TooLargeError, 413), (BrokerAccountsError, 502))


def create_app(
    settings: Settings | None = None,
    *,
    authenticator: Authenticator | None = None,
    accounts: BrokerAccounts | None = None,
) -> FastAPI:
    given = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = given
        async with AsyncExitStack() as stack:
            keyring = load_keyring(settings)
            db = open_database(settings.database_url)
            stack.callback(db.close)
            store = BundleStore(settings.data_dir)
            broker_accounts = accounts or getattr(app.state, "accounts", None)
            if settings.broker_url is None:
                from ..broker import EmbeddedBroker, StaticAccounts

                if settings.broker_password is None:  # the fleet's own account on its own broker, for this run
                    settings = settings.model_copy(update={"broker_password": secrets.token_urlsafe(32)})
                auth = authenticator or getattr(app.state, "authenticator", None)
                if auth is None:
                    log.warning("no broker authenticator given: only the fleet may use the embedded broker")
                    auth = StaticAccounts(settings.broker_password, fleet_username=settings.broker_username)  # type: ignore[arg-type]
                broker = EmbeddedBroker(settings.embedded_broker_host, settings.embedded_broker_port, authenticator=auth)
                await run_in_threadpool(broker.start)
                stack.callback(broker.stop)
                broker_accounts = broker_accounts or broker.accounts
            elif broker_accounts is None and settings.broker_admin_username:
                from ..dynsec import DynsecAccounts

                broker_accounts = DynsecAccounts.from_settings(settings)
                stack.callback(broker_accounts.close)
            messaging = FleetMessaging(settings, db.sessions)
            messaging.start()
            stack.callback(messaging.stop)
            if not await run_in_threadpool(messaging.wait_connected, CONNECT_WAIT_S):
                log.warning("MQTT broker %s not reachable yet; still trying", settings.effective_broker_url)
            app.state.fleet = Fleet(settings=settings, db=db, store=store, messaging=messaging, keyring=keyring,
                                    accounts=broker_accounts)
            yield

    app = FastAPI(title="slmops fleet", version="1", lifespan=lifespan)
    for module in (devices, bundles, deployments, health, metrics):
        app.include_router(module.router)

    @app.exception_handler(SlmopsError)
    async def _slmops_error(_request: Request, exc: SlmopsError) -> JSONResponse:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 422)
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=status)

    return app


def load_keyring(settings: Settings) -> Keyring | None:
    """The keys uploads must be signed by, from `settings.trusted_keys`; None when the list is empty."""
    if not settings.trusted_keys:
        return None
    keys = []
    for path in settings.trusted_keys:
        try:
            keys.append(PublicKey.from_pem(path.read_bytes()))
        except OSError as exc:
            raise ConfigError(f"trusted key {path} cannot be read: {exc}") from exc
    return Keyring(keys=tuple(keys), threshold=settings.trust_threshold)
