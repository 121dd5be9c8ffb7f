"""One background thread that does a step of work on a timer and soon after it is poked: the base of the fleet's
outbox publisher, rollout reconciler and telemetry retention job.

Workflow: `start()` runs `_loop` in a daemon thread: wait until poked or `idle_s` passed, call `step()`; while
`step()` answers True (more to do at once) call it again without waiting; after each step wait at least `gap_s`
(reports arrive in bursts: one step covers many). An exception from `step()` is logged on one line and the thread
goes on (the database away, a bug). `stop()` wakes the thread and joins it; `stopping` tells a long step to end early.
"""

from __future__ import annotations

import logging
import threading

from protocol.errors import one_line

log = logging.getLogger(__name__)


class Worker:
    name = "slmops-worker"

    def __init__(self, *, idle_s: float, gap_s: float = 0.0, first_now: bool = False) -> None:
        self.idle_s, self.gap_s = idle_s, gap_s  # seconds: between steps at most (unless poked) / at least
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        if first_now:
            self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already started; make a new one to start again")
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poke(self) -> None:
        """Something to do was committed: step soon rather than at the next idle tick."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def step(self) -> bool:
        """One unit of work; True if there may be more to do at once."""
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.idle_s)
            self._wake.clear()
            busy = True
            while busy and not self._stopping.is_set():
                try:
                    busy = self.step()
                except Exception as exc:
                    log.error("%s: %s", self.name, one_line(exc))
                    log.debug("traceback", exc_info=True)
                    busy = False
                if self.gap_s:
                    self._stopping.wait(self.gap_s)
