"""The fleet's trust folder: its keys, the chain of signed roots, and the command signing that devices check.

Layout of a trust folder (made by `slmops keys init`, changed by `slmops keys rotate` and `revoke`):

    root.json                 the current root (a copy of the highest root/<n>.root.json)
    root/<n>.root.json        every root ever signed, served to devices at GET /api/v1/trust/root/{n}.json
    root-<id16>.key|.pub      root keys (sign the next root); keep them offline in production
    bundles-<id16>.key|.pub   bundle signing keys (`slmops bundle build --key ...`)
    commands.key|.pub         the current command key the fleet signs every command with
    commands-<id16>.key|.pub  earlier command keys, kept after a rotation

Workflow:
- `init_trust(dir, ...)`: new keys, root v1 signed by the root keys; `rotate_trust(dir, role=...)` and
  `revoke_key(dir, keyid)`: the next root, signed by the keys of the old root's root role AND the new one's (each
  result is checked with `protocol.root.verify_next_root` before it is written, so a device will accept it).
- the running fleet: `trust_for(settings)` loads the folder named by `settings.trust_dir` (verifying the whole chain
  and that commands.key is in the root's commands role) and reloads it when root.json or commands.key change, so a
  rotation takes effect without a restart; `FleetTrust.sign(cmd)` signs a command under the current root's version.
Private key files are created with mode 0600 (os.open), never overwritten.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from protocol.errors import ConfigError, SlmopsError
from protocol.manifest import check_keyid
from protocol.messages import CancelCommand, DeployCommand
from protocol.root import (
    MAX_ROOT_BYTES,
    ROLES,
    Root,
    load_trusted_root,
    root_signed,
    sign_root,
    verify_next_root,
)
from protocol.trust import PrivateKey, Keyring, generate_keypair, sign_message

if TYPE_CHECKING:
    from .settings import Settings

_C = TypeVar("_C", DeployCommand, CancelCommand)
DEFAULT_ROOT_DAYS = 365  # days a new root is valid unless told otherwise
MAX_HISTORY = 10_000  # roots read from root/ at most


@dataclass(frozen=True)
class FleetTrust:
    """A loaded trust folder: the current root, every root by version, and the command key."""

    root: Root
    history: dict[int, bytes]
    command_key: PrivateKey

    def sign(self, cmd: _C) -> _C:
        """`cmd` under the current root's version, signed with the command key."""
        return sign_message(cmd.model_copy(update={"root_version": self.root.version}), [self.command_key])

    def root_bytes(self, version: int) -> bytes | None:
        return self.history.get(version)

    def upload_keyring(self) -> Keyring:
        return self.root.keyring("bundles")


# ---- loading (the running fleet) --------------------------------------------------------------------------------

_lock = threading.Lock()
_cache: dict[Path, tuple[tuple, FleetTrust]] = {}


def trust_for(settings: Settings) -> FleetTrust | None:
    """The trust folder of `settings.trust_dir` (None when unset), reloaded when root.json or commands.key change."""
    if settings.trust_dir is None:
        return None
    folder = Path(settings.trust_dir).resolve()
    stamp = _stamp(folder)
    with _lock:
        hit = _cache.get(folder)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        trust = load_trust(folder)
        _cache[folder] = (stamp, trust)
        return trust


def _stamp(folder: Path) -> tuple:
    out = []
    for name in ("root.json", "commands.key"):
        try:
            st = (folder / name).stat()
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def load_trust(folder: Path) -> FleetTrust:
    """Read and check a trust folder: the chain root/1..n verifies step by step, root.json is its last root, and
    commands.key is a key of that root's commands role. ConfigError says what is wrong."""
    history = _history(folder)
    try:
        current = load_trusted_root(history[1])
        for n in range(2, max(history) + 1):
            current = verify_next_root(current, history[n])
    except SlmopsError as exc:
        raise ConfigError(f"trust folder {folder}: the chain of roots in root/ does not verify: {exc}") from exc
    if _read(folder / "root.json") != history[current.version]:
        raise ConfigError(f"trust folder {folder}: root.json is not root/{current.version}.root.json; copy it back")
    key = _private(folder / "commands.key")
    if key.keyid not in current.roles["commands"].keyids:
        raise ConfigError(f"trust folder {folder}: commands.key ({key.keyid[:16]}) is not in root v{current.version}'s "
                          "commands role; run 'slmops keys rotate --role commands'")
    return FleetTrust(root=current, history=history, command_key=key)


