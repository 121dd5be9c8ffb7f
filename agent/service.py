"""The running agent: wires the store, scheduler, updater, MQTT link, local API and telemetry together.

Workflow of `Agent.start()`:
1. load the active model from `versions/` (if any) into the scheduler and start its generation workers, so the
   local API serves at once;
2. start the local OpenAI-compatible API on 127.0.0.1 (the API never waits for the broker);
3. connect to the broker (persistent session, last will); every command it hands over passes the command gate
   (agent/commands.py: signature by the trust root's command key, order, bundle origin) or is dropped;
4. start the update worker: it first finishes an update a restart interrupted, then runs deploy commands one at a
   time as they arrive; after each it re-announces presence with the active model;
5. start telemetry: samples go through the on-disk outbox (<data_dir>/outbox/) at QoS 1 (agent/telemetry.py).
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
from protocol.messages import (
    MAX_DETAIL_CHARS,
    ActiveModel,
    BundleRef,
    CancelCommand,
    DeployCommand,
    EvalScore,
    StatusReport,
    UpdateState,
)

from . import __version__, telemetry
from .api import create_app
from .commands import CommandGate, RootFetcher
from .config import AgentConfig, fleet_tls
from .link import Link
from .metrics import Metrics
from .outbox import Outbox
from .scheduler import Scheduler
from .store import ModelRef, SeqCounter, Store
from .update import Interrupted, Updater

log = logging.getLogger("slmops.agent")


class Agent:
    def __init__(self, config: AgentConfig, *, on_report: Callable[[StatusReport], None] | None = None) -> None:
        self.config = config
        self.store = Store(config.data_dir)
        self.seq = SeqCounter(self.store.seq_file)
        self.metrics = Metrics()
        self.scheduler = Scheduler(config.serving, self.metrics)
        self.on_report = on_report
        token = {"Authorization": f"Bearer {config.fleet_token}"} if config.fleet_token else None
        verify = fleet_tls(config.fleet_ca_file, config.fleet_cert_file, config.fleet_key_file)  # bundles and roots
        self.http = httpx.Client(follow_redirects=True, headers=token, verify=verify)  # httpx drops the header on cross-origin redirects
        self.commands: queue.Queue[DeployCommand | CancelCommand | None] = queue.Queue()
        assert config.trust_root is not None  # AgentConfig requires it
        self.gate = CommandGate(
            self.store.state_dir,
            provisioned=config.trust_root,
            origins=config.bundle_origins,
            fetch=RootFetcher(self.http, config.bundle_origins[0]),
            metrics=self.metrics,
        )
        self.link = Link(
            config.device_id,
            config.broker_url,
            seq=self.seq,
            on_deploy=self._command,
            active=self._active,
            agent_version=__version__,
            reconnect_max_s=config.reconnect_max_s,
            username=config.broker_username,
            password=config.broker_password,
            ca_file=config.broker_ca_file,
            cert_file=config.broker_cert_file,
            key_file=config.broker_key_file,
        )
        self.updater = Updater(
            store=self.store,
            runtime=self.scheduler,
            keyring=self.gate.bundle_keyring,  # the current root's bundles role, read at each verification
            limits=config.limits,
            client=self.http,
            report=self._report,
        )
        self.api_port: int | None = None
        self._server: uvicorn.Server | None = None
        self._threads: list[threading.Thread] = []
        self._sampler: telemetry.Sampler | None = None
        self._forwarder: telemetry.Forwarder | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._load_active()
        self.scheduler.start()
        self.metrics.watch_updates(lambda: self.updater.state.value)
        self._start_api()
        self.link.start()
        self._spawn(self._work, "slmops-updates")
        outbox = Outbox(self.store.root / "outbox")
        self.metrics.watch_outbox(lambda: len(outbox), lambda: outbox.dropped)
        self._forwarder = telemetry.Forwarder(  # QoS 1 through <data_dir>/outbox/, removed once acknowledged
            outbox,
            lambda payload: self.link.publish_bytes(topics.telemetry(self.config.device_id), payload, qos=1),
            self.link.connected.is_set,
        )
        self._forwarder.start()
        self._sampler = telemetry.Sampler(
            self.config.telemetry_interval_s,
            lambda: telemetry.sample(self.config.device_id, self.scheduler, self.seq.next()),
            self._forwarder.put,
        )
        self._sampler.start()

    def stop(self) -> None:
        if self._sampler:
            self._sampler.stop()
        if self._forwarder:
            self._forwarder.stop()
        self.updater.stop()  # a download or verification in progress ends now and resumes after the restart
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
        """Serve the active model: a damaged pointer is rebuilt from disk, the model's files are checked against its
        verified manifest (sizes; sha256 too with `limits.check_hashes`), and a damaged model, or one that does not
        load, gives way to the previous version. What was found is reported once the link is up (`_work`)."""
        self.store.recover()
        hashes = self.config.limits.check_hashes
        tried: set[ModelRef] = set()
        while (ref := self.store.active()) is not None and ref not in tried:
            tried.add(ref)
            started = time.monotonic()
            problem = self.store.inspect(ref, hashes=hashes)
            log.info("checked the files of %s v%s (%s) in %.2fs: %s", ref.name, ref.version,
                     "sizes and sha256" if hashes else "sizes", time.monotonic() - started, problem or "intact")
            if problem is None:
                try:
                    self.scheduler.swap(self.scheduler.load(self.store.version_dir(ref), ref))
                    log.info("serving %s v%s", ref.name, ref.version)
                    return
                except SlmopsError as exc:
                    problem = f"it does not load: {exc}"
            prev = self.store.use_previous(f"{ref.name} v{ref.version}: {problem}")
            self.store.notes.append(("model_damaged", f"{ref.name} v{ref.version} is damaged ({problem}); "
                                     + (f"serving {prev.name} v{prev.version} instead" if prev else "nothing to serve")))
        log.info("no model to serve yet; waiting for a deploy command")

    def _report_start(self) -> None:
        """Send what start-up found and repaired (damaged state files, a damaged model) as status reports named
        after the model that serves (state active) or, when none does, the one that failed (state failed)."""
        notes = list(self.store.notes)
        if self.seq.note:
            notes.append(("state_damaged", self.seq.note))
        cur = self.scheduler.current
        about = cur.ref if cur else self.store.active()
        if about is None:
            installed = self.store.installed()
            about = max(installed, key=lambda r: r.version) if installed else None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        for i, (code, detail) in enumerate(notes, 1):
            if about is None:
                log.error("not reported (no model to name in a status report): %s: %s", code, detail)
                continue
            self._report(deployment_id=f"agent-start-{stamp}-{i}", bundle=about,  # type: ignore[arg-type]
                         state=UpdateState.ACTIVE if cur else UpdateState.FAILED,
                         active_version=cur.ref.version if cur else None, error_code=code, detail=detail)

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

    def _command(self, message: DeployCommand | CancelCommand) -> None:
        """From the link's thread: only a command the gate admits (signed by the fleet's command key, newer than
        the last one, bundle on the fleet's origin) is acted on. A cancel takes effect at once (the running update
        checks it between download chunks and before VERIFY and INSTALL; a queued one is answered when its turn
        comes); deploys are queued."""
        if not self.gate.admit(message):
            return
        if isinstance(message, CancelCommand):
            self.updater.cancel(message.deployment_id)
            return
        self.commands.put(message)

    def _work(self) -> None:
        try:
            self.updater.resume()
        except Interrupted:
            return
        except Exception:  # damaged state must never stop the worker: later deployments still run
            log.exception("resuming the interrupted update failed")
        try:
            self._report_start()
        except Exception:
            log.exception("could not report what start-up found")
        self.link.announce()
        pending: list[DeployCommand] = []
        while True:
            if not pending:
                item = self.commands.get()
                if item is None:
                    return
                pending.append(item)
            if not self._drain(pending):
                return
            pending = self._newest(pending)
            if not pending:
                continue
            cmd = pending.pop(0)
            try:
                self.updater.handle(cmd)
            except Interrupted:
                return
            except Exception:  # the worker must outlive any single bad update
                log.exception("update %s crashed", cmd.deployment_id)
            self.link.announce()

    def _drain(self, pending: list[DeployCommand]) -> bool:
        """Move every waiting command into `pending` (so a newer deployment can replace older ones); False on stop."""
        while True:
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            pending.append(item)

    def _newest(self, pending: list[DeployCommand]) -> list[DeployCommand]:
        """Waiting commands in arrival order, without copies of one deployment, and with only the newest deployment
        (highest seq, then latest arrival) per bundle name: each one it replaced gets its terminal report (`failed`,
        error code `superseded`) and never runs."""
        seen: set[str] = set()
        unique = []
        for cmd in pending:
            if cmd.deployment_id not in seen:
                seen.add(cmd.deployment_id)
                unique.append(cmd)
        newest: dict[str, tuple[tuple[int, int], DeployCommand]] = {}
        for i, cmd in enumerate(unique):
            if self.updater.finished(cmd.deployment_id):
                continue  # a redelivery: answered with its outcome, never superseded
            key = (cmd.seq, i)
            if cmd.bundle.name not in newest or key > newest[cmd.bundle.name][0]:
                newest[cmd.bundle.name] = (key, cmd)
        keep = []
        for cmd in unique:
            winner = newest.get(cmd.bundle.name, ((0, 0), cmd))[1]
            if winner is cmd or self.updater.finished(cmd.deployment_id):
                keep.append(cmd)
            else:
                self.updater.supersede(cmd, by=winner)
        return keep

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
        eval: EvalScore | None = None,  # the held-out score: on `active`, and when it was why the update failed
    ) -> None:
        report = StatusReport(
            device_id=self.config.device_id,
            deployment_id=deployment_id,
            bundle_name=bundle.name,
            bundle_version=bundle.version,
            state=state,
            active_version=active_version,
            error_code=error_code,
            detail=detail if len(detail) <= MAX_DETAIL_CHARS else detail[: MAX_DETAIL_CHARS - 3] + "...",
            eval=eval,
            seq=self.seq.next(),
            sent_at=datetime.now(timezone.utc),
        )
        score = f" ({eval.metric} {eval.score:.3f} over {eval.n} held-out items)" if eval else ""
        log.info("%s: %s v%s %s %s%s", self.config.device_id, bundle.name, bundle.version, state.value, detail, score)
        self.link.publish(topics.status(self.config.device_id), report, qos=1)
        if self.on_report:
            self.on_report(report)
