"""`ClientOptions`, `make_client`, `connect` and `Watch`: see the package docstring for the workflow."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.errors import ConfigError, TopicError, clip, one_line
from protocol.topics import BrokerAddress

from .buffered import BufferedClient

BAD_CREDENTIALS = 0x86  # CONNACK "Bad user name or password" (MQTT 3.1.1 code 4 as paho reports it)
NOT_AUTHORIZED = 0x87  # CONNACK "Not authorized" (MQTT 3.1.1 code 5)
MAX_RECEIVE_MAXIMUM = 65_535  # the largest Receive Maximum MQTT 5 can say (a two-byte integer)


@dataclass(frozen=True)
class ClientOptions:
    """How one client reaches the broker. TLS is on when the URL says `mqtts://` or `mqtt5s://`."""

    broker_url: str  # mqtt://, mqtt5://, mqtts://, mqtt5s:// host:port (protocol.topics.BrokerAddress)
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None  # PEM CA bundle the broker's certificate must chain to; None: the system store
    cert_file: Path | None = None  # PEM client certificate (mutual TLS); its key in key_file or in the same file
    key_file: Path | None = None
    keepalive_s: int = 30  # seconds between pings; the broker drops the client after 1.5x this without traffic
    reconnect_max_s: float = 10.0  # seconds: the longest wait between two tries to reach the broker
    session_expiry_s: int = 7 * 24 * 3600  # seconds an MQTT 5 broker keeps the session while the client is away
    max_queued: int = 0  # messages paho keeps while the broker is away; 0: no limit
    manual_ack: bool = False  # True: the caller acknowledges each QoS 1 message itself (`client.ack(mid, qos)`)
    receive_maximum: int = 0  # QoS 1/2 messages (MQTT 5 only) the broker may send before an ack; 0: not sent
    address: BrokerAddress = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "address", BrokerAddress.parse(self.broker_url))
        except TopicError as exc:
            raise ConfigError(f"broker URL: {exc}") from exc
        if not self.client_id:
            raise ConfigError("an MQTT client id is needed for a persistent session")
        if not self.reconnect_max_s > 0:
            raise ConfigError(f"reconnect_max_s must be a positive number of seconds, not {self.reconnect_max_s}")
        if not 0 <= self.receive_maximum <= MAX_RECEIVE_MAXIMUM:
            raise ConfigError(f"receive_maximum must be 0 (not sent) to {MAX_RECEIVE_MAXIMUM} messages, "
                              f"not {self.receive_maximum}")
        if self.keepalive_s < 5 or self.session_expiry_s < 0 or self.max_queued < 0:
            raise ConfigError("keepalive_s must be at least 5 s; session_expiry_s and max_queued 0 or more")
        if self.password is not None and not self.username:
            raise ConfigError("a broker password was given without a user name: set the broker username too")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("a client key was given without its certificate: set the broker cert file too")
        tls_files = [f for f in (self.ca_file, self.cert_file, self.key_file) if f is not None]
        if tls_files and not self.address.tls:
            raise ConfigError(
                f"CA or client certificate files were given but {self.address} does not use TLS: "
                "use an mqtts:// or mqtt5s:// broker URL"
            )
        for f in tls_files:
            if not Path(f).is_file():
                raise ConfigError(f"TLS file {clip(str(f), 200)} does not exist or is not a file")


def make_client(opts: ClientOptions) -> mqtt.Client:
    """A paho client for a persistent session with these options; the caller adds callbacks, then `connect`."""
    v5 = opts.address.protocol == 5
    client = BufferedClient(
        CallbackAPIVersion.VERSION2,
        client_id=opts.client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else False,
        manual_ack=opts.manual_ack,
    )
    if opts.username:
        client.username_pw_set(opts.username, opts.password)
    if opts.address.tls:
        try:
            client.tls_set(
                ca_certs=str(opts.ca_file) if opts.ca_file else None,
                certfile=str(opts.cert_file) if opts.cert_file else None,
                keyfile=str(opts.key_file) if opts.key_file else None,
            )  # paho's defaults: TLS client protocol, the certificate and host name checked
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"cannot load the broker TLS files: {one_line(exc)}") from exc
    client.reconnect_delay_set(min_delay=min(1, opts.reconnect_max_s), max_delay=opts.reconnect_max_s)  # type: ignore[arg-type]
    client.max_queued_messages_set(opts.max_queued)
    return client


def connect(client: mqtt.Client, opts: ClientOptions) -> None:
    """Begin connecting in the background; paho retries the first connection and every later one by itself."""
    if opts.address.protocol == 5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = opts.session_expiry_s
        if opts.receive_maximum:
            props.ReceiveMaximum = opts.receive_maximum
        client.connect_async(opts.address.host, opts.address.port, opts.keepalive_s, clean_start=False, properties=props)
    else:
        client.connect_async(opts.address.host, opts.address.port, opts.keepalive_s)
    client.loop_start()


class Watch:
    """Turns CONNACK and SUBACK refusals into one error line each, logged once until the next success."""

    def __init__(self, log: logging.Logger, opts: ClientOptions) -> None:
        self.log, self.opts = log, opts
        self._last_refusal: str | None = None
        self._last_suback: str | None = None

    def connack_ok(self, reason_code: Any) -> bool:
        """True when the broker accepted the connection; else log why (once per distinct reason) and say False."""
        if not getattr(reason_code, "is_failure", reason_code != 0):
            self._last_refusal = None
            return True
        reason = str(reason_code)
        if reason != self._last_refusal:
            self._last_refusal = reason
            self.log.error("%s", self._refusal_line(reason_code))
        return False

    def _refusal_line(self, reason_code: Any) -> str:
        where, who = self.opts.address, clip(self.opts.client_id, 80)
        value = getattr(reason_code, "value", reason_code)
        if value in (BAD_CREDENTIALS, 4):
            user = clip(self.opts.username, 80) if self.opts.username else "no user name (anonymous)"
            return (f"the broker at {where} refused the credentials of {who} ({user}): bad user name or password; "
                    "set the right broker username and password (or enrol the device again); still retrying")
        if value in (NOT_AUTHORIZED, 5):
            return (f"the broker at {where} refused {who}: not authorised (a revoked account, or a client id this "
                    "account may not use); still retrying")
        return f"the broker at {where} refused {who}: {clip(str(reason_code), 80)}; still retrying"

    def suback_ok(self, filters: Sequence[str], reason_codes: Sequence[Any]) -> bool:
        """True when every filter was granted; a refused one (reason code >= 0x80) is an error, logged once."""
        refused = [
            clip(f, 120) for f, rc in zip(filters, reason_codes, strict=False)
            if getattr(rc, "value", rc) >= 0x80
        ]
        if len(reason_codes) < len(filters):
            refused += [clip(f, 120) for f in filters[len(reason_codes):]]
        if not refused:
            self._last_suback = None
            return True
        line = ", ".join(refused)
        if line != self._last_suback:
            self._last_suback = line
            self.log.error("the broker at %s refused %s the subscription to %s: this account may not read it",
                           self.opts.address, clip(self.opts.client_id, 80), line)
        return False
