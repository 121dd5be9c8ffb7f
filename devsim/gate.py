"""The simulator's command gate: `agent.commands.CommandGate`'s checks, with its state in memory.

Workflow: one `Trust` per process holds the trust root (root.json bytes, verified against its own root role and
expiry at start, as a device's first start does) and the allowed bundle origins; `Trust.check(cmd)` refuses a
command signed under a newer root (the simulator cannot fetch roots: `root_unavailable`), one whose root expired,
a bad signature (`forged`) and a bundle URL off every origin (`wrong_origin`). Each device keeps a `SeqGuard`:
a seq accepted recently is a replay (`replayed`), one not above the last accepted is `reordered`. Refusals are
counted by the caller, never acted on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from urllib.parse import urlsplit

from protocol.errors import ConfigError, SignatureError, SlmopsError
from protocol.messages import CancelCommand, DeployCommand
from protocol.root import Root, load_trusted_root
from protocol.trust import verify_message

RECENT = 64  # accepted seqs remembered per device (as the agent does)
PORTS = {"http": 80, "https": 443}


def parse_origin(origin: str) -> tuple[str, str, int]:
    u = urlsplit(origin)
    try:
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"bundle origin {origin[:120]!r} has a bad port") from exc
    if u.scheme not in PORTS or not u.hostname or u.username or u.query or u.fragment or u.path not in ("", "/"):
        raise ConfigError(f"bundle origin {origin[:120]!r} must be http(s)://host[:port], like the fleet's URL")
    return u.scheme, u.hostname.lower(), port or PORTS[u.scheme]


def on_origin(url: str, origins: Sequence[tuple[str, str, int]]) -> bool:
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return False
    if u.scheme not in PORTS or not u.hostname or u.username or u.password or u.query or u.fragment:
        return False
    if (u.scheme, u.hostname.lower(), port or PORTS[u.scheme]) not in origins:
        return False
    parts = u.path.split("/")
    return u.path.startswith("/api/v1/bundles/") and not any(p in (".", "..") for p in parts)


class Trust:
    """The trust root and bundle origins every simulated device shares."""

    def __init__(self, root_json: bytes, origins: Sequence[str] = (),
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        try:
            self.root: Root = load_trusted_root(root_json, clock())
        except SlmopsError as exc:
            raise ConfigError(f"trust root is not usable: {exc}") from exc
        self.keyring = self.root.keyring("commands")
        self.origins = tuple(parse_origin(o) for o in origins)
        self.clock = clock

    def check(self, cmd: DeployCommand | CancelCommand) -> str | None:
        """None when the command's signature, root and origin pass; else the reason it is dropped."""
        if cmd.root_version > self.root.version or self.root.is_expired(self.clock()):
            return "root_unavailable"
        try:
            verify_message(cmd, self.keyring)
        except SignatureError:
            return "forged"
        if isinstance(cmd, DeployCommand) and self.origins and not on_origin(cmd.bundle.url, self.origins):
            return "wrong_origin"
        return None


class SeqGuard:
    """One device's last accepted command seq and the recent ones."""

    __slots__ = ("last", "recent")

    def __init__(self) -> None:
        self.last = 0
        self.recent: deque[int] = deque(maxlen=RECENT)

    def admit(self, seq: int) -> str | None:
        if seq in self.recent:
            return "replayed"
        if seq <= self.last:
            return "reordered"
        self.last = seq
        self.recent.append(seq)
        return None