def read_root(path: Path) -> Root:
    """The current root of a trust folder, or a root.json file, verified against its own root role."""
    path = Path(path)
    file = path / "root.json" if path.is_dir() else path
    try:
        return load_trusted_root(_read(file))
    except SlmopsError as exc:
        raise ConfigError(f"{file}: {exc}") from exc


def _history(folder: Path) -> dict[int, bytes]:
    roots = folder / "root"
    names = sorted(roots.glob("*.root.json")) if roots.is_dir() else []
    history: dict[int, bytes] = {}
    for p in names[:MAX_HISTORY]:
        stem = p.name[: -len(".root.json")]
        if stem.isdigit() and not stem.startswith("0") and len(stem) <= 19:
            history[int(stem)] = _read(p)
    if not history or 1 not in history or sorted(history) != list(range(1, max(history) + 1)):
        raise ConfigError(f"trust folder {folder}: root/ must hold 1.root.json ... n.root.json without gaps; "
                          "make one with 'slmops keys init'")
    return history


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_ROOT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_ROOT_BYTES:
        raise ConfigError(f"{path} is over {MAX_ROOT_BYTES} bytes; not a root")
    return data


def _private(path: Path) -> PrivateKey:
    try:
        return PrivateKey.from_pem(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


# ---- changing a trust folder (slmops keys) ----------------------------------------------------------------------


def write_key(folder: Path, stem: str, key: PrivateKey) -> Path:
    """stem.key (PKCS8 PEM, created 0600, never overwritten) and stem.pub; the .key path."""
    key_path, pub_path = folder / f"{stem}.key", folder / f"{stem}.pub"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.to_pem())
    pub_path.write_bytes(key.public.to_pem())
    return key_path


def init_trust(
    folder: Path,
    *,
    now: datetime,
    root_keys: int = 1,
    root_threshold: int = 1,
    bundle_keys: int = 1,
    bundle_threshold: int = 1,
    expires_in_days: int = DEFAULT_ROOT_DAYS,
) -> Root:
    """New root, bundle and command keys in `folder` (which must not hold a root yet) and root v1."""
    folder = Path(folder)
    if (folder / "root.json").exists() or (folder / "root").exists():
        raise ConfigError(f"{folder} already holds a trust root; use 'slmops keys rotate' to change it")
    for n, t, what in ((root_keys, root_threshold, "root"), (bundle_keys, bundle_threshold, "bundle")):
        if not 1 <= t <= n <= 16:
            raise ConfigError(f"{what} keys: need 1 <= threshold ({t}) <= keys ({n}) <= 16")
    folder.mkdir(parents=True, exist_ok=True)
    roots = [generate_keypair() for _ in range(root_keys)]
    bundles = [generate_keypair() for _ in range(bundle_keys)]
    command = generate_keypair()
    for role, keys in (("root", roots), ("bundles", bundles)):
        for k in keys:
            write_key(folder, f"{role}-{k.keyid[:16]}", k)
    write_key(folder, "commands", command)
    signed = root_signed(
        version=1, expires=now + timedelta(days=expires_in_days), keys=[k.public for k in (*roots, *bundles, command)],
        roles={"root": ([k.keyid for k in roots], root_threshold),
               "bundles": ([k.keyid for k in bundles], bundle_threshold),
               "commands": ([command.keyid], 1)},
    )
    data = sign_root(signed, roots)
    load_trusted_root(data, now)
    return _publish(folder, 1, data)


