"""Telemetry sampling: counters and gauges about the device and its model, never prompt or answer text.

Workflow: `sample(...)` reads the scheduler's Prometheus counters (the ones `/metrics` shows) and the process's CPU and memory (psutil) into a
`protocol.messages.Telemetry`; `Sampler` calls it every `interval_s` on a daemon thread and hands each sample to
`publish`, which in the agent is `Forwarder.put`.

`Forwarder` makes telemetry survive broker outages and restarts: `put` appends the encoded sample to the on-disk
`agent.outbox.Outbox`; its own thread sends what waits there, oldest first, at QoS 1 while the link is up, at most
`rate_per_s` a second and `window` unacknowledged at a time, and removes a sample from the outbox only once the
broker acknowledged it (paho's `MQTTMessageInfo.is_published()`). While the broker is away paho keeps the
unacknowledged ones and sends them again on reconnect; the rest wait in the outbox and drain after it. A sample
still unacknowledged `ack_timeout_s` of connected time after sending is sent again. Any re-send is harmless: the
fleet stores each `message_id` once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Protocol

import psutil

from protocol.messages import ActiveModel, Telemetry, encode

from .outbox import Outbox
from .scheduler import Scheduler

log = logging.getLogger("slmops.agent.telemetry")


def sample(device_id: str, scheduler: Scheduler, seq: int, *, process: psutil.Process | None = None) -> Telemetry:
    proc = process or psutil.Process()
    mem = proc.memory_info()
    current, metrics = scheduler.current, scheduler.metrics
    return Telemetry(
        device_id=device_id,
        active=ActiveModel(name=current.ref.name, version=current.ref.version) if current else None,
        uptime_s=round(scheduler.uptime_s, 3),
        requests_total=metrics.generation_requests(),
        tokens_generated_total=metrics.tokens_generated(),
        tokens_per_s=round(metrics.decode_rate(), 3),
        cpu_percent=proc.cpu_percent(interval=None),
        memory_rss_mb=round(mem.rss / 2**20, 2),
        memory_percent=round(proc.memory_percent(), 3),
        seq=seq,
        sent_at=datetime.now(timezone.utc),
    )


class Sampler:
    def __init__(self, interval_s: float, make: Callable[[], Telemetry], publish: Callable[[Telemetry], None]) -> None:
        self.interval_s, self.make, self.publish = interval_s, make, publish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slmops-telemetry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish(self.make())
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry sample failed")


class Ack(Protocol):
    """What a QoS 1 publish returns: paho's `MQTTMessageInfo` (raises ValueError/RuntimeError if never queued)."""

    def is_published(self) -> bool: ...


class Forwarder:
    """Outbox in, QoS 1 publishes out: in order, rate-bounded, removed only once acknowledged."""

    def __init__(
        self,
        outbox: Outbox,
        send: Callable[[bytes], Ack],
        connected: Callable[[], bool],
        *,
        rate_per_s: float = 20.0,  # messages a second at most while draining a backlog
        window: int = 10,  # messages sent and not yet acknowledged at most
        ack_timeout_s: float = 10.0,  # seconds of connected time before an unacknowledged message is sent again
        tick_s: float = 0.05,  # seconds between two looks at acknowledgements while something is in flight
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox, self.send, self.connected = outbox, send, connected
        self.rate_per_s, self.window, self.ack_timeout_s, self.tick_s = rate_per_s, window, ack_timeout_s, tick_s
        self._clock = clock
        self._inflight: dict[int, tuple[Ack, float]] = {}  # outbox key -> (ack, connected seconds it waited since)
        self._tokens, self._last = float(window), clock()
        self.sent = 0  # publishes acknowledged by the broker
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slmops-outbox", daemon=True)

    def put(self, message: Telemetry) -> None:
        self.outbox.put(encode(message))
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sending; what is not acknowledged yet stays in the outbox for the next start."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def pump(self) -> int:
        """Collect acknowledgements, then send what the window and the rate allow; returns how many were sent."""
        now = self._clock()
        up = self.connected()
        for key, (ack, since) in list(self._inflight.items()):
            try:
                done = ack.is_published()
            except (ValueError, RuntimeError):  # paho never queued it (queue full, no connection): send it again
                del self._inflight[key]
                continue
            if done:
                del self._inflight[key]
                self.outbox.remove(key)
                self.sent += 1
            elif not up:
                self._inflight[key] = (ack, now)  # the ack timer runs only while connected
            elif now - since > self.ack_timeout_s:
                log.info("outbox: message %d not acknowledged after %.0f s; sending it again", key, self.ack_timeout_s)
                del self._inflight[key]
        self._tokens = min(float(self.window), self._tokens + (now - self._last) * self.rate_per_s)
        self._last = now
        if not up:
            return 0
        room = min(self.window - len(self._inflight), int(self._tokens))
        if room <= 0:
            return 0
        sent = 0
        for key, payload in self.outbox.pending(limit=room + len(self._inflight)):
            if key in self._inflight:
                continue
            if sent >= room:
                break
            self._inflight[key] = (self.send(payload), now)
            sent += 1
        self._tokens -= sent
        return sent

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.pump()
            except Exception:  # telemetry must never take the agent down
                log.exception("sending telemetry from the outbox failed")
            busy = (bool(self._inflight) or len(self.outbox) > 0) and self.connected()
            self._wake.wait(self.tick_s if busy else 0.5)  # idle or offline: a put or 0.5 s wakes it
            self._wake.clear()
