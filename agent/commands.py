"""The command gate: the agent acts only on commands its fleet signed, each once, in order, for bundles on the fleet.

Workflow of `CommandGate`:
- start: the trusted root is `<data_dir>/state/root.json` once it exists; on the first start it is the provisioned
  `--trust-root` file, which must verify against its own root role and not be expired. Later, a provisioned file with
  a lower (or equal) version is ignored and one with a higher version is walked to (each step verified, the steps in
  between fetched from the fleet). A damaged root.json gives way to the provisioned file, with an error logged.
- `admit(cmd)`, for every deploy and cancel command the link hands over (one at a time, under a lock):
  1. root: when the command names a newer root than the trusted one (`root_version`), or the trusted root has
     expired, walk the chain with the injected fetcher (`RootFetcher`: GET
     `{bundle_origin}/api/v1/trust/root/{n}.json`, size-capped); every verified step is stored in root.json;
  2. signature: a threshold of the root's commands keys over the command's `signing_bytes()`;
  3. order: its `seq` must be above the last accepted one (a seq seen recently is a replay, a lower one reordered);
  4. origin: a deploy's bundle URL must be on a configured bundle origin (scheme, host and port equal, no user
     info, query or fragment, a plain path under /api/v1/bundles/);
  5. the new seq is written (state/commands.json, then its copy state/commands.2.json; the higher valid copy wins
     at start, so a torn write never takes it back) BEFORE the command is acted on. When the disk refuses (full,
     read-only) the seq is held in memory and the command still runs, so its update meets the same disk and the
     fleet hears why (disk_full, read_only) instead of nothing.
  A dropped command is counted by reason (`REASONS`, agent/metrics.py), logged on one line, and never acted on.
- `bundle_keyring()` is the bundles role of the current root: after a rotation new bundle keys work at once.

The fleet resends an unfinished deployment with a new seq, so the same seq twice is always a replay. Root fetches
run in the caller's thread (the link's), bounded by `ROOT_FETCH_TIMEOUT_S` per root and `MAX_ROOT_STEPS` roots.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from protocol.errors import ConfigError, DownloadError, SignatureError, SlmopsError, StateDamagedError
from protocol.manifest import MAX_VERSION, check_version
from protocol.messages import CancelCommand, DeployCommand
from protocol.root import MAX_ROOT_BYTES, Root, load_trusted_root, parse_root, walk_chain
from protocol.trust import Keyring, verify_message

from .config import DEFAULT_PORTS, Origin, parse_origin
from .metrics import COMMAND_DROP_REASONS, Metrics
from .store import read_json, write_bytes_atomic, write_json_atomic

log = logging.getLogger("slmops.agent.commands")

REASONS = COMMAND_DROP_REASONS  # why a command was dropped: the bounded label of the counter
RECENT = 64  # accepted seqs remembered to tell a replay from a reordered command
ROOT_FETCH_TIMEOUT_S = 10.0  # seconds per trust root request
BUNDLE_PATH_RE = re.compile(r"/api/v1/bundles/[A-Za-z0-9._-]{1,128}(?:/[A-Za-z0-9._-]{1,128}){0,8}")  # fullmatch


def on_origin(url: str, origins: Sequence[Origin]) -> bool:
    """Whether a bundle URL is on one of `origins` and its path a plain one under /api/v1/bundles/."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return False
    scheme = u.scheme.lower()
    if scheme not in DEFAULT_PORTS or u.username or u.password or u.query or u.fragment or not u.hostname:
        return False
    if (scheme, u.hostname.lower(), port or DEFAULT_PORTS[scheme]) not in origins:
        return False
    return bool(BUNDLE_PATH_RE.fullmatch(u.path)) and not any(p in (".", "..") for p in u.path.split("/"))


