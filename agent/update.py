"""The agent's update lifecycle: one persisted state machine with one transition table.

    DOWNLOAD -> VERIFY -> INSTALL -> HEALTH_CHECK -> COMMIT -> CLEANUP (active) -> IDLE
        |          |         |___________|_____________|
        v          v                     v
     CLEANUP (rejected | failed)      ROLLBACK -> CLEANUP (rolled back | failed) -> IDLE

    download-only:               VERIFY -> CLEANUP (downloaded: verified and kept, nothing installed) -> IDLE
    back to the kept previous:   REUSE -> HEALTH_CHECK -> ... as above;  REUSE -> CLEANUP (rejected | failed)

Rules (after Mender):
- Handlers do the work and end in an `Event` (success; reject: a `BundleError`, bad content; storage: the disk
  refused a write, an OSError; cancel: the fleet cancelled it; failure: anything else); only `TRANSITIONS` picks the
  next state and the outcome. An outcome, once a transition decided it, stays: a disk error in INSTALL, HEALTH_CHECK
  or COMMIT rolls back and still ends `failed` with its code (disk_full, read_only, io_error).
- The record (`state/update.json`) is written before each handler runs, so a restart knows where it stopped:
  stopped in DOWNLOAD or VERIFY -> run that step again (neither touches the live model); stopped in INSTALL,
  HEALTH_CHECK or COMMIT -> ROLLBACK; stopped in ROLLBACK or CLEANUP -> run it again. Every handler is idempotent.
  The updater keeps the record in memory too: when the disk refuses to store it, the update still runs to its end
  and reports.
- Nothing is installed into `versions/` before the bundle's signature (a threshold of the trust root's bundles
  role), expiry, version floor, target (`check_target`) and every file hash are verified; a bundle that reuses an
  installed name and version with other content is refused (`VersionReusedError`). A deploy of the version that
  serves is answered "already active" only when its bundle file is the one installed (its sha256 is kept beside
  the version) and the files are intact; otherwise the bundle is fetched and verified like any other.
- The active pointer is snapshotted when the update starts; ROLLBACK writes that snapshot back and makes the
  runtime serve the model it names. CLEANUP always runs and sends the one terminal status report.
- A state entered more than `MAX_ENTRIES` times in one update is a loop: the step fails.
- Each finished deployment's outcome is kept in the journal (agent/journal.py), persisted: a command for a
  deployment that already finished (a QoS 1 redelivery, or the fleet asking a silent device again with a new seq,
  before or after a restart) gets the same terminal report again, with a new message id and seq, and nothing is
  downloaded or installed again.
- HEALTH_CHECK scores the bundle's held-out set when it carries one (agent/health.py): the aggregate score is kept
  in the record and goes out on the `active` report, or on the terminal report when it missed the bundle's own
  minimum (`eval_below_minimum`, a health-check failure: the update rolls back like any other).
- A cancel (`cancel(deployment_id)`, from any thread) is checked between download chunks and before VERIFY and
  INSTALL; once INSTALL began the update runs to its end. `stop()` (the agent shutting down) interrupts DOWNLOAD and
  VERIFY the same way, leaving the record for the restart.
- An unreadable update.json is treated as "no update in progress": staging is cleared and the damage reported.
- Going back below the version floor: a command (signed, admitted by agent/commands.py) naming the version kept as
  `previous`, below the floor, whose bundle sha256 equals the one kept beside it and whose files all hash as its
  verified manifest says, starts in REUSE instead of DOWNLOAD: nothing is fetched, HEALTH_CHECK and COMMIT switch
  back to it (a failed check rolls back to the version that served), and the `active` report says it went back.
  Any other version below the floor goes the usual way and VERIFY refuses it (`bad_version`), as before.
- Download-only (`DeployCommand.download_only`): DOWNLOAD and VERIFY as always, then VERIFY keeps the bundle file
  in `<data_dir>/downloaded/` (agent/downloaded.py) and ends the update `downloaded`. A later command for the same
  bundle (a new deployment, or the same deployment id without download_only) takes that file in DOWNLOAD after
  hashing it again, so nothing is fetched, and VERIFY checks it fully before INSTALL; a command for another bundle
  removes it.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import httpx

from protocol.bundle import read_envelope, unpack
from protocol.errors import (
    BadVersionNumberError,
    BundleError,
    EvalBelowMinimumError,
    HealthCheckError,
    IncompatibleTargetError,
    ManifestError,
    SlmopsError,
    StorageError,
    SupersededError,
    UpdateCancelledError,
    VersionReusedError,
)
from protocol.manifest import Manifest, canonical_bytes
from protocol.messages import BundleRef, CancelCommand, DeployCommand, EvalScore, UpdateState
from protocol.trust import Keyring, verify_envelope

from . import download, health
from .config import Limits
from .downloaded import Downloaded
from .runtime import LoadedModel
from .scheduler import Scheduler
from .journal import Journal
from .store import ModelRef, Store, storage_error

log = logging.getLogger("slmops.agent.update")
MAX_ENTRIES = 3
CANCELS = 200  # cancelled deployment ids remembered (a cancel may arrive before its deploy command)


# what this agent runs: bundles for another runtime, precision or execution provider are refused in VERIFY
RUNTIMES = ("onnxruntime-genai",)
PRECISIONS = ("int4", "int8", "fp32")  # fp16 onnxruntime-genai models need a GPU execution provider
EXECUTION_PROVIDERS = ("cpu",)


def check_target(manifest: Manifest) -> None:
    """IncompatibleTargetError unless this agent can run the bundle's target (runtime, precision, provider)."""
    t = manifest.target
    if manifest.base is not None:
        raise IncompatibleTargetError("adapter-only bundles are not supported by this agent version")
    if t.runtime not in RUNTIMES or manifest.format not in RUNTIMES:
        raise IncompatibleTargetError(f"bundle targets runtime {t.runtime!r}; this agent runs {RUNTIMES[0]!r}")
    if t.precision not in PRECISIONS:
        raise IncompatibleTargetError(f"bundle is {t.precision}; this agent runs {', '.join(PRECISIONS)} on the CPU")
    if t.execution_provider not in EXECUTION_PROVIDERS:
        raise IncompatibleTargetError(
            f"bundle targets execution provider {t.execution_provider[:40]!r}; this agent runs 'cpu'"
        )


