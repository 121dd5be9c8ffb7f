"""The running agent: wires the store, scheduler, updater, MQTT link, local API and telemetry together.

Workflow of `Agent.start()`:
1. load the active model from `versions/` (if any) into the scheduler and start its generation workers, so the
   local API serves at once;
2. start the local OpenAI-compatible API on 127.0.0.1 (the API never waits for the broker);
3. connect to the broker (persistent session, last will);
4. start the update worker: it first finishes an update a restart interrupted, then runs deploy commands one at a
   time as they arrive; after each it re-announces presence with the active model;
5. start telemetry.
`Agent.stop()` undoes them in reverse; `run_forever()` does both around SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import httpx
import uvicorn

from protocol import topics
from protocol.errors import SlmopsError
from protocol.messages import ActiveModel, BundleRef, DeployCommand, StatusReport, UpdateState

from . import __version__, telemetry
from .api import create_app
from .config import AgentConfig
from .link import Link
from .metrics import Metrics
from .scheduler import Scheduler
from .store import SeqCounter, Store
from .update import Updater

log = logging.getLogger("slmops.agent")


class Agent:
    def __init__(self, config: AgentConfig, *, on_report: Callable[[StatusReport], None] | None = None) -> None:
        self.config = config
        self.store = Store(config.data_dir)
        self.seq = SeqCounter(self.store.seq_file)
        self.metrics = Metrics()
        self.scheduler = Scheduler(config.serving, self.metrics)
        self.on_report = on_report
        self.http = httpx.Client(follow_redirects=True)
        self.commands: queue.Queue[DeployCommand | None] = queue.Queue()
        self.link = Link(
            config.device_id,
            config.broker_url,
            seq=self.seq,
            on_deploy=self.commands.put,
            active=self._active,
            agent_version=__version__,
        )
        self.updater = Updater(
            store=self.store,
            runtime=self.scheduler,
            keyring=config.keyring(),
            limits=config.limits,
            client=self.http,
            report=self._report,
        )
        self.api_port: int | None = None
        self._server: uvicorn.Server | None = None
        self._threads: list[threading.Thread] = []
        self._sampler: telemetry.Sampler | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._load_active()
        self.scheduler.start()
        self.metrics.watch_updates(lambda: self.updater.state.value)
        self._start_api()
        self.link.start()
        self._spawn(self._work, "slmops-updates")
        self._sampler = telemetry.Sampler(
            self.config.telemetry_interval_s,
            lambda: telemetry.sample(self.config.device_id, self.scheduler, self.seq.next()),
            lambda t: self.link.publish(topics.telemetry(self.config.device_id), t, qos=0),
        )
        self._sampler.start()

    def stop(self) -> None:
        if self._sampler:
            self._sampler.stop()
        self.commands.put(None)
        for t in self._threads:
            t.join(timeout=30)
        self.link.stop()
        if self._server:
            self._server.should_exit = True
        self.scheduler.stop()
        self.http.close()

    def run_forever(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        log.info("agent %s serving on http://%s:%s", self.config.device_id, self.config.api_host, self.api_port)
        done.wait()
        self.stop()

    @property
    def api_url(self) -> str:
        return f"http://{self.config.api_host}:{self.api_port}"

    # -- parts ----------------------------------------------------------------------------------------------
    def _load_active(self) -> None:
        ref = self.store.active()
        if ref is None:
            log.info("no model installed yet; waiting for a deploy command")
            return
        try:
            self.scheduler.swap(self.scheduler.load(self.store.version_dir(ref), ref))
            log.info("serving %s v%s", ref.name, ref.version)
        except SlmopsError as exc:
            log.error("cannot load the active model %s v%s: %s", ref.name, ref.version, exc)

    def _start_api(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.api_host, self.config.api_port))
        self.api_port = sock.getsockname()[1]
        app = create_app(self.scheduler, self.config.serving, bind_host=self.config.api_host)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._spawn(lambda: self._server.run(sockets=[sock]), "slmops-api", join=False)  # stopped by should_exit
        # wait until it accepts connections, so callers can use api_url right away
        for _ in range(200):
            if self._server.started:
                return
            time.sleep(0.05)
        raise SlmopsError(f"local API did not start on {self.config.api_host}:{self.api_port}")

    def _work(self) -> None:
        self.updater.resume()
        self.link.announce()
        while (cmd := self.commands.get()) is not None:
            try:
                self.updater.handle(cmd)
            except Exception:  # the worker must outlive any single bad update
                log.exception("update %s crashed", cmd.deployment_id)
            self.link.announce()

    def _spawn(self, target: Callable[[], None], name: str, *, join: bool = True) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        if join:
            self._threads.append(t)

    def _active(self) -> ActiveModel | None:
        cur = self.scheduler.current
        return ActiveModel(name=cur.ref.name, version=cur.ref.version) if cur else None

    def _report(
        self,
        *,
        deployment_id: str,
        bundle: BundleRef,
        state: UpdateState,
        active_version: int | None = None,
        error_code: str | None = None,
        detail: str = "",
    ) -> None:
        report = StatusReport(
            device_id=self.config.device_id,
            deployment_id=deployment_id,
            bundle_name=bundle.name,
            bundle_version=bundle.version,
            state=state,
            active_version=active_version,
            error_code=error_code,
            detail=detail,
            seq=self.seq.next(),
            sent_at=datetime.now(timezone.utc),
        )
        log.info("%s: %s v%s %s %s", self.config.device_id, bundle.name, bundle.version, state.value, detail)
        self.link.publish(topics.status(self.config.device_id), report, qos=1)
        if self.on_report:
            self.on_report(report)
