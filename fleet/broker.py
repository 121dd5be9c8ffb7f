"""The embedded MQTT 3.1.1 broker (amqtt) for a fleet that has no broker of its own, with every client identified.

Workflow: `EmbeddedBroker(host, port, authenticator=..., tls=...).start()` (`tls=listener_tls(settings)`: TLS
only, with the certificate `embedded_broker_tls_cert_file`) runs amqtt on its own asyncio loop in a
daemon thread and returns once amqtt's listener is bound (or raises ConfigError when it cannot bind); `stop()` shuts
it down and joins the thread. It is also a context manager. `accounts` (an `EmbeddedAccounts`, a
`fleet.acl.BrokerAccounts`) is how enrolment and revocation reach it: `remove_device` drops a revoked device's live
session and forgets its queued commands (`disconnect_device`).

Who may do what (`_Gate`, asked on the broker's loop):
- CONNECT: every client names a user and a password, which the `fleet.acl.Authenticator` turns into a `Principal`
  (in a worker thread: it may ask the database); anonymous clients, wrong passwords and revoked devices get CONNACK
  4 (bad user name or password). The client id must be one `Principal.may_use_client_id` allows and a last will
  must go to a topic the principal may publish to, else CONNACK 5 (not authorised). This check runs as soon as the
  CONNECT is read, before amqtt looks at the client id, so a refused client never deletes, takes over or rewrites
  the credentials of another client's session (`_Broker._initialize_client_session`).
- SUBSCRIBE: `fleet.acl.may_subscribe`; a refused filter gets the failure return code 0x80 in the SUBACK.
- PUBLISH: `fleet.acl.may_publish`; a refused message is dropped (MQTT 3.1.1 has no way to say so), counted in
  `refused_publishes` and logged on one line (the first from a client, then at each power of two).
- delivery: a message reaches a client only on topics its principal may read, as a second line of defence.
The principal admitted under each client id is kept until that device is removed; amqtt's plugin API
(`FleetAclPlugin`, an auth and topic plugin) asks the gate on every later check.

Sessions: amqtt's stock `AnonymousAuthPlugin` marks sessions anonymous, and amqtt then drops them at disconnect and
queues nothing for them, which would undo `clean_session=False`; `FleetAclPlugin` admits clients without that mark,
so persistent sessions keep their subscriptions and QoS 1 messages while a client is away (amqtt hands such queued
messages over with the retain flag set). A QoS 1 message sent to a client stays in its session until that client's
PUBACK (`_Handler`): amqtt 0.12.1 forgets it after 5 s without one, or when the connection drops, so a client that
acknowledges only after its own work is done (the fleet acks after the database commit) would lose every message it
held when it crashed; kept, they are sent again (DUP) when the client reconnects, as MQTT 3.1.1 asks. Retained messages and last wills are amqtt's own; `_Broker` only stops
amqtt from replaying other clients' retained messages to a client that did not subscribe to them. For several
fleet replicas use an external MQTT 5 broker (mosquitto with the configuration in `deploy/mosquitto/`) instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import ssl
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED, SERVER_UNAVAILABLE, ConnackPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import OUTGOING, IncomingApplicationMessage, OutgoingApplicationMessage
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import format_client_message

from protocol import topics
from protocol.errors import ConfigError, clip, one_line

from .acl import Authenticator, Principal, may_publish, may_subscribe

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # seconds a disconnected persistent session (and its queue) is kept
START_TIMEOUT_S = 10.0  # seconds to wait for the broker's listener
DROP_TIMEOUT_S = 10.0  # seconds disconnect_device waits for the broker's loop


def may_receive(who: Principal, topic: str) -> bool:
    """What a principal may be sent: a device only its own commands, the fleet only device reports."""
    if who.role == "device":
        return topic == str(topics.cmd(who.device_id))  # type: ignore[arg-type]
    try:
        return topics.Topic.parse(topic).channel is not topics.Channel.CMD
    except Exception:  # noqa: BLE001 - any topic that does not parse is one the fleet never reads
        return False


class _Gate:
    """The principal admitted under each client id, and the counts of what was refused."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self.principals: dict[str, Principal] = {}  # client id -> who connected under it
        self.refused_connects = 0
        self.refused_subscriptions = 0
        self.refused_publishes = 0
        self._publishes_by_client: Counter[str] = Counter()

    async def admit(self, session: Session) -> int | None:
        """None when this CONNECT may go on, else the CONNACK return code that refuses it."""
        cid = session.client_id or ""
        shown = f"{clip(cid, 80)} from {session.remote_address}"
        if not session.username or session.password is None:
            return self._refuse(BAD_USERNAME_PASSWORD, shown, "no user name or password (anonymous clients are refused)")
        try:
            who = await asyncio.to_thread(self.authenticator.authenticate, session.username, session.password)
        except Exception as exc:  # noqa: BLE001 - a broken authenticator refuses, it never admits
            log.error("MQTT authentication failed for %s: %s", shown, one_line(exc))
            return self._refuse(SERVER_UNAVAILABLE, shown, "the authenticator failed")
        if who is None:
            return self._refuse(BAD_USERNAME_PASSWORD, shown, f"unknown user {clip(session.username, 80)}, wrong password or revoked")
        if not who.may_use_client_id(cid):
            return self._refuse(NOT_AUTHORIZED, shown, f"user {clip(session.username, 80)} may not use this client id")
        if session.will_flag and not may_publish(who, session.will_topic or ""):
            return self._refuse(NOT_AUTHORIZED, shown, f"a last will on {clip(session.will_topic, 80)} it may not publish to")
        self.principals[cid] = who
        return None

    def _refuse(self, code: int, shown: str, why: str) -> int:
        self.refused_connects += 1
        log.warning("refused MQTT client %s: %s", shown, why)
        return code

    def allows(self, session: Session | None, topic: str, action: Action) -> bool:
        cid = session.client_id if session is not None else None
        who = self.principals.get(cid) if cid else None
        if action == Action.RECEIVE:
            return who is not None and may_receive(who, topic)
        if action == Action.SUBSCRIBE:
            if who is not None and may_subscribe(who, topic):
                return True
            self.refused_subscriptions += 1
            log.warning("refused MQTT client %s the subscription to %s", clip(cid, 80), clip(topic, 120))
            return False
        if who is not None and may_publish(who, topic):
            return True
        self.refused_publishes += 1
        self._publishes_by_client[cid or ""] += 1
        n = self._publishes_by_client[cid or ""]
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th ... from one client: a flood cannot flood the log
            log.warning("dropped a PUBLISH from MQTT client %s to %s: not allowed for its account (%d from it so far)",
                        clip(cid, 80), clip(topic, 120), n)
        return False


class FleetAclPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """amqtt's plugin API onto the gate: admits only clients the gate admitted, filters every topic action."""

    @dataclass
    class Config:
        gate: Any = None  # the broker's _Gate

    async def authenticate(self, *, session: Session) -> bool:
        gate: _Gate = self.context.config.gate  # type: ignore[union-attr]
        return session.client_id in gate.principals  # set by _Gate.admit a moment ago, or the session is refused

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        gate: _Gate = self.context.config.gate  # type: ignore[union-attr]
        return topic is not None and action is not None and gate.allows(session, topic, action)


class _Handler(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler, keeping an outgoing QoS 1 message in the session until it is acknowledged.

    amqtt 0.12.1 waits 5 s for a PUBACK, then drops the message, and drops it too when the connection ends (its wait
    is cancelled); here the wait has no time limit (MQTT 3.1.1 resends only on reconnect), and a message whose wait
    ended without a PUBACK stays in `session.inflight_out`, which amqtt sends again, flagged DUP, on the next connect.
    A PUBACK that arrives after its wait ended (amqtt's resend waits at most 10 s) still completes the message.
    """

    async def _handle_qos1_message_flow(self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage) -> None:
        if app_message.direction != OUTGOING or app_message.qos != QOS_1 or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        if packet_id is None or app_message.puback_packet is not None:
            raise AMQTTError(f"outgoing QoS 1 message {packet_id} has no packet id or was acknowledged already")
        session = self.session
        session.inflight_out[packet_id] = app_message  # type: ignore[assignment]
        waiter: asyncio.Future[PubackPacket] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            await self._send_packet(packet)
            app_message.publish_packet = packet
            app_message.puback_packet = await waiter
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
        session.inflight_out.pop(packet_id, None)  # acknowledged: only now may the session forget it

    async def handle_puback(self, puback: PubackPacket) -> None:
        packet_id = puback.variable_header.packet_id if puback.variable_header is not None else None
        waiter = self._puback_waiters.get(packet_id) if packet_id is not None else None
        if waiter is None and self.session is not None and packet_id in self.session.inflight_out:
            self.session.inflight_out.pop(packet_id)  # acknowledged after its resend stopped waiting: done
            return
        await super().handle_puback(puback)


class _Broker(Broker):
    """amqtt's broker, checking each CONNECT before it touches any session, and sending a connecting client only
    the retained messages of its own subscriptions.

    amqtt 0.12.1 deletes (clean session) or takes over and rewrites (persistent session) the session of a CONNECT's
    client id before it asks the authentication plugins, so a refused client could still kick another off; and it
    replays, on every connect, the retained messages matching any filter any client subscribed to, so a device
    would receive every other device's retained presence.
    """

    def __init__(self, config: dict[str, Any], gate: _Gate) -> None:
        self.gate = gate
        self._wildcards: set[str] = set()  # filters with + or # ever granted (only the fleet may hold one)
        super().__init__(config)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        granted = await super().add_subscription(subscription, session)
        if granted < 0x80 and ("+" in subscription[0] or "#" in subscription[0]):
            self._wildcards.add(subscription[0])
        return granted

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """amqtt 0.12.1's broadcast of one message, but looking only at the filters that can match it: the topic
        itself and the wildcard filters. amqtt walks every filter of every client for every message, and each device
        holds one (its cmd topic), so a rollout cost the square of the fleet size (bench/rollout.py measured it)."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        filters = [f for f in (topic, *self._wildcards) if f in self._subscriptions and self._matches(topic, f)]
        for k_filter in filters:
            for target_session, sub_qos in list(self._subscriptions.get(k_filter, ())):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target_session.transitions.state == "connected"
                if not connected and not target_session.clean_session and qos in (1, 2) and not target_session.is_anonymous:
                    await self._retain_broadcast_message(broadcast, qos, target_session)  # held for its return
                    continue
                handler = self._get_handler(target_session) if connected else None
                if handler:
                    running_tasks.append(asyncio.ensure_future(handler.mqtt_publish(topic, broadcast["data"], qos,
                                                                                    retain=False)))

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str, remote_port: int
                                         ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await _Handler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await writer.close()
            raise
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        refusal = await self.gate.admit(session)
        if refusal is not None:
            await ConnackPacket.build(0, refusal).to_stream(writer)
            await writer.close()
            raise MQTTError(f"refused {format_client_message(address=remote_address, port=remote_port)}")
        # from here on amqtt 0.12.1's own _initialize_client_session, unchanged
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "username", "password"):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    def create_offline_session(self, client_id: str) -> tuple[BrokerProtocolHandler, Session]:
        session = Session()
        session.client_id = client_id
        handler = _Handler(self.plugins_manager, session)
        session.transitions.disconnect()
        return handler, session

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        subscribers = self._subscriptions.get(subscription[0], [])
        if any(s.client_id == session.client_id for s, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def drop_client(self, client_id: str) -> bool:
        """Forget who `client_id` was, end its connection and delete its session; True if there was one."""
        self.gate.principals.pop(client_id, None)
        session, handler = self._sessions.get(client_id, (None, None))
        if session is None:
            return False
        if handler is not None and session.transitions.is_connected():
            await handler.handle_connection_closed()  # its message loop ends and closes the socket
            await handler.stop()
        await self._delete_session(client_id)
        return True


@dataclass(frozen=True)
class ListenerTls:
    """TLS on the embedded broker's listener: its certificate and key (PEM); clients that present a certificate
    must chain to `ca_file` when one is given (amqtt asks for client certificates but does not require them).
    With TLS on, the listener speaks nothing else: a plain-TCP client gets no CONNACK. Clients still log in with
    a user name and password; TLS keeps those (and every command) from being read or changed on the way."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None

    def check(self) -> None:
        """Raise ConfigError, naming the file, unless the certificate, its key (and the CA) load."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
            if self.ca_file is not None:
                ctx.load_verify_locations(str(self.ca_file))
        except FileNotFoundError as exc:
            raise ConfigError(f"embedded broker TLS file {clip(str(exc.filename), 200)} does not exist; "
                              "make the broker's certificate with 'slmops ca server'") from exc
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot use the embedded broker's TLS certificate {clip(str(self.cert_file), 200)} "
                              f"with key {clip(str(self.key_file), 200)}: {one_line(exc)}") from exc


def listener_tls(settings: Any) -> ListenerTls | None:
    """The embedded broker's TLS from `fleet.settings.Settings` (`embedded_broker_tls_*`), or None when off."""
    cert, key = settings.embedded_broker_tls_cert_file, settings.embedded_broker_tls_key_file
    return ListenerTls(cert, key) if cert is not None and key is not None else None


def broker_config(host: str, port: int, gate: _Gate, tls: ListenerTls | None = None) -> dict[str, object]:
    """amqtt 0.12 configuration: one TCP listener (TLS when asked) and the fleet's ACL plugin, nothing else."""
    listener: dict[str, object] = {"type": "tcp", "bind": f"{host}:{port}"}
    if tls is not None:
        listener |= {"ssl": True, "certfile": str(tls.cert_file), "keyfile": str(tls.key_file)}
        if tls.ca_file is not None:
            listener["cafile"] = str(tls.ca_file)
    return {
        "listeners": {"default": listener},
        "session_expiry_interval": SESSION_EXPIRY_S,
        "plugins": {f"{__name__}.FleetAclPlugin": {"gate": gate}},
    }


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *, authenticator: Authenticator,
                 tls: ListenerTls | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.gate = _Gate(authenticator)
        self.accounts = EmbeddedAccounts(self)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._broker: _Broker | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def refused_publishes(self) -> int:
        return self.gate.refused_publishes

    def start(self) -> "EmbeddedBroker":
        if self._thread is not None:
            return self
        if self.tls is not None:
            self.tls.check()  # a bad file is a configuration error, not a port to free
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

    def disconnect_device(self, device_id: str) -> bool:
        """End a device's live session and delete its queued commands (after revocation); True if it had one.
        Its credentials must already be refused by the authenticator, or it simply connects again."""
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or loop.is_closed():
            return False
        ids = {cid for cid, who in self.gate.principals.items() if who.device_id == device_id}
        ids.add(f"slmops-agent-{topics.check_device_id(device_id)}")

        async def drop() -> bool:
            return any([await broker.drop_client(cid) for cid in sorted(ids)])

        dropped = asyncio.run_coroutine_threadsafe(drop(), loop).result(DROP_TIMEOUT_S)
        log.info("device %s removed from the embedded broker%s", device_id, " (its session dropped)" if dropped else "")
        return dropped

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
            broker = _Broker(broker_config(self.host, self.port, self.gate, self.tls), self.gate)
            await broker.start()
        except Exception as exc:  # amqtt wraps bind errors in BrokerError; anything else is just as fatal here
            self._error = exc
            self._ready.set()
            return
        self._broker = broker
        self._ready.set()
        await self._stop.wait()
        self._broker = None
        await broker.shutdown()


class EmbeddedAccounts:
    """`fleet.acl.BrokerAccounts` for the embedded broker: the authenticator already knows every device (the
    database), so `add_device` only tells an authenticator that keeps its own list; `remove_device` does the same
    and then drops the device's live session."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker

    def add_device(self, device_id: str, password: str) -> None:
        add = getattr(self.broker.gate.authenticator, "add_device", None)
        if add is not None:
            add(device_id, password)

    def remove_device(self, device_id: str) -> None:
        remove = getattr(self.broker.gate.authenticator, "remove_device", None)
        if remove is not None:
            remove(device_id)
        self.broker.disconnect_device(device_id)


class StaticAccounts:
    """An in-memory `Authenticator` and `BrokerAccounts`: the fleet's password and a password per device, held as
    sha256 digests. For tests, the demo and a fleet without device enrolment; the fleet's database replaces it.
    A fast hash is enough here because every password is a 256-bit random token (`secrets.token_urlsafe(32)`):
    there is no dictionary to guess from, only the digest to keep the token itself out of memory dumps."""

    def __init__(self, fleet_password: str, devices: Mapping[str, str] | None = None, *,
                 fleet_username: str = "fleet") -> None:
        self.fleet_username = fleet_username
        self._fleet = _digest(fleet_password)
        self._devices: dict[str, bytes] = {}
        for device_id, password in (devices or {}).items():
            self.add_device(device_id, password)

    def add_device(self, device_id: str, password: str) -> None:
        self._devices[topics.check_device_id(device_id)] = _digest(password)

    def remove_device(self, device_id: str) -> None:
        self._devices.pop(device_id, None)

    def authenticate(self, username: str | None, password: str | None) -> Principal | None:
        if username is None or password is None:
            return None
        given = _digest(password)
        if username == self.fleet_username:
            return Principal("fleet") if hmac.compare_digest(given, self._fleet) else None
        want = self._devices.get(username)
        if want is None or not hmac.compare_digest(given, want):
            return None
        return Principal("device", username)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