class State(str, Enum):
    IDLE = "idle"
    REUSE = "reuse"  # instead of DOWNLOAD, VERIFY, INSTALL: go back to the version kept as previous
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
    STORAGE = "storage"  # the disk refused a write or read (full, read-only, I/O error)
    CANCEL = "cancel"  # the fleet cancelled the deployment; checked before the handler runs
    FAILURE = "failure"  # anything else went wrong (network, health check, a bug)
    STAGED = "staged"  # a download-only command's bundle is verified and kept: nothing more to do


S, E, U = State, Event, UpdateState

# (state, event) -> (next state, outcome decided by this transition)
TRANSITIONS: dict[tuple[State, Event], tuple[State, UpdateState | None]] = {
    (S.DOWNLOAD, E.SUCCESS): (S.VERIFY, None),
    (S.DOWNLOAD, E.REJECT): (S.CLEANUP, U.REJECTED),
    (S.DOWNLOAD, E.FAILURE): (S.CLEANUP, U.FAILED),
    (S.DOWNLOAD, E.STORAGE): (S.CLEANUP, U.FAILED),
    (S.DOWNLOAD, E.CANCEL): (S.CLEANUP, U.FAILED),
    (S.REUSE, E.SUCCESS): (S.HEALTH_CHECK, None),
    (S.REUSE, E.REJECT): (S.CLEANUP, U.REJECTED),
    (S.REUSE, E.FAILURE): (S.CLEANUP, U.FAILED),
    (S.REUSE, E.STORAGE): (S.CLEANUP, U.FAILED),
    (S.REUSE, E.CANCEL): (S.CLEANUP, U.FAILED),
    (S.VERIFY, E.SUCCESS): (S.INSTALL, None),
    (S.VERIFY, E.STAGED): (S.CLEANUP, U.DOWNLOADED),
    (S.VERIFY, E.REJECT): (S.CLEANUP, U.REJECTED),
    (S.VERIFY, E.FAILURE): (S.CLEANUP, U.FAILED),
    (S.VERIFY, E.STORAGE): (S.CLEANUP, U.FAILED),
    (S.VERIFY, E.CANCEL): (S.CLEANUP, U.FAILED),
    (S.INSTALL, E.SUCCESS): (S.HEALTH_CHECK, None),
    (S.INSTALL, E.FAILURE): (S.ROLLBACK, None),
    (S.INSTALL, E.STORAGE): (S.ROLLBACK, U.FAILED),
    (S.INSTALL, E.CANCEL): (S.CLEANUP, U.FAILED),  # checked before the install handler: nothing was installed
    (S.HEALTH_CHECK, E.SUCCESS): (S.COMMIT, None),
    (S.HEALTH_CHECK, E.FAILURE): (S.ROLLBACK, None),
    (S.HEALTH_CHECK, E.STORAGE): (S.ROLLBACK, U.FAILED),
    (S.COMMIT, E.SUCCESS): (S.CLEANUP, U.ACTIVE),
    (S.COMMIT, E.FAILURE): (S.ROLLBACK, None),
    (S.COMMIT, E.STORAGE): (S.ROLLBACK, U.FAILED),
    (S.ROLLBACK, E.SUCCESS): (S.CLEANUP, U.ROLLED_BACK),
    (S.ROLLBACK, E.FAILURE): (S.CLEANUP, U.FAILED),
    (S.ROLLBACK, E.STORAGE): (S.CLEANUP, U.FAILED),
    (S.CLEANUP, E.SUCCESS): (S.IDLE, None),
    (S.CLEANUP, E.FAILURE): (S.IDLE, None),
    (S.CLEANUP, E.STORAGE): (S.IDLE, None),
}
# states a cancel (or the agent stopping) may end before their handler runs: nothing was installed yet
CANCELLABLE = (S.REUSE, S.DOWNLOAD, S.VERIFY, S.INSTALL)
INTERRUPTIBLE = (S.REUSE, S.DOWNLOAD, S.VERIFY)  # on stop: left for the restart, which runs the step again
# where a restart continues from a state the agent was stopped in
ON_RESTART: dict[State, State] = {
    S.REUSE: S.REUSE,
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
    S.REUSE: U.VERIFYING,
    S.DOWNLOAD: U.DOWNLOADING,
    S.VERIFY: U.VERIFYING,
    S.INSTALL: U.INSTALLING,
    S.HEALTH_CHECK: U.HEALTH_CHECK,
}

