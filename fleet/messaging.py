"""MQTT in and out of the fleet: deploy commands out; status, telemetry and presence in.

Workflow: `FleetMessaging(settings, sessions).start()` connects a paho-mqtt 2.x client made by `mqttlink` (its own
network thread, reconnects by itself, waiting 1 s and then twice as long after each failed try, at most
`reconnect_max_s`) with a stable client id, the fleet's broker credentials (`broker_username`/`broker_password`,
TLS files) and a persistent session, and on every (re)connect subscribes at
QoS 1 to the status, telemetry and presence wildcards of `protocol.topics`. `wait_connected()` returns once the
broker has acknowledged those subscriptions; a broker that refuses the fleet's credentials or any of them is
logged once as an error (`mqttlink.Watch`) and the fleet stays unsubscribed.

Each inbound payload becomes a typed message with `protocol.messages.parse_message` (which refuses anything over
`MAX_MESSAGE_BYTES` unparsed); a payload that does not parse, names another device than its topic, or arrives on
the wrong channel is logged with the reason and dropped. Whatever else handling one message raises (a bug, the
database) is logged on one line (topic and error, both cut short; never the payload) and that message is dropped:
paho's network thread must outlive any payload. Valid ones are written in one transaction each through
`fleet.crud`; a status report or telemetry sample already stored (same message_id: a QoS 1 redelivery, or a
sample the device's outbox sent again) is skipped. A device that comes online gets its unfinished deploy command
again (see `fleet.deployments.commands_to_resend`) and joins the newest rollout that targets it but does not list
it yet (`fleet.rollouts.adopt_device`); those commands go into the outbox in the same transaction. After each
commit `on_stored(kind)` tells the app (which pokes the outbox publisher and the rollout reconciler).

Commands leave only through the outbox publisher (fleet/outbox.py), which calls `publish_raw` (QoS 1, not
retained) and hears of each PUBACK through `on_published`; `generation` grows on every connection, so the
publisher knows to send again what the broker never acknowledged.

Broker URLs (`protocol.topics.BrokerAddress`): `mqtt://host:port` speaks MQTT 3.1.1 (amqtt, the embedded broker,
knows only that), `mqtt5://host:port` MQTT 5; `mqtts://` and `mqtt5s://` add TLS (`broker_ca_file`, or the system's
CA store; `broker_cert_file`/`broker_key_file` for a client certificate).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import paho.mqtt.client as mqtt
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mqttlink import ClientOptions, Watch, connect, make_client
from protocol import topics
from protocol.errors import MessageError, TopicError, clip, one_line
from protocol.messages import Presence, StatusReport, Telemetry, parse_message

from . import crud
from . import outbox
from .deployments import commands_to_resend
from .rollouts import adopt_device
from .settings import Settings

log = logging.getLogger(__name__)

KEEPALIVE_S = 30  # seconds between MQTT pings; the broker drops the fleet after 1.5x this without traffic
SESSION_EXPIRY_S = 24 * 3600  # seconds an MQTT 5 broker keeps the fleet's session while it is away
SUBSCRIBED = {
    topics.Channel.STATUS: StatusReport,
    topics.Channel.TELEMETRY: Telemetry,
    topics.Channel.PRESENCE: Presence,
}
FILTERS = [topics.Topic.wildcard(ch) for ch in SUBSCRIBED]  # what the fleet subscribes to, at QoS 1
MAX_INFLIGHT = 1000  # QoS 1 commands paho sends before their PUBACKs (its default of 20 throttles a rollout)


class FleetMessaging:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.settings, self.sessions, self.clock = settings, sessions, clock
        self.opts = ClientOptions(
            broker_url=settings.effective_broker_url,
            client_id=settings.client_id,
            username=settings.broker_username or None,
            password=settings.broker_password.get_secret_value() or None,
            ca_file=settings.broker_ca_file,
            cert_file=settings.broker_cert_file,
            key_file=settings.broker_key_file,
            keepalive_s=KEEPALIVE_S,
            reconnect_max_s=settings.reconnect_max_s,
            session_expiry_s=SESSION_EXPIRY_S,
        )
        addr = self.opts.address
        self.host, self.port, self.protocol = addr.host, addr.port, addr.protocol
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._watch = Watch(log, self.opts)
        self.generation = 0  # grows each time the subscriptions are in place on a new connection
        self.on_published: Callable[[int], None] = lambda mid: None  # paho's thread: PUBACK for `mid`
        self.on_stored: Callable[[str], None] = lambda kind: None  # after a message's transaction committed
        client = make_client(self.opts)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho retries until the broker answers."""
        connect(self.client, self.opts)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._subscribed.clear()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and subscribed; False if that did not happen within `timeout` seconds."""
        return self._subscribed.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._subscribed.is_set()

    # ---- outbound ---------------------------------------------------------------------------------------------

    def publish_raw(self, topic: str, payload: bytes) -> int | None:
        """Queue one command at QoS 1; its paho message id, or None if paho refused it (not connected)."""
        info = self.client.publish(topic, payload, qos=1, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("command to %s not queued: %s", clip(topic, 160), mqtt.error_string(info.rc))
            return None
        return info.mid

    # ---- inbound ----------------------------------------------------------------------------------------------

    def ingest(self, topic: str, payload: bytes) -> None:
        """Parse, check and store one inbound message; anything wrong with it is logged and dropped."""
        try:
            where = topics.Topic.parse(topic)
            if where.channel is topics.Channel.PRESENCE and not payload:
                return  # a retained presence message being cleared
            msg = parse_message(payload)
            expected = SUBSCRIBED.get(where.channel)
            if expected is None or not isinstance(msg, expected):
                raise MessageError(f"a {msg.kind} message does not belong on the {where.channel.value} channel")
            if msg.device_id != where.device_id:
                raise MessageError(f"message names device {msg.device_id!r} but came on {where.device_id!r}'s topic")
        except (TopicError, MessageError) as exc:
            log.warning("dropped message on %s: %s", clip(topic, 120), one_line(exc))
            return
        try:
            self._store(msg)
        except IntegrityError:
            log.info("dropped duplicate %s %s from %s", msg.kind, msg.message_id, msg.device_id)
        except SQLAlchemyError:
            log.exception("could not store %s %s from %s", msg.kind, msg.message_id, msg.device_id)

    def _store(self, msg: StatusReport | Telemetry | Presence) -> None:
        now = self.clock()
        with self.sessions() as s, s.begin():
            if isinstance(msg, StatusReport):
                if crud.record_status(s, msg=msg, now=now) is None:
                    log.info("dropped duplicate status %s from %s", msg.message_id, msg.device_id)
            elif isinstance(msg, Telemetry):
                if not crud.record_telemetry(s, msg=msg, now=now):
                    log.debug("dropped duplicate telemetry %s from %s", msg.message_id, msg.device_id)
            else:
                crud.record_presence(s, msg=msg, now=now)
                if msg.online:
                    for command in commands_to_resend(s, settings=self.settings, device_id=msg.device_id, now=now):
                        log.info("device %s is back; sending deployment %s again", command.device_id,
                                 command.deployment_id)
                        outbox.enqueue(s, command, now=now)
                    joined = adopt_device(s, device_id=msg.device_id, settings=self.settings, now=now)
                    if joined is not None:
                        log.info("device %s joins rollout %s", msg.device_id, joined)
        self.on_stored(msg.kind)

    # ---- paho callbacks (network thread) ---------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if not self._watch.connack_ok(reason):
            return
        log.info("connected to MQTT broker %s:%s (session present: %s)", self.host, self.port, flags.session_present)
        _, self._sub_mid = client.subscribe([(f, 1) for f in FILTERS])

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        if mid != self._sub_mid:
            return
        if self._watch.suback_ok(FILTERS, reasons):
            self.generation += 1
            self._subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._subscribed.clear()
        if reason.is_failure:
            log.warning("lost the MQTT broker %s:%s (%s); reconnecting", self.host, self.port, reason)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        self.on_published(mid)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic  # paho decodes the topic here: it raises on bytes that are not UTF-8
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8")
            return
        try:
            self.ingest(topic, message.payload)
        except Exception as exc:  # the network thread must survive whatever one message does
            log.error("dropped message on %s after an unexpected error: %s", clip(topic, 120), one_line(exc))
            log.debug("the error's traceback", exc_info=True)
