"""The agent as a real subprocess, driven only through its command line and HTTP API.

Workflow: `Workspace(root)` makes a trusted key pair (an agent needs one, though no bundle arrives here) and one
agent data folder per model: an empty one, or one where the model folder (hard-linked, since `Store.install`
moves what it is given) is installed as bench v1 and made active with the agent's own `Store`.
`AgentProcess(...).start()` runs `python -m slmops.cli agent run ...` with a broker URL where nothing listens
(the agent serves its local model without one), and returns the seconds from process start until GET /health
answers 200 "ok" (or 503 "no_model" for an empty data folder). `stop()` sends SIGTERM and waits, then kills.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from .noise import METER
from .sample import median

REPO = Path(__file__).resolve().parents[1]
ENV = {"ORT_DISABLE_TELEMETRY": "1", "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}


class AgentStartError(RuntimeError):
    """The agent exited or did not answer /health in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workspace:
    """A trust root and agent data folders under `root` (deleted by `close`)."""

    def __init__(self, root: Path) -> None:
        from datetime import datetime, timezone

        from fleet.trust import init_trust

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        init_trust(root / "trust", now=datetime.now(timezone.utc))
        self.trust_root = root / "trust" / "root.json"
        self._dirs: dict[str, Path] = {}

    def data_dir(self, name: str, model_folder: Path | None) -> Path:
        """An agent data folder serving `model_folder` (None: no model installed), made once per name."""
        if name in self._dirs:
            return self._dirs[name]
        from agent.store import ModelRef, Store

        data = self.root / f"data-{name}"
        store = Store(data)
        if model_folder is not None:
            copy = self.root / f"copy-{name}"
            shutil.copytree(model_folder, copy, copy_function=os.link)
            ref = ModelRef("bench", 1)
            store.install(copy, ref)
            store.switch(ref)
        self._dirs[name] = data
        return data

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class AgentProcess:
    def __init__(self, data_dir: Path, trust_root: Path, *, threads: int, spin: bool, workers: int = 1,
                 queue_size: int = 16, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable, "-m", "slmops.cli", "agent", "run",
            "--device-id", "bench-1", "--data-dir", str(data_dir), "--trust-root", str(trust_root),
            "--bundle-origin", "http://127.0.0.1:1",
            "--api-port", str(self.port), "--broker", f"mqtt://127.0.0.1:{free_port()}",
            "--telemetry-interval", "3600", "--threads", str(threads), "--spin" if spin else "--no-spin",
            "--workers", str(workers), "--queue-size", str(queue_size), "--log-level", "WARNING",
        ]  # fmt: skip
        self.log_path = log_path or data_dir.parent / f"agent-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *, expect_model: bool = True, timeout_s: float = 120.0) -> float:
        """Start the agent; return seconds from process start to the expected /health answer."""
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        METER.track(self.proc.pid)  # its CPU time is expected, not noise
        want = (200, "ok") if expect_model else (503, "no_model")
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() - started < timeout_s:
                if self.proc.poll() is not None:
                    raise AgentStartError(f"agent exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    resp = client.get(f"{self.url}/health")
                    if (resp.status_code, resp.json().get("status")) == want:
                        return time.perf_counter() - started
                except (httpx.TransportError, ValueError):
                    pass
                time.sleep(0.02)
        self.stop()
        raise AgentStartError(f"agent did not answer /health with {want} within {timeout_s:g}s: {self.log_tail()}")

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    def rss_mb(self, settle_s: float = 1.0, samples: int = 3) -> float:
        """Median resident set size of the agent process in MiB, sampled after `settle_s`."""
        proc = psutil.Process(self.proc.pid)
        values = []
        for _ in range(samples):
            time.sleep(settle_s / samples)
            values.append(proc.memory_info().rss / 2**20)
        return round(median(values), 1)

    def os_threads(self) -> int:
        return psutil.Process(self.proc.pid).num_threads()

    def stop(self) -> None:
        if self.proc is None:
            return
        METER.untrack(self.proc.pid)
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "AgentProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
