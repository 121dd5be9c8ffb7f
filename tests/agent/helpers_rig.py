"""A rig for the return-to-previous and download-only tests: tests/agent/test_updates.py's Rig (agent, amqtt
broker, real signed bundles of the tiny model over HTTP, a fleet publisher) whose HTTP server counts every request
by path, and a `send` that can set download_only, pick the deployment id, and leave the command unsigned."""

from __future__ import annotations

import functools
import hashlib
import http.server
import queue
import threading
from collections import Counter
from pathlib import Path

from protocol.messages import BundleRef, DeployCommand
from tests.agent.test_updates import NOW, QuietHandler, Rig


class CountingHandler(QuietHandler):
    counts: Counter  # set per server with functools.partial-like subclassing below

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.counts[self.path.split("?")[0]] += 1
        super().do_GET()


class CountingRig(Rig):
    def __init__(self, tmp: Path, model: Path) -> None:
        super().__init__(tmp, model)
        self.http.shutdown()
        self.http.server_close()
        self.requests: Counter = Counter()
        handler_cls = type("Handler", (CountingHandler,), {"counts": self.requests})
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                    functools.partial(handler_cls, directory=str(tmp / "www")))
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def gets(self, path: Path) -> int:
        """How many GET requests asked for this bundle file."""
        return self.requests[f"/api/v1/bundles/{path.name}"]

    def command(self, path: Path, version: int, *, download_only: bool = False, dep: str | None = None,
                signer: object = "kit") -> DeployCommand:
        self.n += 1
        data = path.read_bytes()
        ref = BundleRef(name="triage", version=version, url=f"{self.origin}/api/v1/bundles/{path.name}",
                        sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        cmd = DeployCommand(deployment_id=dep or f"dep-{self.n}", device_id="dev-1", bundle=ref, seq=self.n,
                            sent_at=NOW, download_only=download_only)
        if signer == "kit":
            return self.kit.sign(cmd)
        return self.kit.sign(cmd, key=signer) if signer is not None else cmd

    def silence(self, seconds: float = 1.5) -> bool:
        """True when no report arrives for `seconds`."""
        try:
            self.reports.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def restart(self) -> None:
        assert self.agent is not None
        self.agent.stop()
        self.agent = None
        self.start_agent()
