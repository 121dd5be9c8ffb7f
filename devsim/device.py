"""One simulated device: what `agent/` sends and in which order, without a model, a download or a disk.

Workflow of `SimDevice` (the loop calls `will()` before connecting, `connected()` after the CONNACK, `command()`
for each payload on its cmd topic):
- presence: the last will is a retained offline `Presence`; on connect (and after every update) a retained online
  one naming the active model, as agent/link.py and agent/service.py send them;
- commands: parsed with `protocol.messages.parse_message`, checked by `devsim.gate` (signature, root, origin, seq);
  a cancel is remembered (it stops an update that has not reached INSTALL, or a deploy not yet started); a deploy
  joins the queue, one update runs at a time, and when the next is taken the newest deployment per bundle name wins
  while the others are answered `failed`/`superseded`, as agent/service.py's `_newest` does;
- an update reports received, downloading, verifying, installing, health_check and then its terminal state
  (agent/update.py's order: each step when entered, after the previous step's simulated duration); a deploy of the
  active bundle is answered received + active "already active"; a deployment finished before is answered with its
  terminal report again; a silent device stops after downloading and never answers that deployment;
- telemetry: a `Telemetry` sample at QoS 1 every `knobs.telemetry_s` seconds when on.
Every message carries a seq that only grows (started from the clock, as the agent's SeqCounter does after a reset).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from protocol import topics
from protocol.errors import MessageError, one_line
from protocol.messages import (
    MAX_DETAIL_CHARS,
    ActiveModel,
    BundleRef,
    CancelCommand,
    DeployCommand,
    Presence,
    StatusReport,
    Telemetry,
    UpdateState,
    encode,
    parse_message,
)

from .behaviour import Fate, Knobs, eval_of, fate
from .gate import SeqGuard, Trust

log = logging.getLogger("slmops.devsim")
U = UpdateState
AGENT_VERSION = "devsim"
FINISHED = 200  # finished deployments remembered per device (agent/journal.py keeps 200 too)
CANCELS = 200  # cancelled deployment ids remembered per device


class Port(Protocol):
    """What a device needs from the loop: publish, and call back later."""

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    def later(self, delay_s: float, fn: Callable[[], None]) -> None: ...


@dataclass
class Stats:
    """Counts over every device of a simulator (read by the summary and the progress display)."""

    devices: int = 0
    connected: int = 0  # devices connected now
    connects: int = 0  # CONNACKs accepted (reconnects included)
    refused: int = 0  # CONNACKs refused (bad credentials, not authorised...)
    disconnects: int = 0  # connections lost while running (not the clean ones at the end)
    commands: int = 0  # deploy and cancel commands received
    dropped: Counter = field(default_factory=Counter)  # commands dropped, by reason
    resent: int = 0  # terminal reports sent again for a repeated command
    reports: int = 0  # status reports published
    acked: int = 0  # QoS 1 publishes acknowledged by the broker (reports, presence, telemetry)
    telemetry: int = 0
    states: Counter = field(default_factory=Counter)  # status reports sent, by state
    first_command: float | None = None  # time.time() of the first command and of the last terminal report
    last_terminal: float | None = None

    def as_dict(self) -> dict:
        return {
            "devices": self.devices, "connected": self.connected, "connects": self.connects,
            "refused": self.refused, "disconnects": self.disconnects, "commands": self.commands,
            "dropped": dict(self.dropped), "resent": self.resent, "reports": self.reports, "acked": self.acked,
            "telemetry": self.telemetry, "states": dict(self.states), "first_command": self.first_command,
            "last_terminal": self.last_terminal,
        }


def status_report(**fields: object) -> StatusReport:
    """A StatusReport; the `eval` score goes in only when protocol/ knows the field (it is being added)."""
    if fields.get("eval") is None or "eval" not in StatusReport.model_fields:
        fields.pop("eval", None)
    return StatusReport(**fields)  # type: ignore[arg-type]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Update:
    __slots__ = ("cmd", "fate", "cancelled", "step")

    def __init__(self, cmd: DeployCommand, end: Fate) -> None:
        self.cmd, self.fate, self.cancelled, self.step = cmd, end, False, 0


class SimDevice:
    def __init__(self, device_id: str, *, trust: Trust, knobs: Knobs, port: Port, stats: Stats,
                 active: tuple[str, int] | None = None) -> None:
        self.device_id, self.trust, self.knobs, self.port, self.stats = device_id, trust, knobs, port, stats
        self.active = active
        self.guard = SeqGuard()
        self._seq = int(time.time() * 1000)
        self.topics = {c: str(topics.Topic(device_id, c)) for c in topics.Channel}
        self.running: _Update | None = None
        self.pending: list[DeployCommand] = []
        self.finished: OrderedDict[str, dict] = OrderedDict()
        self.cancels: OrderedDict[str, None] = OrderedDict()
        self.telemetry_on = False

    # -- presence -----------------------------------------------------------------------------------------------
    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def presence(self, online: bool) -> bytes:
        active = ActiveModel(name=self.active[0], version=self.active[1]) if self.active else None
        return encode(Presence(device_id=self.device_id, online=online, agent_version=AGENT_VERSION, active=active,
                               seq=self.next_seq(), sent_at=_now()))

    def will(self) -> bytes:
        return self.presence(False)

    def connected(self) -> None:
        """After the CONNACK (the loop subscribes to the cmd topic): announce, start telemetry once."""
        self.announce()
        if self.knobs.telemetry_s and not self.telemetry_on:
            self.telemetry_on = True
            self.port.later(self.knobs.telemetry_s * (0.1 + 0.9 * (hash(self.device_id) % 1000) / 1000), self._sample)

    def announce(self) -> None:
        self.port.publish(self.topics[topics.Channel.PRESENCE], self.presence(True), 1, True)

    # -- commands -----------------------------------------------------------------------------------------------
    def command(self, payload: bytes) -> None:
        """A payload from this device's cmd topic: parse, check, act (never raises)."""
        try:
            cmd = parse_message(payload)
        except MessageError as exc:
            self.stats.dropped["bad_message"] += 1
            log.warning("%s dropped a malformed command: %s", self.device_id, one_line(exc))
            return
        if not isinstance(cmd, DeployCommand | CancelCommand) or cmd.device_id != self.device_id:
            self.stats.dropped["not_for_me"] += 1
            return
        self.stats.commands += 1
        if self.stats.first_command is None:
            self.stats.first_command = time.time()
        reason = self.trust.check(cmd) or self.guard.admit(cmd.seq)
        if reason is not None:
            self.stats.dropped[reason] += 1
            log.warning("%s dropped %s command seq %d: %s", self.device_id, cmd.kind, cmd.seq, reason)
            return
        if isinstance(cmd, CancelCommand):
            self._cancel(cmd.deployment_id)
            return
        self.pending.append(cmd)
        if self.running is None:
            self._next()

    def _cancel(self, deployment_id: str) -> None:
        run = self.running
        if run is not None and run.cmd.deployment_id == deployment_id:
            run.cancelled = True  # takes effect before VERIFY or INSTALL, as in the agent
            return
        self.cancels[deployment_id] = None
        while len(self.cancels) > CANCELS:
            self.cancels.popitem(last=False)

    def _next(self) -> None:
        """Take the next queued command (the newest per bundle name; the others superseded) and run it."""
        while self.pending and self.running is None:
            keep = self._newest()
            if not keep:
                return
            cmd = keep.pop(0)
            self.pending = keep
            self._handle(cmd)

    def _newest(self) -> list[DeployCommand]:
        seen: set[str] = set()
        unique = [c for c in self.pending if not (c.deployment_id in seen or seen.add(c.deployment_id))]
        newest: dict[str, tuple[tuple[int, int], DeployCommand]] = {}
        for i, c in enumerate(unique):
            if c.deployment_id not in self.finished and (
                    c.bundle.name not in newest or (c.seq, i) > newest[c.bundle.name][0]):
                newest[c.bundle.name] = ((c.seq, i), c)
        keep = []
        for c in unique:
            winner = newest.get(c.bundle.name, ((0, 0), c))[1]
            if winner is c or c.deployment_id in self.finished:
                keep.append(c)
            else:
                self._end(c, U.FAILED, "superseded", f"replaced by deployment {winner.deployment_id} "
                          f"({winner.bundle.name} v{winner.bundle.version}) before it started")
        return keep

    def _handle(self, cmd: DeployCommand) -> None:
        done = self.finished.get(cmd.deployment_id)
        if done is not None:
            self.stats.resent += 1
            self._report(cmd.bundle, cmd.deployment_id, **done)
            return
        if cmd.deployment_id in self.cancels:
            del self.cancels[cmd.deployment_id]
            self._end(cmd, U.FAILED, "cancelled", "cancelled by the fleet before it started")
            return
        want = (cmd.bundle.name, cmd.bundle.version)
        self._report(cmd.bundle, cmd.deployment_id, state=U.RECEIVED, active_version=self._active_version())
        if self.active == want:
            self._end(cmd, U.ACTIVE, None, "already active", report_eval=False)
            return
        self.running = _Update(cmd, fate(self.knobs, self.device_id, cmd.deployment_id, want))
        self._step()

    # the agent's progress reports, each sent when its step is entered, and how long the step before it took
    STEPS = ((U.DOWNLOADING, None), (U.VERIFYING, "download_s"), (U.INSTALLING, "verify_s"),
             (U.HEALTH_CHECK, "install_s"))

    def _step(self) -> None:
        run = self.running
        if run is None:
            return
        if run.step < len(self.STEPS):
            state, _ = self.STEPS[run.step]
            if run.cancelled and state in (U.VERIFYING, U.INSTALLING):
                self.running = None
                self._end(run.cmd, U.FAILED, "cancelled", "cancelled by the fleet")
                self._after()
                return
            self._report(run.cmd.bundle, run.cmd.deployment_id, state=state)
            if run.fate is Fate.SILENT:
                return  # a hung update: nothing more is ever sent for it, and nothing after it runs
            run.step += 1
            nxt = self.STEPS[run.step][1] if run.step < len(self.STEPS) else "health_s"
            self.port.later(getattr(self.knobs.durations, nxt), self._step)
            return
        self.running = None
        if run.fate is Fate.ACTIVE:
            self.active = (run.cmd.bundle.name, run.cmd.bundle.version)
            self._end(run.cmd, U.ACTIVE, None, "", fate_=Fate.ACTIVE)
        else:
            self._end(run.cmd, U.ROLLED_BACK, "health_check",
                      "health check failed (simulated); the previous version serves again", fate_=Fate.HEALTH_FAIL)
        self._after()

    def _after(self) -> None:
        self.announce()
        self.port.later(0, self._next)

    def _end(self, cmd: DeployCommand, state: UpdateState, code: str | None, detail: str, *,
             fate_: Fate | None = None, report_eval: bool = True) -> None:
        """Send the terminal report and remember it for a repeated command."""
        done = {"state": state, "active_version": self._active_version(), "error_code": code, "detail": detail,
                "eval": eval_of(self.knobs, fate_) if report_eval and fate_ is not None else None}
        self.finished[cmd.deployment_id] = done
        while len(self.finished) > FINISHED:
            self.finished.popitem(last=False)
        self._report(cmd.bundle, cmd.deployment_id, **done)

    def _report(self, bundle: BundleRef, deployment_id: str, *, state: UpdateState, active_version: int | None = None,
                error_code: str | None = None, detail: str = "", eval: dict | None = None) -> None:
        report = status_report(
            device_id=self.device_id, deployment_id=deployment_id, bundle_name=bundle.name,
            bundle_version=bundle.version, state=state, active_version=active_version, error_code=error_code,
            detail=detail if len(detail) <= MAX_DETAIL_CHARS else detail[: MAX_DETAIL_CHARS - 3] + "...", eval=eval,
            seq=self.next_seq(), sent_at=_now(),
        )
        self.port.publish(self.topics[topics.Channel.STATUS], encode(report), 1, False)
        self.stats.reports += 1
        self.stats.states[state.value] += 1
        if state.terminal:
            self.stats.last_terminal = time.time()

    def _active_version(self) -> int | None:
        return self.active[1] if self.active else None

    # -- telemetry ----------------------------------------------------------------------------------------------
    def _sample(self) -> None:
        active = ActiveModel(name=self.active[0], version=self.active[1]) if self.active else None
        sample = Telemetry(device_id=self.device_id, active=active, uptime_s=0.0, requests_total=0,
                           tokens_generated_total=0, tokens_per_s=0.0, cpu_percent=1.0, memory_rss_mb=50.0,
                           memory_percent=1.0, seq=self.next_seq(), sent_at=_now())
        self.port.publish(self.topics[topics.Channel.TELEMETRY], encode(sample), 1, False)
        self.stats.telemetry += 1
        self.port.later(self.knobs.telemetry_s, self._sample)
