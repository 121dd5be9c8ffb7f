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
the wrong channel is logged with the reason, dropped (counted in `rejected`) and acknowledged at once (it would only
be refused again). That is all paho's network thread does: a valid message goes to `fleet.ingest.IngestWriter` with
its ack, and its one writer thread stores messages in batches, one transaction per batch, skipping what is already
stored (same message_id: a QoS 1 redelivery, or a sample the device's outbox sent again), acknowledges them only after
the commit (the client runs with paho's manual acks, and on MQTT 5 tells the broker its Receive Maximum,
`ingest_receive_maximum`), and then sends a device that came online its unfinished deploy command again (see
`fleet.deployments.commands_to_resend`). A fleet that dies before a commit gets those messages again from the broker
when it (or its successor with the same client id) reconnects. While the writer's queue is full, paho's thread waits
(at most `ingest_put_timeout_s`); see fleet/ingest.py. Whatever else handling one message raises (a bug) is logged on
one line (topic and error, both cut short; never the payload) and that message is dropped and acknowledged: paho's
network thread must outlive any payload. After each batch `on_stored(kinds)` tells the app what it held.

Commands leave only through the outbox publisher (fleet/outbox.py), which calls `publish_raw` (QoS 1, not
retained) and hears of each PUBACK through `on_published`; `generation` grows on every connection, so the
publisher knows to send again what the broker never acknowledged.

`stop()` disconnects first (so nothing more arrives; paho's thread may still be waiting to queue one message, which
the running writer makes room for), then lets the writer write what is queued (`ingest_stop_timeout_s`). A deploy
command queued again during that drain waits in the outbox for the next start.

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
from sqlalchemy.orm import Session, sessionmaker

from mqttlink import ClientOptions, Watch, connect, make_client
from protocol import topics
from protocol.errors import MessageError, TopicError, clip, one_line
from protocol.messages import Presence, StatusReport, Telemetry, parse_message

from .ingest import Ack, IngestStats, IngestWriter, no_ack
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
        self.on_published: Callable[[int], None] = lambda mid: None  # paho's thread: PUBACK for `mid`
        self.on_stored: Callable[[set[str]], None] = lambda kinds: None  # after a batch committed: the kinds it held
        self.generation = 0  # grows each time the subscriptions are in place on a new connection
        self.writer = IngestWriter(settings, sessions, after_batch=lambda kinds: self.on_stored(kinds), clock=clock)
        self.rejected = 0  # inbound messages refused before the queue (bad topic, payload, channel or device)
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
            manual_ack=True,
            receive_maximum=min(settings.ingest_receive_maximum, settings.ingest_queue_max),
        )
        addr = self.opts.address
        self.host, self.port, self.protocol = addr.host, addr.port, addr.protocol
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._watch = Watch(log, self.opts)
        client = make_client(self.opts)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_publish = self._on_publish
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ingest writer, then connect in the background; paho retries until the broker answers."""
        self.writer.start()
        connect(self.client, self.opts)

    def stop(self) -> None:
        """Disconnect, then write what is queued (at most `ingest_stop_timeout_s`)."""
        self.client.disconnect()
        self.client.loop_stop()
        self._subscribed.clear()
        self.writer.stop()

    def ingest_stats(self) -> IngestStats:
        return self.writer.stats()

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

    def ingest(self, topic: str, payload: bytes, ack: Ack = no_ack) -> bool:
        """Parse and check one inbound message and queue it for the writer (waiting while the queue is full), to be
        acknowledged with `ack` after its commit; anything wrong with it is logged and dropped, and the caller
        acknowledges it. True if it was queued."""
        try:
            where = topics.Topic.parse(topic)
            if where.channel is topics.Channel.PRESENCE and not payload:
                ack()
                return False  # a retained presence message being cleared
            msg = parse_message(payload)
            expected = SUBSCRIBED.get(where.channel)
            if expected is None or not isinstance(msg, expected):
                raise MessageError(f"a {msg.kind} message does not belong on the {where.channel.value} channel")
            if msg.device_id != where.device_id:
                raise MessageError(f"message names device {msg.device_id!r} but came on {where.device_id!r}'s topic")
        except (TopicError, MessageError) as exc:
            self.rejected += 1
            log.warning("dropped message on %s: %s", clip(topic, 120), one_line(exc))
            ack()
            return False
        return self.writer.submit(msg, ack)  # type: ignore[arg-type]  (the channel check above narrowed it)

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

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        mid, qos = message.mid, message.qos

        def ack() -> None:  # called by the writer thread after the commit (paho's ack only queues the PUBACK)
            if qos:
                client.ack(mid, qos)

        try:
            topic = message.topic  # paho decodes the topic here: it raises on bytes that are not UTF-8
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8")
            ack()
            return
        try:
            self.ingest(topic, message.payload, ack)
        except Exception as exc:  # the network thread must survive whatever one message does
            log.error("dropped message on %s after an unexpected error: %s", clip(topic, 120), one_line(exc))
            log.debug("the error's traceback", exc_info=True)
            ack()
