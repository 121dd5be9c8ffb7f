"""The fleet's HTTP app: `create_app(settings)` wires the database, the broker, MQTT messaging and the routers.

Lifespan: open the database (creating tables), start the embedded MQTT broker unless `broker_url` names one,
connect messaging and wait briefly for its subscriptions (the app serves even while the broker is away; paho keeps
retrying), load the trust folder (`settings.trust_dir`: its bundles role keys uploads) or the trusted keys. On shutdown everything stops in reverse order.

Errors raised on purpose (`protocol.errors.SlmopsError` and the fleet's own) become JSON `{"detail", "code"}`
with one status code per family: 404 not found, 409 conflict, 413 too large, 422 unacceptable content or input.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from protocol.errors import ConfigError, SlmopsError
from protocol.trust import Keyring, PublicKey

from ..bundles import BundleStore
from ..db import open_database
from ..errors import ConflictError, NotFoundError, TooLargeError
from ..messaging import FleetMessaging
from ..settings import Settings
from .deps import Fleet
from ..trust import trust_for
from .routes import bundles, deployments, devices, health, metrics, trust

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 5.0  # seconds start-up waits for the MQTT subscriptions before serving anyway
_STATUS = ((NotFoundError, 404), (ConflictError, 409), (TooLargeError, 413))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            keyring = load_keyring(settings)
            db = open_database(settings.database_url)
            stack.callback(db.close)
            store = BundleStore(settings.data_dir)
            if settings.broker_url is None:
                from ..broker import EmbeddedBroker

                broker = await run_in_threadpool(
                    EmbeddedBroker(settings.embedded_broker_host, settings.embedded_broker_port).start
                )
                stack.callback(broker.stop)
            messaging = FleetMessaging(settings, db.sessions)
            messaging.start()
            stack.callback(messaging.stop)
            if not await run_in_threadpool(messaging.wait_connected, CONNECT_WAIT_S):
                log.warning("MQTT broker %s not reachable yet; still trying", settings.effective_broker_url)
            app.state.fleet = Fleet(settings=settings, db=db, store=store, messaging=messaging, keyring=keyring)
            yield

    app = FastAPI(title="slmops fleet", version="1", lifespan=lifespan)
    for module in (devices, bundles, deployments, health, metrics, trust):
        app.include_router(module.router)

    @app.exception_handler(SlmopsError)
    async def _slmops_error(_request: Request, exc: SlmopsError) -> JSONResponse:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 422)
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=status)

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
