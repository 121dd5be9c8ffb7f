"""`Simulator`: N `SimDevice`s, one paho client each, all on one `Loop`, connected at a paced rate.

Workflow: `Simulator(broker_url, accounts, trust_root=..., knobs=...)` makes every client with
`mqttlink.make_client` (client id `slmops-agent-<id>`, persistent session, MQTT 3.1.1 or 5 by the URL, the
account's credentials, TLS files) and the offline presence as its last will. `run(stop)` connects them, at most
`max_connecting` waiting for a CONNACK at a time, each bound to one of `sources` 127.0.x.y addresses when the broker
is on loopback (so no single source address runs out of ports or piles up its connects), and drives the loop until
`stop` is set or `duration_s` passed; then each device says offline (retained, as a clean agent exit) and
disconnects. A lost connection is tried again after 1 s, then twice as long each time, at most 10 s (as the agent's
paho does). `tick(every_s, fn)` calls `fn(stats)` on the loop's thread (progress display, status file).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqttlink import ClientOptions, make_client
from protocol import topics

from .accounts import Account
from .behaviour import Knobs
from .device import SimDevice, Stats
from .gate import Trust
from .loop import Loop

log = logging.getLogger("slmops.devsim")
SESSION_EXPIRY_S = 7 * 24 * 3600  # as agent/link.py
MAX_QUEUED = 1000  # as agent/link.py
RECONNECT_MAX_S = 10.0
CONNECT_TIMEOUT_S = 20.0  # seconds a connect may wait for its CONNACK before its slot is given to the next one
PER_SOURCE = 1000  # devices per 127.0.x.y source address when spreading


def client_id(device_id: str) -> str:
    return f"slmops-agent-{device_id}"  # agent/link.py's: the only one the broker lets a device's account use


def source_addresses(broker_host: str, devices: int, sources: int | None = None) -> list[str]:
    """Loopback source addresses to spread `devices` over (none when the broker is not on loopback)."""
    try:
        loopback = broker_host == "localhost" or ipaddress.ip_address(broker_host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or broker_host == "::1":
        return [""]
    n = sources if sources is not None else max(1, math.ceil(devices / PER_SOURCE))
    return [f"127.0.{1 + k // 250}.{1 + k % 250}" for k in range(min(n, 250 * 250))]


class _Node:
    """One device and its client: the `Port` the device publishes through."""

    __slots__ = ("device", "client", "source", "loop", "backoff", "waiting", "up", "attempt")

    def __init__(self, client: mqtt.Client, source: str, loop: Loop) -> None:
        self.client, self.source, self.loop = client, source, loop
        self.device: SimDevice | None = None
        self.backoff, self.waiting, self.up, self.attempt = 1.0, False, False, 0

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)  # queued by paho while the broker is away

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.loop.later(delay_s, fn)


class Simulator:
    def __init__(
        self,
        broker_url: str,
        accounts: Sequence[Account],
        *,
        trust_root: bytes,
        knobs: Knobs | None = None,
        origins: Sequence[str] = (),
        active: tuple[str, int] | None = None,
        ca_file: Path | None = None,
        sources: int | None = None,
        max_connecting: int = 256,
        keepalive_s: int = 60,
    ) -> None:
        self.knobs = knobs or Knobs()
        self.trust = Trust(trust_root, origins)
        self.loop = Loop()
        self.stats = Stats(devices=len(accounts))
        self.max_connecting, self.keepalive_s = max_connecting, keepalive_s
        self._waiting = 0
        self._queue: deque[_Node] = deque()
        self._ticks: list[tuple[float, Callable[[Stats], None]]] = []
        self.nodes: list[_Node] = []
        self.all_connected_s: float | None = None  # seconds from run() until every device was connected once
        self._stopping = False
        first = ClientOptions(broker_url, "slmops-devsim")
        self.address = first.address
        addrs = source_addresses(self.address.host, len(accounts), sources)
        for i, acct in enumerate(accounts):
            opts = ClientOptions(broker_url, client_id(acct.device_id), username=acct.username,
                                 password=acct.password, ca_file=ca_file, keepalive_s=keepalive_s,
                                 reconnect_max_s=RECONNECT_MAX_S, session_expiry_s=SESSION_EXPIRY_S,
                                 max_queued=MAX_QUEUED)
            client = make_client(opts)
            node = _Node(client, addrs[i % len(addrs)], self.loop)
            node.device = SimDevice(acct.device_id, trust=self.trust, knobs=self.knobs, port=node, stats=self.stats,
                                    active=active)
            client.user_data_set(node)
            client.will_set(str(topics.presence(acct.device_id)), node.device.will(), qos=1, retain=True)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_message = self._on_message
            client.on_publish = self._on_publish
            self.loop.attach(client)
            self.nodes.append(node)
        self._cmd_topics = {id(n): str(topics.cmd(n.device.device_id)) for n in self.nodes}  # type: ignore[union-attr]

    # -- running ------------------------------------------------------------------------------------------------
    def tick(self, every_s: float, fn: Callable[[Stats], None]) -> None:
        def again() -> None:
            fn(self.stats)
            if not self._stopping:
                self.loop.later(every_s, again)
        self.loop.later(every_s, again)

    def run(self, stop: threading.Event | None = None, duration_s: float | None = None,
            linger_s: float = 10.0) -> Stats:
        stop = stop or threading.Event()
        start = time.monotonic()
        self._queue.extend(self.nodes)
        try:
            while not stop.is_set() and (duration_s is None or time.monotonic() - start < duration_s):
                self._connect_more()
                self.loop.run_once(0.05)
                if self.all_connected_s is None and self.stats.connected == len(self.nodes):
                    self.all_connected_s = time.monotonic() - start
            self._say_offline(linger_s)
        finally:
            self.loop.close()
        return self.stats

    def _connect_more(self) -> None:
        while self._queue and self._waiting < self.max_connecting:
            self._connect(self._queue.popleft())

    def _connect(self, node: _Node) -> None:
        if self._stopping:
            return
        node.attempt += 1
        attempt = node.attempt
        addr = self.address
        try:
            if addr.protocol == 5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                node.client.connect(addr.host, addr.port, self.keepalive_s,
                                    bind_address=node.source, clean_start=False, properties=props)
            else:
                node.client.connect(addr.host, addr.port, self.keepalive_s, bind_address=node.source)
        except OSError as exc:
            log.debug("a connect failed: %s", exc)
            self._retry(node)
            return
        node.waiting = True
        self._waiting += 1
        self.loop.later(CONNECT_TIMEOUT_S, lambda: self._connect_timeout(node, attempt))

    def _connect_timeout(self, node: _Node, attempt: int) -> None:
        if node.waiting and node.attempt == attempt:
            self._release(node)

    def _release(self, node: _Node) -> None:
        if node.waiting:
            node.waiting = False
            self._waiting -= 1

    def _retry(self, node: _Node) -> None:
        if self._stopping:
            return
        delay, node.backoff = node.backoff, min(node.backoff * 2, RECONNECT_MAX_S)
        self.loop.later(delay, lambda: self._queue.append(node))

    # -- paho callbacks (the loop's thread) ---------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, node: _Node, _flags, reason, _props=None) -> None:
        self._release(node)
        if getattr(reason, "is_failure", reason != 0):
            self.stats.refused += 1
            return  # the broker closes the connection; _on_disconnect tries again later
        node.up, node.backoff = True, 1.0
        self.stats.connected += 1
        self.stats.connects += 1
        client.subscribe(self._cmd_topics[id(node)], qos=1)
        node.device.connected()  # type: ignore[union-attr]

    def _on_disconnect(self, client: mqtt.Client, node: _Node, _flags, reason, _props=None) -> None:
        self._release(node)
        if node.up:
            node.up = False
            self.stats.connected -= 1
            self.stats.disconnects += 0 if self._stopping else 1
        self._retry(node)

    def _on_message(self, client: mqtt.Client, node: _Node, msg: mqtt.MQTTMessage) -> None:
        node.device.command(msg.payload)  # type: ignore[union-attr]

    def _on_publish(self, client: mqtt.Client, node: _Node, mid, reason, _props=None) -> None:
        self.stats.acked += 1

    # -- stopping -----------------------------------------------------------------------------------------------
    def _say_offline(self, linger_s: float) -> None:
        """Publish each connected device's offline presence, disconnect, and drive the loop until sent."""
        self._stopping = True
        for node in self.nodes:
            if node.up:
                node.publish(str(topics.presence(node.device.device_id)), node.device.presence(False), 1, True)  # type: ignore[union-attr]
                node.client.disconnect()
        deadline = time.monotonic() + linger_s
        while self.loop.fds and time.monotonic() < deadline:
            self.loop.run_once(0.05)