class RootFetcher:
    """Fetches `{origin}/api/v1/trust/root/{n}.json`: the bytes, None on 404, DownloadError otherwise."""

    def __init__(self, client: httpx.Client, origin: str, *, max_bytes: int = MAX_ROOT_BYTES,
                 timeout_s: float = ROOT_FETCH_TIMEOUT_S) -> None:
        scheme, host, port = parse_origin(origin)
        self.base = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"
        self.client, self.max_bytes, self.timeout_s = client, max_bytes, timeout_s

    def __call__(self, version: int) -> bytes | None:
        url = f"{self.base}/api/v1/trust/root/{check_version(version)}.json"
        try:
            with self.client.stream("GET", url, timeout=self.timeout_s) as r:
                if r.status_code == 404:
                    return None
                if r.status_code != 200:
                    raise DownloadError(f"trust root v{version}: {url} answered HTTP {r.status_code}")
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise DownloadError(f"trust root v{version} from {url} is over {self.max_bytes} bytes")
                return bytes(data)
        except httpx.HTTPError as exc:
            raise DownloadError(f"trust root v{version}: cannot fetch {url} ({type(exc).__name__})") from exc


class CommandGate:
    """The trusted root, the last accepted command seq, and the checks every command passes before it is acted on."""

    def __init__(
        self,
        state_dir: Path,
        *,
        provisioned: Path,
        origins: Sequence[str],
        fetch: Callable[[int], bytes | None],
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        if not origins:
            raise ConfigError("no bundle origin given: pass --bundle-origin URL (the fleet's public URL)")
        self.state_dir = Path(state_dir)
        self.origins = tuple(parse_origin(o) for o in origins)
        self.fetch, self.metrics, self.clock = fetch, metrics, clock
        self._lock = threading.Lock()
        self._root = self._start_root(Path(provisioned))
        self._seq, self._recent = self._read_seq()

    # -- paths --------------------------------------------------------------------------------------------------
    @property
    def root_file(self) -> Path:
        return self.state_dir / "root.json"

    @property
    def seq_files(self) -> tuple[Path, Path]:
        return self.state_dir / "commands.json", self.state_dir / "commands.2.json"

    # -- what the rest of the agent reads -----------------------------------------------------------------------
    @property
    def root(self) -> Root:
        return self._root

    @property
    def last_seq(self) -> int:
        return self._seq

    def bundle_keyring(self) -> Keyring:
        return self._root.keyring("bundles")

    # -- the gate -----------------------------------------------------------------------------------------------
    def admit(self, cmd: DeployCommand | CancelCommand) -> bool:
        """True when `cmd` may be acted on (its seq is already stored); False when it was dropped (counted, logged)."""
        with self._lock:
            refused = self._check(cmd)
        if refused is None:
            return True
        reason, why = refused
        if self.metrics is not None:
            self.metrics.commands_dropped.labels(reason).inc()
        text = why[:300].encode("unicode_escape").decode("ascii")
        log.warning("dropped %s command %s (seq %d, deployment %s): %s: %s", cmd.kind, cmd.message_id[:32], cmd.seq,
                    cmd.deployment_id[:64], reason, text)
        return False

    def _check(self, cmd: DeployCommand | CancelCommand) -> tuple[str, str] | None:
        root = self._root
        if cmd.root_version > root.version or root.is_expired(self.clock()):
            try:
                root = self._walk()
            except SlmopsError as exc:
                return "root_unavailable", f"cannot reach a current trust root: {exc}"
            if cmd.root_version > root.version:
                return "root_unavailable", (f"signed under trust root v{cmd.root_version}; the newest this device "
                                            f"could verify is v{root.version}")
        try:
            verify_message(cmd, root.keyring("commands"))
        except SignatureError as exc:
            return "forged", str(exc)
        if cmd.seq in self._recent:
            return "replayed", f"seq {cmd.seq} was accepted before"
        if cmd.seq <= self._seq:
            return "reordered", f"seq {cmd.seq} is not above the last accepted {self._seq}"
        if isinstance(cmd, DeployCommand) and not on_origin(cmd.bundle.url, self.origins):
            return "wrong_origin", f"bundle URL {cmd.bundle.url[:120]!r} is not under a configured bundle origin"
        recent = [*self._recent, cmd.seq][-RECENT:]
        try:
            self._write_seq(cmd.seq, recent)
        except OSError as exc:  # the update meets the same disk and reports it; this run still refuses replays
            log.error("cannot store command seq %d (%s); holding it in memory", cmd.seq, exc.strerror)
        self._seq, self._recent = cmd.seq, recent
        return None

    # -- the trust root -----------------------------------------------------------------------------------------
    def _walk(self) -> Root:
        return walk_chain(self._root, self.fetch, now=self.clock(), on_step=self._accept)

    def _accept(self, root: Root) -> None:
        """A verified next root: stored, then trusted (kept in memory when the disk refuses)."""
        try:
            write_bytes_atomic(self.root_file, root.raw)
        except OSError as exc:
            log.error("cannot store trust root v%d (%s); trusting it in memory", root.version, exc.strerror)
        log.info("trust root v%d accepted (expires %s)", root.version, root.expires.isoformat())
        self._root = root

    def _start_root(self, provisioned: Path) -> Root:
        stored = self._stored_root()
        try:
            given = provisioned.read_bytes()
        except OSError as exc:
            if stored is None:
                raise ConfigError(f"cannot read the trust root {provisioned}: {exc.strerror}; pass --trust-root "
                                  "PATH (root.json from 'slmops keys init')") from exc
            log.warning("cannot read the provisioned trust root %s (%s); using the stored v%d", provisioned,
                        exc.strerror, stored.version)
            return stored
        if stored is None:
            try:
                root = load_trusted_root(given, self.clock())
            except SlmopsError as exc:
                raise ConfigError(f"trust root {provisioned} is not usable: {exc}") from exc
            self._accept(root)
            return root
        try:
            offered = parse_root(given)
        except SlmopsError as exc:
            log.warning("provisioned trust root %s is unreadable (%s); using the stored v%d", provisioned, exc,
                        stored.version)
            return stored
        if offered.version <= stored.version:
            if offered.version < stored.version:
                log.info("provisioned trust root v%d is older than the stored v%d; ignored", offered.version,
                         stored.version)
            return stored
        self._root = stored

        def fetch(n: int) -> bytes | None:
            return given if n == offered.version else self.fetch(n) if n < offered.version else None

        try:
            return walk_chain(stored, fetch, now=self.clock(), on_step=self._accept)
        except SlmopsError as exc:
            log.error("cannot walk from the stored trust root v%d to the provisioned v%d (%s); now trusting v%d",
                      stored.version, offered.version, exc, self._root.version)
            return self._root

    def _stored_root(self) -> Root | None:
        try:
            data = self.root_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("state file root.json is unreadable (%s); starting from the provisioned trust root", exc.strerror)
            return None
        try:
            return load_trusted_root(data)  # trusted once already: its expiry is checked when commands arrive
        except SlmopsError as exc:
            log.error("state file root.json is damaged (%s); starting from the provisioned trust root", exc)
            return None

    # -- the last accepted seq: two copies ----------------------------------------------------------------------
    def _read_seq(self) -> tuple[int, list[int]]:
        best: tuple[int, list[int]] = (0, [])
        readable = 0
        for path in self.seq_files:
            try:
                doc = read_json(path)
            except StateDamagedError as exc:
                log.error("%s; the other copy keeps the last command seq", exc)
                continue
            if doc is None:
                continue
            seq, recent = _valid_seq(doc)
            if seq is None:
                log.error("state file %s does not hold a command seq; the other copy keeps it", path.name)
                continue
            readable += 1
            if seq > best[0]:
                best = (seq, recent)
        if readable == 0 and any(p.exists() for p in self.seq_files):
            log.error("both copies of the last command seq are damaged; older commands are no longer told apart")
        return best

    def _write_seq(self, seq: int, recent: list[int]) -> None:
        for path in self.seq_files:
            write_json_atomic(path, {"seq": seq, "recent": recent})


def _valid_seq(doc: object) -> tuple[int | None, list[int]]:
    if not isinstance(doc, dict):
        return None, []
    seq, recent = doc.get("seq"), doc.get("recent", [])
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_VERSION:
        return None, []
    if not isinstance(recent, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in recent):
        recent = []
    return seq, recent[-RECENT:]

