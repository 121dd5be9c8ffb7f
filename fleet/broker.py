"""The embedded MQTT 3.1.1 broker (amqtt) for a fleet that has no broker of its own.

Workflow: `EmbeddedBroker(host, port).start()` runs amqtt on its own asyncio loop in a daemon thread and returns
once amqtt's listener is bound (or raises ConfigError when it cannot bind); `stop()` shuts it down and joins the thread. It is also a context manager.

Anyone may connect without credentials. amqtt's stock `AnonymousAuthPlugin` marks such sessions anonymous, and
amqtt then drops them at disconnect and queues nothing for them, which would undo `clean_session=False`;
`OpenAuthPlugin` admits every client without that mark, so persistent sessions keep their subscriptions and
QoS 1 messages while a client is away (amqtt hands such queued messages over with the retain flag set).
Retained messages and last wills are amqtt's own; `_Broker` only stops amqtt from replaying other clients'
retained messages to a client that did not subscribe to them. For several fleet
replicas use an external MQTT 5 broker (mosquitto, EMQX) instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from protocol.errors import ConfigError

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # seconds a disconnected persistent session (and its queue) is kept
START_TIMEOUT_S = 10.0  # seconds to wait for the broker's listener


class _Broker(Broker):
    """amqtt's broker, sending a connecting client only the retained messages of its own subscriptions.

    amqtt 0.12.1 replays, on every connect, the retained messages matching any filter any client subscribed to,
    so a device would receive every other device's retained presence.
    """

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        subscribers = self._subscriptions.get(subscription[0], [])
        if any(s.client_id == session.client_id for s, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


class OpenAuthPlugin(BaseAuthPlugin):
    """Admit every client, keeping its session persistent when it asks for clean_session=False."""

    async def authenticate(self, *, session: Session) -> bool:
        return True


def broker_config(host: str, port: int) -> dict[str, object]:
    """amqtt 0.12 configuration: one TCP listener and the open authentication plugin, nothing else."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "session_expiry_interval": SESSION_EXPIRY_S,
        "plugins": {f"{__name__}.OpenAuthPlugin": {}},
    }


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host, self.port = host, port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"amqtt-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._error is not None:
            self.stop()
            raise ConfigError(
                f"embedded MQTT broker could not listen on {self.host}:{self.port}: {self._error or 'timed out'}. "
                "Free the port or set SLMOPS_FLEET_EMBEDDED_BROKER_PORT / SLMOPS_FLEET_BROKER_URL."
            ) from self._error
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=15)
        self._thread = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            broker = _Broker(broker_config(self.host, self.port))
            await broker.start()
        except Exception as exc:  # amqtt wraps bind errors in BrokerError; anything else is just as fatal here
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await broker.shutdown()
