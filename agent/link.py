"""The agent's MQTT link: a persistent session, presence with a last will, commands in, reports out.

Workflow: `Link.start()` connects in the background (the local API never waits for the fleet) with a stable client
id (`slmops-agent-<device id>`, the only one the broker lets this device's account use), its broker credentials
and TLS files, and a persistent session (MQTT 3.1.1 clean_session=False, or MQTT 5 clean_start=False with a session
expiry; the client comes from `mqttlink.make_client`), so QoS 1 commands sent while the device was away arrive when
it returns. A broker that refuses the credentials, or refuses the command subscription, is logged once as an error
(`mqttlink.Watch`) and `connected` stays clear. The broker holds an "offline" presence as the last will; on connect the agent publishes a retained
"online" presence and subscribes to its command topic. Payloads become typed messages at this edge; malformed or
misaddressed ones are logged and dropped. paho reconnects by itself, waiting 1 s, then twice as long after each
failed try, never more than `reconnect_max_s`, and keeps unacknowledged QoS 1 publishes to send again meanwhile.
`publish` returns paho's `MQTTMessageInfo`, so a caller (the telemetry outbox) can tell when the broker acknowledged.

Hostile input: `parse_message` refuses a payload over `MAX_MESSAGE_BYTES` before parsing it, and every failure while
handling one message (a bad payload, JSON Python cannot build, a bug in `on_deploy`) is logged on one line with the
topic and the error cut short, never the payload, and the message is dropped. Nothing escapes `_on_message`: an
exception there would stop paho's network thread, and with it every later command.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt

from mqttlink import ClientOptions, Watch, connect, make_client
from protocol import topics
from protocol.errors import MessageError, clip, one_line
from protocol.messages import ActiveModel, CancelCommand, DeployCommand, Presence, _Message, encode, parse_message

from .store import SeqCounter

log = logging.getLogger("slmops.agent.link")
SESSION_EXPIRY_S = 7 * 24 * 3600  # seconds the broker keeps an MQTT 5 session (and queued commands) while away
MAX_QUEUED = 1000  # messages paho keeps while the broker is away


def client_id(device_id: str) -> str:
    """The MQTT client id of a device's agent; the broker admits a device's account under this id only."""
    return f"slmops-agent-{device_id}"


def now() -> datetime:
    return datetime.now(timezone.utc)


class Link:
    def __init__(
        self,
        device_id: str,
        broker_url: str,
        *,
        seq: SeqCounter,
        on_deploy: Callable[[DeployCommand | CancelCommand], None],
        active: Callable[[], ActiveModel | None],
        agent_version: str = "",
        reconnect_max_s: float = 10.0,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.opts = ClientOptions(
            broker_url=broker_url,
            client_id=client_id(device_id),
            username=username,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            reconnect_max_s=reconnect_max_s,
            session_expiry_s=SESSION_EXPIRY_S,
            max_queued=MAX_QUEUED,
        )
        self.device_id, self.addr = device_id, self.opts.address
        self.seq, self.on_deploy, self.active, self.agent_version = seq, on_deploy, active, agent_version
        self.connected = threading.Event()  # set once the broker acknowledged the command subscription
        self._sub_mid: int | None = None
        self._watch = Watch(log, self.opts)
        self.client = make_client(self.opts)
        self.client.will_set(str(topics.presence(device_id)), self._presence(False), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin connecting in the background; the agent serves locally whether or not the broker is reachable."""
        connect(self.client, self.opts)  # paho retries the first connection and every later one by itself

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected.wait(timeout_s)

    def stop(self) -> None:
        """Say offline (retained) and disconnect cleanly."""
        if self.connected.is_set():
            info = self.client.publish(str(topics.presence(self.device_id)), self._presence(False), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=5)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    # -- out ------------------------------------------------------------------------------------------------
    def publish(self, topic: topics.Topic, message: _Message, *, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.publish_bytes(topic, encode(message), qos=qos, retain=retain)

    def publish_bytes(self, topic: topics.Topic, payload: bytes, *, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish an already encoded message; paho queues it while the broker is away."""
        return self.client.publish(str(topic), payload, qos=qos, retain=retain)

    def announce(self) -> None:
        """Publish the retained online presence (also after the active model changes)."""
        self.client.publish(str(topics.presence(self.device_id)), self._presence(True), qos=1, retain=True)

    def _presence(self, online: bool) -> bytes:
        return encode(
            Presence(
                device_id=self.device_id,
                online=online,
                agent_version=self.agent_version,
                active=self.active(),
                seq=self.seq.next(),
                sent_at=now(),
            )
        )

    # -- paho callbacks (network thread) --------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if not self._watch.connack_ok(reason_code):
            return
        _, self._sub_mid = client.subscribe(str(topics.cmd(self.device_id)), qos=1)
        self.announce()
        log.info("connected to %s as %s", self.addr, self.device_id)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        if mid == self._sub_mid and self._watch.suback_ok([str(topics.cmd(self.device_id))], reason_codes):
            self.connected.set()  # commands can reach us from here on

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if reason_code != 0:
            log.warning("%s the broker at %s (%s); local inference goes on, retrying",
                        "lost" if was else "cannot reach", self.addr, reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        """Hand a deploy command for this device to `on_deploy`; log and drop anything else, whatever it raises."""
        try:
            topic = msg.topic  # paho decodes the topic here: it raises on bytes that are not UTF-8
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8")
            return
        try:
            message = parse_message(msg.payload)
            if not isinstance(message, DeployCommand | CancelCommand) or message.device_id != self.device_id:
                log.warning("dropped a %s message on %s not meant for this device", message.kind, clip(topic, 120))
                return
            self.on_deploy(message)
        except MessageError as exc:
            log.warning("dropped a malformed message on %s: %s", clip(topic, 120), one_line(exc))
        except Exception as exc:  # the network thread must outlive any payload and any bug in the handler
            log.error("dropped a message on %s after an unexpected error: %s", clip(topic, 120), one_line(exc))
            log.debug("the error's traceback", exc_info=True)
