"""Who may do what on the broker: principals and the topic rules every broker enforces the same way.

Workflow: a broker (the embedded one in `fleet/broker.py`, or mosquitto through the configuration in `deploy/`)
asks an `Authenticator` who a connecting client is (`authenticate(username, password) -> Principal | None`), then
asks `may_publish` / `may_subscribe` for every PUBLISH and SUBSCRIBE that client sends. The rules are pure
functions of the principal and the topic:

- the fleet (role "fleet") publishes commands to any device's `cmd` topic and subscribes to the status,
  telemetry and presence wildcards (also as MQTT 5 shared subscriptions);
- a device (role "device") publishes only its own `status`, `telemetry` and `presence` topics and subscribes only
  to its own `cmd` topic;
- nobody else does anything: an unknown user, a wrong password or a revoked device gets no principal at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from protocol import topics
from protocol.errors import TopicError

FLEET_SUBSCRIBES = tuple(topics.Topic.wildcard(ch) for ch in (topics.Channel.STATUS, topics.Channel.TELEMETRY, topics.Channel.PRESENCE))
DEVICE_PUBLISHES = (topics.Channel.STATUS, topics.Channel.TELEMETRY, topics.Channel.PRESENCE)


@dataclass(frozen=True)
class Principal:
    """An authenticated broker client: the fleet service, or one device."""

    role: Literal["fleet", "device"]
    device_id: str | None = None  # set for devices only

    def __post_init__(self) -> None:
        if (self.role == "device") != (self.device_id is not None):
            raise ValueError("a device principal names its device id; the fleet's names none")
        if self.device_id is not None:
            topics.check_device_id(self.device_id)

    def may_use_client_id(self, client_id: str | None) -> bool:
        """A device connects only as `slmops-agent-<its id>`, the fleet only as `slmops-fleet` or `slmops-fleet-...`
        (one per replica), so no client can take over another's session."""
        if not client_id:
            return False
        if self.role == "fleet":
            return client_id == "slmops-fleet" or client_id.startswith("slmops-fleet-")
        return client_id == f"slmops-agent-{self.device_id}"


class Authenticator(Protocol):
    def authenticate(self, username: str | None, password: str | None) -> Principal | None:
        """The principal these credentials belong to, or None (unknown, wrong secret, revoked)."""
        ...


def may_publish(who: Principal, topic: str) -> bool:
    try:
        t = topics.Topic.parse(topic)
    except TopicError:
        return False
    if who.role == "fleet":
        return t.channel is topics.Channel.CMD
    return t.device_id == who.device_id and t.channel in DEVICE_PUBLISHES


def may_subscribe(who: Principal, topic_filter: str) -> bool:
    if who.role == "fleet":
        plain = topic_filter
        if plain.startswith("$share/"):
            parts = plain.split("/", 2)
            plain = parts[2] if len(parts) == 3 and parts[1] else ""
        return plain in FLEET_SUBSCRIBES
    return topic_filter == str(topics.cmd(who.device_id))  # type: ignore[arg-type]


class BrokerAccounts(Protocol):
    """Keeps the broker's own account list in step with the fleet's devices (mosquitto's dynamic security); the
    embedded broker asks the database through an `Authenticator` and only needs `remove_device` to drop a live
    session of a revoked device."""

    def add_device(self, device_id: str, password: str) -> None: ...

    def remove_device(self, device_id: str) -> None: ...
