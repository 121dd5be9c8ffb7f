"""The agent's update lifecycle: one persisted state machine with one transition table.

    DOWNLOAD -> VERIFY -> INSTALL -> HEALTH_CHECK -> COMMIT -> CLEANUP (active) -> IDLE
        |          |         |___________|_____________|
        v          v                     v
     CLEANUP (rejected | failed)      ROLLBACK -> CLEANUP (rolled back | failed) -> IDLE

Rules (after Mender):
- Handlers do the work and end in an `Event` (success; reject: a `BundleError`, bad content; failure: anything
  else); only `TRANSITIONS` picks the next state and the outcome.
- The record (`state/update.json`) is written before each handler runs, so a restart knows where it stopped:
  stopped in DOWNLOAD or VERIFY -> run that step again (neither touches the live model); stopped in INSTALL,
  HEALTH_CHECK or COMMIT -> ROLLBACK; stopped in ROLLBACK or CLEANUP -> run it again. Every handler is idempotent.
- Nothing is installed into `versions/` before the bundle's signature and every file hash are verified.
- The active pointer is snapshotted when the update starts; ROLLBACK writes that snapshot back and makes the
  runtime serve the model it names. CLEANUP always runs and sends the one terminal status report.
- A state entered more than `MAX_ENTRIES` times in one update is a loop: the step fails.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import httpx

from protocol.bundle import read_envelope, unpack
from protocol.errors import (
    BundleError,
    HealthCheckError,
    IncompatibleTargetError,
    ManifestError,
    SlmopsError,
)
from protocol.manifest import Manifest
from protocol.messages import BundleRef, DeployCommand, UpdateState
from protocol.trust import Keyring, verify_envelope

from . import download, health
from .config import Limits
from .runtime import LoadedModel
from .scheduler import Scheduler
from .store import ModelRef, Store, read_json, write_json_atomic

log = logging.getLogger("slmops.agent.update")
MAX_ENTRIES = 3
HISTORY = 50  # finished deployment ids remembered, so a redelivered command is not run twice


class State(str, Enum):
    IDLE = "idle"
    DOWNLOAD = "download"
    VERIFY = "verify"
    INSTALL = "install"
    HEALTH_CHECK = "health_check"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    CLEANUP = "cleanup"


class Event(str, Enum):
    SUCCESS = "success"
    REJECT = "reject"  # the bundle's content is not acceptable (a BundleError): nothing was installed
    FAILURE = "failure"  # anything else went wrong (network, disk, health check, a bug)


S, E, U = State, Event, UpdateState

# (state, event) -> (next state, outcome decided by this transition)
TRANSITIONS: dict[tuple[State, Event], tuple[State, UpdateState | None]] = {
    (S.DOWNLOAD, E.SUCCESS): (S.VERIFY, None),
    (S.DOWNLOAD, E.REJECT): (S.CLEANUP, U.REJECTED),
    (S.DOWNLOAD, E.FAILURE): (S.CLEANUP, U.FAILED),
    (S.VERIFY, E.SUCCESS): (S.INSTALL, None),
    (S.VERIFY, E.REJECT): (S.CLEANUP, U.REJECTED),
    (S.VERIFY, E.FAILURE): (S.CLEANUP, U.FAILED),
    (S.INSTALL, E.SUCCESS): (S.HEALTH_CHECK, None),
    (S.INSTALL, E.FAILURE): (S.ROLLBACK, None),
    (S.HEALTH_CHECK, E.SUCCESS): (S.COMMIT, None),
    (S.HEALTH_CHECK, E.FAILURE): (S.ROLLBACK, None),
    (S.COMMIT, E.SUCCESS): (S.CLEANUP, U.ACTIVE),
    (S.COMMIT, E.FAILURE): (S.ROLLBACK, None),
    (S.ROLLBACK, E.SUCCESS): (S.CLEANUP, U.ROLLED_BACK),
    (S.ROLLBACK, E.FAILURE): (S.CLEANUP, U.FAILED),
    (S.CLEANUP, E.SUCCESS): (S.IDLE, None),
    (S.CLEANUP, E.FAILURE): (S.IDLE, None),
}
# where a restart continues from a state the agent was stopped in
ON_RESTART: dict[State, State] = {
    S.DOWNLOAD: S.DOWNLOAD,
    S.VERIFY: S.VERIFY,
    S.INSTALL: S.ROLLBACK,
    S.HEALTH_CHECK: S.ROLLBACK,
    S.COMMIT: S.ROLLBACK,
    S.ROLLBACK: S.ROLLBACK,
    S.CLEANUP: S.CLEANUP,
}
# the progress report sent when a state is entered
PROGRESS: dict[State, UpdateState] = {
    S.DOWNLOAD: U.DOWNLOADING,
    S.VERIFY: U.VERIFYING,
    S.INSTALL: U.INSTALLING,
    S.HEALTH_CHECK: U.HEALTH_CHECK,
}

Reporter = Callable[..., None]  # report(deployment_id=, bundle=, state=, active_version=, error_code=, detail=)


@dataclass
class Record:
    """The persisted state of the update in progress."""

    deployment_id: str
    bundle: dict[str, Any]
    state: State
    pointer_before: dict[str, Any]
    outcome: UpdateState | None = None
    error_code: str | None = None
    detail: str = ""
    manifest: dict[str, Any] | None = None
    entries: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["state"] = self.state.value
        d["outcome"] = self.outcome.value if self.outcome else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Record":
        d = dict(d)
        d["state"] = State(d["state"])
        d["outcome"] = UpdateState(d["outcome"]) if d.get("outcome") else None
        return cls(**d)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.bundle["name"], int(self.bundle["version"]))


class Updater:
    """Runs deploy commands one at a time through the transition table."""

    def __init__(
        self,
        *,
        store: Store,
        runtime: Scheduler,
        keyring: Keyring,
        limits: Limits,
        client: httpx.Client,
        report: Reporter,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.store, self.runtime, self.keyring, self.limits = store, runtime, keyring, limits
        self.client, self.report, self.clock = client, report, clock
        self._candidate: LoadedModel | None = None
        self.state = S.IDLE  # the state being run, for /metrics
        self.handlers: dict[State, Callable[[Record], None]] = {
            S.DOWNLOAD: self._download,
            S.VERIFY: self._verify,
            S.INSTALL: self._install,
            S.HEALTH_CHECK: self._health_check,
            S.COMMIT: self._commit,
            S.ROLLBACK: self._rollback,
            S.CLEANUP: self._cleanup,
        }

    # -- entry points ---------------------------------------------------------------------------------------
    def resume(self) -> None:
        """After a restart: finish the update the agent was stopped in, if any."""
        doc = self._doc()
        if not doc.get("current"):
            return
        rec = Record.from_json(doc["current"])
        nxt = ON_RESTART.get(rec.state, S.CLEANUP)
        if nxt is S.ROLLBACK and rec.state is not S.ROLLBACK:
            rec.error_code, rec.detail = "interrupted", f"the agent stopped during {rec.state.value}; rolled back"
        log.warning("resuming update %s: stopped in %s, continuing with %s", rec.deployment_id, rec.state.value, nxt.value)
        rec.state = nxt
        self._run(rec)

    def handle(self, cmd: DeployCommand) -> UpdateState | None:
        """Run one deploy command to its end; return the outcome (None: a duplicate, ignored)."""
        doc = self._doc()
        if cmd.deployment_id in doc.get("history", []):
            log.info("deployment %s already handled; ignoring the redelivered command", cmd.deployment_id)
            return None
        ref = ModelRef(cmd.bundle.name, cmd.bundle.version)
        active = self.store.active()
        self.report(deployment_id=cmd.deployment_id, bundle=cmd.bundle, state=U.RECEIVED, active_version=_v(active))
        if active == ref and self.runtime.current is not None:
            self.report(deployment_id=cmd.deployment_id, bundle=cmd.bundle, state=U.ACTIVE, active_version=ref.version,
                        detail="already active")
            self._remember(cmd.deployment_id)
            return U.ACTIVE
        rec = Record(cmd.deployment_id, cmd.bundle.model_dump(mode="json"), S.DOWNLOAD, self.store.snapshot())
        return self._run(rec)

    # -- the machine ----------------------------------------------------------------------------------------
    def _run(self, rec: Record) -> UpdateState | None:
        while rec.state is not S.IDLE:
            entries = rec.entries or {}
            entries[rec.state.value] = entries.get(rec.state.value, 0) + 1
            rec.entries = entries
            self._persist(rec)
            self.state = rec.state
            if rec.state in PROGRESS:
                self._send(rec, PROGRESS[rec.state])
            event = self._step(rec, entries[rec.state.value])
            nxt, outcome = TRANSITIONS[(rec.state, event)]
            if outcome is not None:
                rec.outcome = outcome
            log.info("update %s: %s --%s--> %s", rec.deployment_id, rec.state.value, event.value, nxt.value)
            rec.state = nxt
        self.state = S.IDLE
        self._finish(rec)
        return rec.outcome

    def _step(self, rec: Record, entered: int) -> Event:
        if entered > MAX_ENTRIES:
            rec.error_code, rec.detail = "state_loop", f"{rec.state.value} entered {entered} times; giving up"
            return E.FAILURE
        event = E.FAILURE
        try:
            self.handlers[rec.state](rec)
            return E.SUCCESS
        except BundleError as exc:
            err_code, detail = exc.code, str(exc)
            event = E.REJECT if (rec.state, E.REJECT) in TRANSITIONS else E.FAILURE
        except SlmopsError as exc:
            err_code, detail = exc.code, str(exc)
        except Exception as exc:  # a bug or an OS error must still end in a report, never a dead agent
            log.exception("update %s: %s failed", rec.deployment_id, rec.state.value)
            err_code, detail = "internal", f"{type(exc).__name__}: {exc}"
        if rec.state in (S.ROLLBACK, S.CLEANUP) and rec.error_code:
            rec.detail += f"; then {rec.state.value} failed: {detail}"
        else:
            rec.error_code, rec.detail = err_code, detail
        return event

    # -- handlers: each idempotent, each returns normally or raises ----------------------------------------
    def _download(self, rec: Record) -> None:
        ref = BundleRef.model_validate(rec.bundle)
        download.fetch(
            ref,
            self._bundle_file(rec),
            client=self.client,
            max_bytes=self.limits.max_bundle_bytes,
            attempts=self.limits.download_attempts,
            timeout_s=self.limits.download_timeout_s,
        )

    def _verify(self, rec: Record) -> None:
        path = self._bundle_file(rec)
        with path.open("rb") as f:
            envelope = read_envelope(f)
        manifest = verify_envelope(envelope, self.keyring, now=self.clock(), min_version=self.store.floor(rec.ref.name))
        if (manifest.name, manifest.version) != (rec.ref.name, rec.ref.version):
            raise ManifestError(
                f"bundle holds {manifest.name} v{manifest.version} but the deploy command named "
                f"{rec.ref.name} v{rec.ref.version}"
            )
        if manifest.base is not None:
            raise IncompatibleTargetError("adapter-only bundles are not supported by this agent version")
        if manifest.target.execution_provider != "cpu":
            raise IncompatibleTargetError(
                f"bundle targets execution provider {manifest.target.execution_provider!r}; this agent runs 'cpu'"
            )
        unpacked = self._unpacked(rec)
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir(parents=True)

        def sink(rel: str):
            out = unpacked / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            return out.open("wb")

        with path.open("rb") as f:
            unpack(f, manifest, sink)
        rec.manifest = manifest.to_signed()

    def _install(self, rec: Record) -> None:
        self.store.install(self._unpacked(rec), rec.ref)

    def _health_check(self, rec: Record) -> None:
        manifest = self._manifest(rec)
        self._candidate = health.check(
            self.store.version_dir(rec.ref), manifest, timeout_s=self.limits.health_timeout_s, load=self.runtime.load
        )

    def _commit(self, rec: Record) -> None:
        candidate = self._candidate
        if candidate is None or candidate.ref != rec.ref:
            raise HealthCheckError("no health-checked model in memory to switch to")
        self.store.switch(rec.ref)
        self.runtime.swap(candidate)
        self._candidate = None

    def _rollback(self, rec: Record) -> None:
        self._candidate = None
        self.store.restore(rec.pointer_before)
        want = self.store.active()
        current = self.runtime.current
        if want is None:
            self.runtime.swap(None)
        elif current is None or current.ref != want:
            self.runtime.swap(self.runtime.load(self.store.version_dir(want), want))

    def _cleanup(self, rec: Record) -> None:
        self.store.clear_staging(rec.deployment_id)
        if rec.outcome is not U.ACTIVE:
            self.store.remove_version(rec.ref)
        self.store.prune()

    # -- helpers --------------------------------------------------------------------------------------------
    def _finish(self, rec: Record) -> None:
        self._send(rec, rec.outcome or U.FAILED)
        self._remember(rec.deployment_id)

    def _send(self, rec: Record, state: UpdateState) -> None:
        terminal = state.terminal
        self.report(
            deployment_id=rec.deployment_id,
            bundle=BundleRef.model_validate(rec.bundle),
            state=state,
            active_version=_v(self.store.active()) if terminal else None,
            error_code=rec.error_code if terminal and state is not U.ACTIVE else None,
            detail=rec.detail if terminal else "",
        )

    def _manifest(self, rec: Record) -> Manifest:
        if rec.manifest is None:
            raise BundleError("no verified manifest recorded for this update")
        return Manifest.from_signed(rec.manifest)

    def _bundle_file(self, rec: Record) -> Path:
        return self.store.staging(rec.deployment_id) / "bundle.tar"

    def _unpacked(self, rec: Record) -> Path:
        return self.store.staging(rec.deployment_id) / "model"

    def _doc(self) -> dict[str, Any]:
        return read_json(self.store.update_file) or {}

    def _persist(self, rec: Record) -> None:
        doc = self._doc()
        doc["current"] = rec.to_json()
        write_json_atomic(self.store.update_file, doc)

    def _remember(self, deployment_id: str) -> None:
        doc = self._doc()
        doc["current"] = None
        doc["history"] = (doc.get("history", []) + [deployment_id])[-HISTORY:]
        write_json_atomic(self.store.update_file, doc)


def _v(ref: ModelRef | None) -> int | None:
    return ref.version if ref else None
