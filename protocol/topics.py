"""MQTT topics as frozen value objects, namespaced and versioned.

Layout: `slmops/v1/devices/{device_id}/{channel}` with channels
    cmd        fleet -> device   commands (deploy), QoS 1, not retained
    status     device -> fleet   update status reports, QoS 1
    telemetry  device -> fleet   periodic health samples, QoS 0
    presence   device -> fleet   online/offline, retained; the offline message is the MQTT last will

The fleet subscribes with `Topic.wildcard(channel)` (`slmops/v1/devices/+/status`); replicas share the load with an
MQTT 5 shared subscription (`$share/<group>/...`, see `shared()`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .errors import TopicError, clip

PREFIX = "slmops/v1"
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always with fullmatch: `$` lets "x\n" through
MAX_DEVICE_ID_CHARS = 128


class Channel(str, Enum):
    CMD = "cmd"
    STATUS = "status"
    TELEMETRY = "telemetry"
    PRESENCE = "presence"


MAX_TOPIC_CHARS = len(f"{PREFIX}/devices//") + MAX_DEVICE_ID_CHARS + max(len(c.value) for c in Channel)


def check_device_id(device_id: object) -> str:
    """A device id (one topic level): 1-128 chars of letters, digits, '.', '_', '-', starting with a letter or digit."""
    if not isinstance(device_id, str) or len(device_id) > MAX_DEVICE_ID_CHARS or not DEVICE_ID_RE.fullmatch(device_id):
        raise TopicError(
            f"device id {clip(device_id)} is not valid: use 1-128 chars of letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class Topic:
    """One concrete device topic."""

    device_id: str
    channel: Channel

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        object.__setattr__(self, "channel", Channel(self.channel))

    def __str__(self) -> str:
        return f"{PREFIX}/devices/{self.device_id}/{self.channel.value}"

    @classmethod
    def parse(cls, topic: str) -> "Topic":
        shown = clip(topic, 80)
        if len(topic) > MAX_TOPIC_CHARS:
            raise TopicError(f"topic {shown} is longer than {MAX_TOPIC_CHARS} chars")
        parts = topic.split("/")
        if len(parts) != 5 or "/".join(parts[:2]) != PREFIX or parts[2] != "devices":
            raise TopicError(f"topic {shown} is not of the form {PREFIX}/devices/<id>/<channel>")
        try:
            channel = Channel(parts[4])
        except ValueError as exc:
            raise TopicError(f"topic {shown} names unknown channel {clip(parts[4], 20)}") from exc
        return cls(parts[3], channel)

    @staticmethod
    def wildcard(channel: Channel) -> str:
        return f"{PREFIX}/devices/+/{Channel(channel).value}"

    def matches(self, pattern: str) -> bool:
        return topic_matches(pattern, str(self))


def shared(group: str, pattern: str) -> str:
    """An MQTT 5 shared subscription so several fleet replicas split one stream."""
    return f"$share/{group}/{pattern}"


def cmd(device_id: str) -> Topic:
    return Topic(device_id, Channel.CMD)


def status(device_id: str) -> Topic:
    return Topic(device_id, Channel.STATUS)


def telemetry(device_id: str) -> Topic:
    return Topic(device_id, Channel.TELEMETRY)


def presence(device_id: str) -> Topic:
    return Topic(device_id, Channel.PRESENCE)


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT wildcard match ('+' one level, '#' the rest)."""
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


@dataclass(frozen=True)
class BrokerAddress:
    """Where the MQTT broker is: `mqtt://host:port` (MQTT 3.1.1), `mqtt5://host:port` (MQTT 5), `mqtts://` for TLS."""

    host: str
    port: int
    protocol: int  # 4: MQTT 3.1.1, 5: MQTT 5
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        schemes = {"mqtt": (4, False), "mqtt5": (5, False), "mqtts": (4, True), "mqtt5s": (5, True)}
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in schemes:
            raise TopicError(f"broker URL {url!r} must start with one of {', '.join(s + '://' for s in schemes)}")
        hostport = rest.split("/", 1)[0]
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
        version, tls = schemes[scheme]
        try:
            port_n = int(port) if port else (8883 if tls else 1883)
        except ValueError as exc:
            raise TopicError(f"broker URL {url!r} has a bad port {port!r}") from exc
        if not host:
            raise TopicError(f"broker URL {url!r} names no host")
        return cls(host, port_n, version, tls)

    def __str__(self) -> str:
        scheme = {(4, False): "mqtt", (5, False): "mqtt5", (4, True): "mqtts", (5, True): "mqtt5s"}[(self.protocol, self.tls)]
        return f"{scheme}://{self.host}:{self.port}"