def rotate_trust(
    folder: Path,
    *,
    role: str,
    now: datetime,
    new: int | None = None,
    remove: Sequence[str] = (),
    threshold: int | None = None,
    expires_in_days: int = DEFAULT_ROOT_DAYS,
) -> Root:
    """The next root: `new` fresh keys for `role` (default 1 unless keys are removed; the commands role always gets
    exactly one new key), `remove`d key ids out of the role, `threshold` if given."""
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}")
    folder = Path(folder)
    current = read_root(folder)
    signed = current.signed()
    ids = list(signed["roles"][role]["keyids"])
    for keyid in remove:
        check_keyid(keyid)
        if keyid not in ids:
            raise ConfigError(f"key {keyid[:16]} is not in role {role}; see 'slmops keys show'")
        ids.remove(keyid)
    fresh = [generate_keypair() for _ in range(1 if role == "commands" else (new if new is not None else 0 if remove else 1))]
    if role == "commands":
        ids = []
    ids += [k.keyid for k in fresh]
    t = threshold if threshold is not None else min(signed["roles"][role]["threshold"], len(ids))
    signed["roles"][role] = {"keyids": ids, "threshold": t}
    data = _next(folder, current, signed, fresh, now=now, days=expires_in_days)  # checked before anything is written
    if role == "commands" and (folder / "commands.key").exists():
        old_key = _private(folder / "commands.key")
        for ext in ("key", "pub"):
            os.replace(folder / f"commands.{ext}", folder / f"commands-{old_key.keyid[:16]}.{ext}")
    for k in fresh:
        write_key(folder, "commands" if role == "commands" else f"{role}-{k.keyid[:16]}", k)
    return _publish(folder, current.version + 1, data)


def revoke_key(folder: Path, keyid: str, *, now: datetime, expires_in_days: int = DEFAULT_ROOT_DAYS) -> Root:
    """The next root without `keyid` in any role or in keys, and with it in `revoked` for good."""
    check_keyid(keyid)
    folder = Path(folder)
    current = read_root(folder)
    signed = current.signed()
    if keyid not in signed["keys"] and keyid not in signed["revoked"]:
        raise ConfigError(f"key {keyid[:16]} is not in root v{current.version}; see 'slmops keys show'")
    for name, role in signed["roles"].items():
        if keyid in role["keyids"]:
            role["keyids"].remove(keyid)
            if len(role["keyids"]) < role["threshold"]:
                raise ConfigError(f"revoking {keyid[:16]} leaves role {name} {len(role['keyids'])} key(s) for threshold "
                                  f"{role['threshold']}; rotate a new key in first")
    signed["revoked"] = sorted({*signed["revoked"], keyid})
    return _publish(folder, current.version + 1, _next(folder, current, signed, [], now=now, days=expires_in_days))


def _next(folder: Path, current: Root, signed: dict, fresh: list[PrivateKey], *, now: datetime, days: int) -> bytes:
    """The next root's envelope, signed by every root key at hand (old role and new) and checked as a device would."""
    used = {k for r in signed["roles"].values() for k in r["keyids"]}
    pubs = {**dict(current.keys), **{k.keyid: k.public for k in fresh}}
    try:
        doc = root_signed(
            version=current.version + 1, expires=now + timedelta(days=days), keys=[pubs[k] for k in sorted(used)],
            roles={n: (r["keyids"], r["threshold"]) for n, r in signed["roles"].items()}, revoked=signed["revoked"],
        )
    except SlmopsError as exc:
        raise ConfigError(f"the next root would be invalid: {exc}") from exc
    wanted = set(current.roles["root"].keyids) | set(doc["roles"]["root"]["keyids"])
    signers = [k for k in [*_private_keys(folder), *fresh] if k.keyid in wanted and k.keyid not in current.revoked]
    if not signers:
        raise ConfigError(f"no root key of {folder} can sign the next root; put the root-*.key files back")
    data = sign_root(doc, signers)
    try:
        verify_next_root(current, data)
    except SlmopsError as exc:
        raise ConfigError(f"the next root would not be accepted by devices: {exc}; are the root-*.key files there?") from exc
    return data


def _private_keys(folder: Path) -> list[PrivateKey]:
    keys = []
    for p in sorted(folder.glob("*.key")):
        try:
            keys.append(PrivateKey.from_pem(p.read_bytes()))
        except (OSError, ConfigError):
            continue
    return keys


def _publish(folder: Path, version: int, data: bytes) -> Root:
    """Write root/<version>.root.json (never overwritten), then replace root.json atomically."""
    (folder / "root").mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "root" / f"{version}.root.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp = folder / ".root.json.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / "root.json")
    return load_trusted_root(data)
