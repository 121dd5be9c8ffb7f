"""Another process busy on one core, as on a device that runs other work beside the model.

Workflow: `with busy_core(0):` starts a Python subprocess pinned to CPU 0 (os.sched_setaffinity) that spins
`while True: pass`, and ends that one process (by its id) on exit. Its CPU time is registered with bench.noise as
expected load, not noise.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .noise import METER

SPIN = "import os\nos.sched_setaffinity(0, {%d})\nwhile True:\n    pass\n"


@contextmanager
def busy_core(cpu: int = 0) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", SPIN % cpu])
    METER.track(proc.pid)  # the load we mean to add is not noise
    try:
        time.sleep(0.3)  # let it reach its loop
        if proc.poll() is not None:
            raise RuntimeError(f"the busy-core process exited with {proc.returncode}")
        yield proc.pid
    finally:
        METER.untrack(proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
