"""How much CPU other processes took while the benchmark measured, so that disturbed rounds can be set aside.

Workflow: the benchmark process, the agent subprocess and the busy-core process register with `METER.track(pid)`
(their CPU time is expected). `METER.snapshot()` before a measurement and `METER.foreign_cores(snap)` after it give
the CPU that everything else took meanwhile (system busy time, hypervisor steal included, minus the tracked
processes' own time), in cores, or None for a window under MIN_WINDOW_S (too short to tell, so not counted as
disturbed). `METER.wait_quiet()` waits, up to a limit, until such foreign load is below
`QUIET_CORES`, and is called before each agent/raw pair.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

QUIET_CORES = 0.2  # foreign load (in cores) above which a measurement counts as disturbed
MIN_WINDOW_S = 0.5  # CPU times tick in 10 ms steps: shorter windows cannot tell 0.2 cores from nothing


@dataclass(frozen=True)
class Snapshot:
    wall: float
    system_busy: float
    ours: float


def _system_busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


class Meter:
    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self.track(os.getpid())

    def track(self, pid: int) -> None:
        self._procs[pid] = psutil.Process(pid)

    def untrack(self, pid: int) -> None:
        self._procs.pop(pid, None)

    def _ours(self) -> float:
        total = 0.0
        for proc in list(self._procs.values()):
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def snapshot(self) -> Snapshot:
        return Snapshot(time.perf_counter(), _system_busy(), self._ours())

    def foreign_cores(self, since: Snapshot, *, min_window_s: float = MIN_WINDOW_S) -> float | None:
        """Cores' worth of CPU others took since `since`; None when the window is too short to tell."""
        now = self.snapshot()
        wall = now.wall - since.wall
        if wall < min_window_s:
            return None
        return max(0.0, ((now.system_busy - since.system_busy) - (now.ours - since.ours)) / wall)

    def wait_quiet(self, *, window_s: float = 0.3, max_wait_s: float = 30.0) -> tuple[float, float]:
        """Wait until a `window_s` window has foreign load under QUIET_CORES; return (load, seconds waited)."""
        started = time.perf_counter()
        while True:
            snap = self.snapshot()
            time.sleep(window_s)
            load = self.foreign_cores(snap, min_window_s=0.0) or 0.0
            waited = time.perf_counter() - started
            if load < QUIET_CORES or waited >= max_wait_s:
                return load, waited


METER = Meter()
