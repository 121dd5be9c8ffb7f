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

from .errors import TopicError

PREFIX = "slmops/v1"
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Channel(str, Enum):
    CMD = "cmd"
    STATUS = "status"
    TELEMETRY = "telemetry"
    PRESENCE = "presence"


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise TopicError(
            f"device id {device_id!r} is not valid: use 1-128 chars of letters, digits, '.', '_', '-', "
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
        parts = topic.split("/")
        if len(parts) != 5 or "/".join(parts[:2]) != PREFIX or parts[2] != "devices":
            raise TopicError(f"topic {topic!r} is not of the form {PREFIX}/devices/<id>/<channel>")
        try:
            channel = Channel(parts[4])
        except ValueError as exc:
            raise TopicError(f"topic {topic!r} names unknown channel {parts[4]!r}") from exc
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
