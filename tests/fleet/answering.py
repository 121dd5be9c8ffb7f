"""A device that answers deploy commands the way an agent does, without a model: for rollout tests that need many
devices. It keeps the last seq it accepted and drops a repeated one (as agent/commands.py's gate does), runs each
deployment once (a command for a deployment it already ran gets its outcome again), reports received, then active
(or rolled_back for a bad version) after `delay_s`."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timezone

from protocol import topics
from protocol.messages import DeployCommand, StatusReport, UpdateState, encode, parse_message

from .conftest import Device


class AnsweringDevice:
    def __init__(self, dev: Device, device_id: str, *, bad_versions: frozenset[int] = frozenset(),
                 delay_s: float = 0.0) -> None:
        self.device_id, self.bad, self.delay_s = device_id, bad_versions, delay_s
        self.seq, self.reports, self.lock = 0, 0, threading.Lock()
        self.updates: list[str] = []  # deployment ids it ran
        self.dev = dev
        dev.client.on_message = self._on_message
        dev.subscribe(str(topics.cmd(device_id)))

    def _on_message(self, _c: object, _u: object, msg: object) -> None:
        cmd = parse_message(msg.payload)  # type: ignore[attr-defined]
        if not isinstance(cmd, DeployCommand):
            return
        outcome = UpdateState.ROLLED_BACK if cmd.bundle.version in self.bad else UpdateState.ACTIVE
        with self.lock:
            if cmd.seq <= self.seq:
                return
            self.seq = cmd.seq
            if cmd.deployment_id in self.updates:  # asked again: answer with the outcome, as the agent does
                self._report(cmd, outcome)
                return
            self.updates.append(cmd.deployment_id)
        self._report(cmd, UpdateState.RECEIVED)
        if self.delay_s:
            threading.Timer(self.delay_s, self._report, (cmd, outcome)).start()
        else:
            self._report(cmd, outcome)

    def _report(self, cmd: DeployCommand, state: UpdateState) -> None:
        with self.lock:
            self.reports += 1
            seq = self.reports
        report = StatusReport(message_id=uuid.uuid4().hex, seq=seq, sent_at=datetime.now(timezone.utc),
                              device_id=self.device_id, deployment_id=cmd.deployment_id, bundle_name=cmd.bundle.name,
                              bundle_version=cmd.bundle.version, state=state,
                              active_version=cmd.bundle.version if state is UpdateState.ACTIVE else None)
        self.dev.client.publish(str(topics.status(self.device_id)), encode(report), qos=1)