Reporter = Callable[..., None]  # report(deployment_id=, bundle=, state=, active_version=, error_code=, detail=, eval=)


class Interrupted(BaseException):
    """The agent is stopping: the update in DOWNLOAD or VERIFY ends here and resumes after the restart."""


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
    eval: dict[str, Any] | None = None  # the held-out score HEALTH_CHECK measured (an EvalScore as JSON)
    download_only: bool = False  # the command asked for DOWNLOAD and VERIFY only (ends `downloaded`)

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
        keyring: Keyring | Callable[[], Keyring],
        limits: Limits,
        client: httpx.Client,
        report: Reporter,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.store, self.runtime, self.limits = store, runtime, limits
        # the bundle keyring, or a function giving the current one (the trust root's bundles role, which rotates)
        self.keyring: Callable[[], Keyring] = keyring if callable(keyring) else (lambda: keyring)
        self.client, self.report, self.clock = client, report, clock
        self._candidate: LoadedModel | None = None
        self.state = S.IDLE  # the state being run, for /metrics
        self._lock = threading.Lock()
        self._cancels: dict[str, None] = {}  # deployment ids the fleet cancelled, oldest first
        self._stopping = threading.Event()
        self.journal = Journal(store)
        self.downloaded = Downloaded(store)
        self.handlers: dict[State, Callable[[Record], Event | None]] = {
            S.REUSE: self._reuse,
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
        current = self.journal.current
        if not current:
            self.store.clear_all_staging()  # no update in progress: anything in staging is a leftover
            return
        try:
            rec = Record.from_json(current)
            rec.ref  # noqa: B018  (a record without a usable bundle is damage too)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.journal.damaged(f"state file update.json holds an unreadable update record ({type(exc).__name__}: {exc})")
            return
        nxt = ON_RESTART.get(rec.state, S.CLEANUP)
        if nxt is S.ROLLBACK and rec.state is not S.ROLLBACK:
            rec.error_code, rec.detail = "interrupted", f"the agent stopped during {rec.state.value}; rolled back"
        log.warning("resuming update %s: stopped in %s, continuing with %s", rec.deployment_id, rec.state.value, nxt.value)
        rec.state = nxt
        self._run(rec)

    def handle(self, cmd: DeployCommand | CancelCommand) -> UpdateState | None:
        """Run one deploy command to its end; return the outcome (None: a duplicate, answered with its outcome
        again, or a cancel command)."""
        if isinstance(cmd, CancelCommand):
            self.cancel(cmd.deployment_id)
            return None
        done = self.journal.finished(cmd.deployment_id)
        install_downloaded = bool(done) and done.get("state") == U.DOWNLOADED.value and not cmd.download_only
        if done is not None and not install_downloaded:
            log.info("deployment %s already finished; sending its outcome again", cmd.deployment_id)
            if done:
                self._resend(done)
            return None
        if install_downloaded:
            log.info("deployment %s was downloaded only; installing it now", cmd.deployment_id)
        ref = ModelRef(cmd.bundle.name, cmd.bundle.version)
        rec = Record(cmd.deployment_id, cmd.bundle.model_dump(mode="json"), S.DOWNLOAD, self.store.snapshot(),
                     download_only=cmd.download_only)
        if self._take_cancel(cmd.deployment_id):
            return self._end_unrun(rec, UpdateCancelledError("cancelled by the fleet before it started"))
        active = self.store.active()
        self.report(deployment_id=cmd.deployment_id, bundle=cmd.bundle, state=U.RECEIVED, active_version=_v(active))
        self.downloaded.drop_unless(rec.bundle)  # a command for another bundle supersedes a kept download
        current = self.runtime.current
        if active == ref and current is not None and current.ref == ref:
            known = self.store.bundle_digest(ref)
            other = known is not None and known != cmd.bundle.sha256  # same name and version, other bundle file
            problem = "the command names another bundle file" if other else self.store.inspect(ref, hashes=self.limits.check_hashes)
            if problem is None:
                rec.outcome, rec.detail = U.ACTIVE, "already active"
                rec.eval = self.journal.measured(ref.name, ref.version)  # the score this device measured at install
                self.report(deployment_id=cmd.deployment_id, bundle=cmd.bundle, state=U.ACTIVE,
                            active_version=ref.version, detail="already active", eval=_eval(rec, U.ACTIVE))
                self._remember(rec)
                return U.ACTIVE
            log.warning("%s v%s is active but %s: fetching and verifying it", ref.name, ref.version,
                        problem if other else f"its files are damaged ({problem})")
        if not cmd.download_only and self._below_floor_previous(ref):
            why = self._not_returnable(ref, cmd.bundle.sha256)
            if why is None:
                rec.state = S.REUSE  # a signed command back to the version this device verified and kept
            else:
                log.warning("%s v%s is the previous version but %s: treated as any older bundle", ref.name,
                            ref.version, why)
        return self._run(rec)

    def supersede(self, cmd: DeployCommand, by: DeployCommand) -> UpdateState:
        """A queued command that a newer deployment of the same bundle replaced: answer it without running it."""
        rec = Record(cmd.deployment_id, cmd.bundle.model_dump(mode="json"), S.DOWNLOAD, {})
        err = SupersededError(f"replaced by deployment {by.deployment_id} ({by.bundle.name} v{by.bundle.version}) "
                              "before it started")
        return self._end_unrun(rec, err)

    def cancel(self, deployment_id: str) -> None:
        """Ask for `deployment_id` to stop before its install (thread-safe; a later deploy command is cancelled)."""
        with self._lock:
            self._cancels[deployment_id] = None
            while len(self._cancels) > CANCELS:
                self._cancels.pop(next(iter(self._cancels)))

    def stop(self) -> None:
        """The agent is stopping: interrupt a download or verification (it resumes after the restart)."""
        self._stopping.set()

    def finished(self, deployment_id: str) -> bool:
        return self.journal.finished(deployment_id) is not None

    # -- the machine ----------------------------------------------------------------------------------------
    def _run(self, rec: Record) -> UpdateState | None:
        try:
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
                if outcome is not None and rec.outcome is None:
                    rec.outcome = outcome
                log.info("update %s: %s --%s--> %s", rec.deployment_id, rec.state.value, event.value, nxt.value)
                rec.state = nxt
        finally:
            self.state = S.IDLE
        self._finish(rec)
        return rec.outcome

    def _step(self, rec: Record, entered: int) -> Event:
        if entered > MAX_ENTRIES:
            rec.error_code, rec.detail = "state_loop", f"{rec.state.value} entered {entered} times; giving up"
            return E.FAILURE
        try:
            self._check(rec)
            return self.handlers[rec.state](rec) or E.SUCCESS
        except UpdateCancelledError as exc:
            err_code, detail, event = exc.code, str(exc), E.CANCEL
        except BundleError as exc:
            err_code, detail, event = exc.code, str(exc), E.REJECT
        except StorageError as exc:
            err_code, detail, event = exc.code, str(exc), E.STORAGE
        except SlmopsError as exc:
            err_code, detail, event = exc.code, str(exc), E.FAILURE
        except OSError as exc:  # the disk refused: full, read-only, an I/O error
            err = storage_error(exc, f"{rec.state.value} ({exc.filename or 'data folder'})")
            log.error("update %s: %s", rec.deployment_id, err)
            err_code, detail, event = err.code, str(err), E.STORAGE
        except Exception as exc:  # a bug must still end in a report, never a dead agent
            log.exception("update %s: %s failed", rec.deployment_id, rec.state.value)
            err_code, detail, event = "internal", f"{type(exc).__name__}: {exc}", E.FAILURE
        if (rec.state, event) not in TRANSITIONS:
            event = E.FAILURE
        if rec.state in (S.ROLLBACK, S.CLEANUP) and rec.error_code:
            rec.detail += f"; then {rec.state.value} failed: {detail}"
        else:
            rec.error_code, rec.detail = err_code, detail
        return event

    def _check(self, rec: Record) -> None:
        """Raise when this update is cancelled (or the agent stops) and its state may still end here."""
        if rec.state in INTERRUPTIBLE and self._stopping.is_set():
            raise Interrupted(rec.deployment_id)
        if rec.state in CANCELLABLE and self._is_cancelled(rec.deployment_id):
            raise UpdateCancelledError(f"cancelled by the fleet during {rec.state.value}; nothing was installed")

    # -- going back to the previous version, below the floor -------------------------------------------------
    def _below_floor_previous(self, ref: ModelRef) -> bool:
        floor = self.store.floor(ref.name)
        return self.store.previous() == ref and floor is not None and ref.version < floor

    def _not_returnable(self, ref: ModelRef, sha256: str) -> str | None:
        """Why this device may not go back to `ref` (None: it may): it must be the version kept as previous, below
        the floor, from the very bundle file the command names, with its verified manifest and every file's
        sha256 intact. Anything else below the floor is refused in VERIFY as before (`bad_version`)."""
        if not self._below_floor_previous(ref):
            return "it is no longer the version kept as previous"
        if self.store.bundle_digest(ref) != sha256:
            return "the command names another bundle file than the one it was installed from"
        manifest = self._kept_manifest(ref)
        if manifest is None:
            return "its verified manifest is missing or unreadable"
        problem = self.store.inspect(ref, hashes=True)
        return f"its files are damaged ({problem})" if problem else None

    def _kept_manifest(self, ref: ModelRef) -> Manifest | None:
        doc = self.store.trusted_manifest(ref)
        try:
            manifest = Manifest.from_signed(doc) if doc is not None else None
        except ManifestError:
            return None
        return manifest if manifest is not None and (manifest.name, manifest.version) == (ref.name, ref.version) else None

    # -- handlers: each idempotent, each returns normally (or an event other than success) or raises ---------
    def _reuse(self, rec: Record) -> None:
        """Instead of DOWNLOAD, VERIFY and INSTALL: check (again, after a restart too) that the command names the
        intact version kept as previous; HEALTH_CHECK and COMMIT then switch back to it like to any install."""
        why = self._not_returnable(rec.ref, rec.bundle["sha256"])
        if why is not None:
            raise BadVersionNumberError(
                f"bundle {rec.ref.name} v{rec.ref.version} is older than v{self.store.floor(rec.ref.name)} already "
                f"trusted on this device and {why}; deploy a version at least that high"
            )
        rec.manifest = self._kept_manifest(rec.ref).to_signed()  # type: ignore[union-attr]
        before = ModelRef.from_dict(rec.pointer_before.get("active"))
        rec.detail = (f"went back to the previous version v{rec.ref.version}, verified and kept on this device"
                      + (f"; v{before.version} is kept as previous" if before and before.name == rec.ref.name else ""))

    def _download(self, rec: Record) -> None:
        ref = BundleRef.model_validate(rec.bundle)
        if self.downloaded.take(rec.bundle, self._bundle_file(rec)):  # a verified earlier download: nothing to fetch
            rec.detail = "installed from the bundle a download-only command downloaded; nothing fetched again"
        download.fetch(
            ref,
            self._bundle_file(rec),
            client=self.client,
            max_bytes=self.limits.max_bundle_bytes,
            attempts=self.limits.download_attempts,
            timeout_s=self.limits.download_timeout_s,
            deadline_s=self.limits.download_deadline_s,
            min_rate_bps=self.limits.download_min_rate_bps,
            rate_window_s=self.limits.download_rate_window_s,
            check=lambda: self._check(rec),
        )
    def _verify(self, rec: Record) -> Event | None:
        path = self._bundle_file(rec)
        if not path.exists():  # a restart after a download-only VERIFY kept the file: take it back, check it again
            self.downloaded.take(rec.bundle, path)
        with path.open("rb") as f:
            envelope = read_envelope(f)
        manifest = verify_envelope(envelope, self.keyring(), now=self.clock(), min_version=self.store.floor(rec.ref.name))
        if (manifest.name, manifest.version) != (rec.ref.name, rec.ref.version):
            raise ManifestError(
                f"bundle holds {manifest.name} v{manifest.version} but the deploy command named "
                f"{rec.ref.name} v{rec.ref.version}"
            )
        check_target(manifest)
        known = _normalized(self.store.trusted_manifest(rec.ref))
        if known is not None and canonical_bytes(known) != canonical_bytes(manifest.to_signed()):
            raise VersionReusedError(
                f"bundle {manifest.name} v{manifest.version} differs from the v{manifest.version} this device already "
                "installed; publish the change with a higher version"
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
        health.read_heldout(unpacked, manifest)  # a malformed held-out set is refused before anything is installed
        rec.manifest = manifest.to_signed()
        if rec.download_only:  # keep the verified bundle file only; the install unpacks and checks it again
            shutil.rmtree(unpacked, ignore_errors=True)
            self.downloaded.keep(path, rec.bundle)
            rec.detail = (f"downloaded and verified {manifest.name} v{manifest.version}; nothing installed: a deploy "
                          "command for this bundle installs it without downloading it again")
            return E.STAGED
        return None

    def _install(self, rec: Record) -> None:
        self.store.install(self._unpacked(rec), rec.ref, rec.manifest, bundle_sha256=rec.bundle["sha256"])

    def _health_check(self, rec: Record) -> None:
        manifest = self._manifest(rec)
        rec.eval = None
        try:
            passed = health.check(
                self.store.version_dir(rec.ref), manifest, timeout_s=self.limits.health_timeout_s, load=self.runtime.load
            )
        except EvalBelowMinimumError as exc:
            if isinstance(exc.score, EvalScore):
                rec.eval = exc.score.model_dump(mode="json")  # the reason: it goes out on the terminal report
            raise
        rec.eval = passed.score.model_dump(mode="json") if passed.score else None
        self._candidate = passed.model

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
        self.store.clear_staging(rec.deployment_id)  # best effort: rmtree ignores errors
        if rec.outcome not in (U.ACTIVE, U.DOWNLOADED):
            self.store.remove_version(rec.ref)  # never the active or previous version
        self.store.prune()

    # -- helpers --------------------------------------------------------------------------------------------
    def _finish(self, rec: Record) -> None:
        self._send(rec, rec.outcome or U.FAILED)
        rec.outcome = rec.outcome or U.FAILED
        self._remember(rec)

    def _end_unrun(self, rec: Record, err: UpdateCancelledError) -> UpdateState:
        """Answer a command that never ran (cancelled or superseded): one terminal report, remembered."""
        rec.outcome, rec.error_code, rec.detail = U.FAILED, err.code, str(err)
        log.info("deployment %s: %s", rec.deployment_id, err)
        self._send(rec, U.FAILED)
        self._remember(rec)
        return U.FAILED

    def _send(self, rec: Record, state: UpdateState) -> None:
        terminal = state.terminal
        try:
            self.report(
                deployment_id=rec.deployment_id,
                bundle=BundleRef.model_validate(rec.bundle),
                state=state,
                active_version=_v(self.store.active()) if terminal else None,
                error_code=rec.error_code if terminal and state is not U.ACTIVE else None,
                detail=rec.detail if terminal else "",
                eval=_eval(rec, state),
            )
        except Exception:  # a report that cannot be sent must not stop the update
            log.exception("update %s: could not send the %s report", rec.deployment_id, state.value)

    def _resend(self, done: dict[str, Any]) -> None:
        try:
            self.report(
                deployment_id=done["deployment_id"],
                bundle=BundleRef.model_validate(done["bundle"]),
                state=UpdateState(done["state"]),
                active_version=done.get("active_version"),
                error_code=done.get("error_code"),
                detail=done.get("detail", ""),
                eval=EvalScore.model_validate(done["eval"]) if done.get("eval") else None,
            )
        except Exception:
            log.exception("could not send the outcome of deployment %s again", done.get("deployment_id"))

    def _manifest(self, rec: Record) -> Manifest:
        if rec.manifest is None:
            raise BundleError("no verified manifest recorded for this update")
        return Manifest.from_signed(rec.manifest)

    def _bundle_file(self, rec: Record) -> Path:
        return self.store.staging(rec.deployment_id) / "bundle.tar"

    def _unpacked(self, rec: Record) -> Path:
        return self.store.staging(rec.deployment_id) / "model"

    def _persist(self, rec: Record) -> None:
        self.journal.persist(rec.to_json())

    def _remember(self, rec: Record) -> None:
        """Forget the record; keep the deployment's outcome so a redelivered command gets it again."""
        self.journal.remember({
            "deployment_id": rec.deployment_id,
            "bundle": rec.bundle,
            "state": (rec.outcome or U.FAILED).value,
            "error_code": rec.error_code if rec.outcome is not U.ACTIVE else None,
            "detail": rec.detail,
            "active_version": _v(self.store.active()),
            "eval": _eval(rec, rec.outcome or U.FAILED, json=True),
        })
        with self._lock:
            self._cancels.pop(rec.deployment_id, None)

    def _is_cancelled(self, deployment_id: str) -> bool:
        with self._lock:
            return deployment_id in self._cancels

    def _take_cancel(self, deployment_id: str) -> bool:
        with self._lock:
            if deployment_id not in self._cancels:
                return False
            del self._cancels[deployment_id]
            return True


def _v(ref: ModelRef | None) -> int | None:
    return ref.version if ref else None


def _eval(rec: Record, state: UpdateState, *, json: bool = False) -> EvalScore | dict[str, Any] | None:
    """The held-out score a terminal report carries: on `active`, or when the score was why the update failed."""
    if rec.eval is None or not state.terminal:
        return None
    if state is not U.ACTIVE and rec.error_code != EvalBelowMinimumError.code:
        return None
    return rec.eval if json else EvalScore.model_validate(rec.eval)


def _normalized(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored manifest as this release writes it (an older release left out fields added since, e.g.
    eval.heldout), so the same signed manifest always compares equal; unchanged when it does not parse."""
    if manifest is None:
        return None
    try:
        return Manifest.from_signed(manifest).to_signed()
    except ManifestError:
        return manifest
