"""Telemetry sampling: counters and gauges about the device and its model, never prompt or answer text.

Workflow: `sample(...)` reads the scheduler's Prometheus counters (the ones `/metrics` shows) and the process's CPU and memory (psutil) into a
`protocol.messages.Telemetry`; `Sampler` calls it every `interval_s` on a daemon thread and hands each sample to
`publish` (QoS 0: a lost sample is replaced by the next one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone

import psutil

from protocol.messages import ActiveModel, Telemetry

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
