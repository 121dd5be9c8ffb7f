"""The trust root, in the manner of TUF: which keys sign bundles, commands and the next root, and how many must.

The envelope is shaped like a bundle's manifest envelope:

    {"signed": {"_type": "root", "spec_version": 1, "version": N, "expires": "2027-01-01T00:00:00Z",
                "keys": {keyid: {"keytype": "ed25519", "public": <64 hex digits, the raw public key>}},
                "roles": {"root": {"keyids": [...], "threshold": t}, "bundles": {...}, "commands": {...}},
                "revoked": [keyid, ...]},
     "signatures": [{"keyid": ..., "sig": <128 hex digits>}]}

Each `sig` is Ed25519 over `canonical_bytes(signed)`; a key id is the sha256 of the raw public key, and the parser
checks that every listed key id is its key's.

Workflow (the device's side; python-tuf's trusted-metadata set is the model):
- provisioning: `load_trusted_root(data, now)` checks the root a device is given against its OWN root role;
- rotation: `verify_next_root(trusted, data)` accepts version `trusted.version + 1` only, signed by a threshold of
  the trusted root's root role AND of the new root's root role; a key revoked in the trusted root never counts, must
  stay in `revoked` and may not come back into `keys` or a role;
- a device that missed rotations: `walk_chain(trusted, fetch, now=...)` asks `fetch(n)` for n = version+1, +2, ...
  until it answers None, verifying each step (an intermediate root's expiry does not matter, as in TUF) and checks
  that the last one has not expired;
- `Root.keyring("bundles" | "commands")` is the `protocol.trust.Keyring` bundles and commands are checked with.
The publisher's side: `root_signed(...)` builds and checks a `signed` document, `sign_root(signed, keys)` makes
the envelope. Nothing here reads a clock, a file or a socket: callers pass `now` and a `fetch` function.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import (
    BadVersionNumberError,
    ConfigError,
    ExpiredMetadataError,
    RootError,
    SignatureError,
    SlmopsError,
    clip,
)
from .jsonbytes import load_bounded
from .manifest import KEYID_RE, MAX_VERSION, canonical_bytes
from .trust import Keyring, PrivateKey, PublicKey, key_id

ROOT_TYPE = "root"
SPEC_VERSION = 1
ROLES = ("root", "bundles", "commands")  # every root names exactly these roles
MAX_ROOT_BYTES = 128 * 1024  # bytes: a larger root document is refused unparsed
MAX_KEYS = 64  # keys listed in one root
MAX_ROLE_KEYS = 16  # key ids in one role (so a threshold is at most 16)
MAX_REVOKED = 1024  # revoked key ids carried by one root
MAX_SIGNATURES = 64  # signatures on one root
MAX_ROOT_STEPS = 64  # rotations walked in one `walk_chain` call
EXPIRES_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")  # always with fullmatch
PUBLIC_RE = re.compile(r"[0-9a-f]{64}")  # a raw Ed25519 public key, hex
SIG_RE = re.compile(r"[0-9a-f]{128}")  # an Ed25519 signature, hex


@dataclass(frozen=True)
class Role:
    """The keys of one role and how many distinct ones must sign."""

    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class Root:
    """A parsed root whose signatures were checked by whoever made it (never built by hand from outside data)."""

    version: int
    expires: datetime
    keys: Mapping[str, PublicKey] = field(repr=False)
    roles: Mapping[str, Role]
    revoked: frozenset[str]
    raw: bytes = field(repr=False)  # the envelope as received: what a device stores and the fleet serves

    def keyring(self, role: str) -> Keyring:
        """The keys of `role` ("root", "bundles" or "commands") with its threshold."""
        r = self.roles[role]
        return Keyring(tuple(self.keys[k] for k in r.keyids), r.threshold)

    def is_expired(self, now: datetime) -> bool:
        return now >= self.expires

    def signed(self) -> dict[str, Any]:
        """A copy of the signed document (to build the next root from)."""
        return json.loads(self.raw)["signed"]


@dataclass(frozen=True)
class _Parsed:
    root: Root
    payload: bytes  # canonical bytes of "signed": what each signature covers
    sigs: tuple[tuple[str, bytes], ...]  # (keyid, signature), as listed


# ---- building and signing (the publisher's side) ---------------------------------------------------------------


def public_hex(key: PublicKey) -> str:
    """The raw Ed25519 public key as 64 hex digits, as a root lists it."""
    return key.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def expires_text(when: datetime) -> str:
    """An aware datetime as the root's expiry text (UTC, whole seconds, 'Z')."""
    if when.tzinfo is None:
        raise ConfigError("a root's expiry needs a timezone (use UTC)")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def root_signed(
    *,
    version: int,
    expires: datetime,
    keys: Iterable[PublicKey],
    roles: Mapping[str, tuple[Sequence[str], int]],
    revoked: Iterable[str] = (),
) -> dict[str, Any]:
    """A root's `signed` document, checked by the same rules a device applies (RootError when one is broken)."""
    doc = {
        "_type": ROOT_TYPE,
        "spec_version": SPEC_VERSION,
        "version": version,
        "expires": expires_text(expires),
        "keys": {k.keyid: {"keytype": "ed25519", "public": public_hex(k)} for k in keys},
        "roles": {name: {"keyids": list(ids), "threshold": t} for name, (ids, t) in roles.items()},
        "revoked": sorted(set(revoked)),
    }
    _parse_signed(doc, b"")
    return doc


def sign_root(signed: Mapping[str, Any], signers: Sequence[PrivateKey]) -> bytes:
    """The root envelope (canonical JSON bytes) for a checked `signed` document, signed by each key."""
    if not signers:
        raise ConfigError("a root needs at least one signature")
    _parse_signed(dict(signed), b"")
    payload = _canonical(dict(signed))
    by_id = {k.keyid: k for k in signers}
    sigs = [{"keyid": i, "sig": by_id[i].key.sign(payload).hex()} for i in sorted(by_id)]
    data = canonical_bytes({"signed": dict(signed), "signatures": sigs})
    if len(data) > MAX_ROOT_BYTES:
        raise RootError(f"the signed root is {len(data)} bytes, over the {MAX_ROOT_BYTES} byte limit; list fewer keys")
    return data


# ---- verifying (the device's side) ------------------------------------------------------------------------------


def parse_root(data: bytes) -> Root:
    """Parse a root WITHOUT checking its signatures: for display only, never for trust."""
    return _parse(data).root


def load_trusted_root(data: bytes, now: datetime | None = None) -> Root:
    """A root a device is provisioned with (or stored itself): signed by a threshold of its own root role, and not
    expired at `now` when `now` is given."""
    p = _parse(data)
    _require(p, p.root.roles["root"], p.root.keys, p.root.revoked, "its own root role")
    if now is not None and p.root.is_expired(now):
        raise ExpiredMetadataError(
            f"trust root v{p.root.version} expired at {expires_text(p.root.expires)}; provision a current root.json"
        )
    return p.root


def verify_next_root(trusted: Root, data: bytes) -> Root:
    """The root that follows `trusted`, or the typed error that says why it may not (the trusted root stays)."""
    p = _parse(data)
    new = p.root
    banned = trusted.revoked
    _require(p, trusted.roles["root"], trusted.keys, banned, f"the trusted root v{trusted.version}'s root role")
    if new.version != trusted.version + 1:
        raise BadVersionNumberError(
            f"trust root v{new.version} does not follow the trusted v{trusted.version} (expected v{trusted.version + 1})"
        )
    back = sorted(banned & (set(new.keys) | {k for r in new.roles.values() for k in r.keyids}))
    if back:
        raise RootError(f"trust root v{new.version} brings back revoked key {back[0][:16]}; a revoked key never returns")
    if not banned <= new.revoked:
        lost = sorted(banned - new.revoked)[0]
        raise RootError(f"trust root v{new.version} drops revoked key {lost[:16]} from its revoked list; keep it there")
    _require(p, new.roles["root"], new.keys, banned | new.revoked, "its own root role")
    return new


def walk_chain(
    trusted: Root,
    fetch: Callable[[int], bytes | None],
    *,
    now: datetime,
    max_steps: int = MAX_ROOT_STEPS,
    on_step: Callable[[Root], None] | None = None,
) -> Root:
    """Follow rotations from `trusted`: fetch(n) for n = version+1, ... until it answers None (or `max_steps`).

    Each accepted root is handed to `on_step` before the next is fetched (a device stores it, as TUF does, so the
    progress survives a later failure). The last root must not have expired at `now`."""
    current = trusted
    for _ in range(max_steps):
        data = fetch(current.version + 1)
        if data is None:
            break
        current = verify_next_root(current, data)
        if on_step is not None:
            on_step(current)
    if current.is_expired(now):
        raise ExpiredMetadataError(
            f"trust root v{current.version} expired at {expires_text(current.expires)} and no newer root is "
            "published; the fleet must sign a new root (slmops keys rotate)"
        )
    return current


# ---- parsing ----------------------------------------------------------------------------------------------------


def _require(p: _Parsed, role: Role, keys: Mapping[str, PublicKey], banned: frozenset[str], whose: str) -> None:
    good: set[str] = set()
    for keyid, sig in p.sigs:
        key = keys.get(keyid)
        if keyid not in role.keyids or keyid in banned or keyid in good or key is None:
            continue
        try:
            key.key.verify(sig, p.payload)
        except InvalidSignature:
            continue
        good.add(keyid)
    if len(good) < role.threshold:
        raise SignatureError(
            f"trust root v{p.root.version} has {len(good)} valid signature(s) from {whose}, {role.threshold} needed; "
            "it was changed after signing or not signed by enough of those keys"
        )


def _parse(data: bytes) -> _Parsed:
    if not isinstance(data, (bytes, bytearray)):
        raise RootError("a trust root must be bytes")
    doc = load_bounded(bytes(data), limit=MAX_ROOT_BYTES, error=RootError, what="trust root")
    if not isinstance(doc, dict) or set(doc) != {"signed", "signatures"}:
        raise RootError('trust root must be {"signed": {...}, "signatures": [...]} and nothing else')
    sigs = doc["signatures"]
    if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES:
        raise RootError(f"trust root signatures must be a list of at most {MAX_SIGNATURES}")
    parsed_sigs = []
    for s in sigs:
        if not isinstance(s, dict) or set(s) != {"keyid", "sig"}:
            raise RootError('each trust root signature must be {"keyid": ..., "sig": ...}')
        keyid = _keyid(s["keyid"], "signature key id")
        if not isinstance(s["sig"], str) or not SIG_RE.fullmatch(s["sig"]):
            raise RootError(f"signature {clip(s['sig'])} is not 128 lowercase hex digits")
        parsed_sigs.append((keyid, bytes.fromhex(s["sig"])))
    payload = _canonical(doc["signed"])
    root = _parse_signed(doc["signed"], bytes(data))
    return _Parsed(root, payload, tuple(parsed_sigs))


def _canonical(signed: object) -> bytes:
    try:
        return canonical_bytes(signed)
    except SlmopsError as exc:
        raise RootError(f"trust root cannot be written as canonical JSON: {exc}") from exc


def _parse_signed(s: object, raw: bytes) -> Root:
    want = {"_type", "spec_version", "version", "expires", "keys", "roles", "revoked"}
    if not isinstance(s, dict) or set(s) != want:
        got = sorted(str(k)[:20] for k in s)[:10] if isinstance(s, dict) else type(s).__name__
        raise RootError(f"a root's signed part must hold exactly {sorted(want)}; it holds {got}")
    if s["_type"] != ROOT_TYPE:
        raise RootError(f"_type {clip(s['_type'])} is not 'root'")
    if s["spec_version"] != SPEC_VERSION or isinstance(s["spec_version"], bool):
        raise RootError(f"spec_version {clip(s['spec_version'])} is not supported (this release reads {SPEC_VERSION})")
    version = s["version"]
    if not isinstance(version, int) or isinstance(version, bool) or not 0 < version <= MAX_VERSION:
        raise RootError(f"root version {clip(version)} is not a whole number from 1 to {MAX_VERSION}")
    expires = _expires(s["expires"])
    keys = _keys(s["keys"])
    revoked = s["revoked"]
    if not isinstance(revoked, list) or len(revoked) > MAX_REVOKED:
        raise RootError(f"revoked must be a list of at most {MAX_REVOKED} key ids")
    revoked_ids = [_keyid(k, "revoked key id") for k in revoked]
    if len(set(revoked_ids)) != len(revoked_ids):
        raise RootError("revoked lists a key id twice")
    roles = s["roles"]
    if not isinstance(roles, dict) or set(roles) != set(ROLES):
        raise RootError(f"roles must be exactly {list(ROLES)}")
    parsed_roles = {name: _role(name, roles[name], keys, frozenset(revoked_ids)) for name in ROLES}
    return Root(version=version, expires=expires, keys=MappingProxyType(keys),
                roles=MappingProxyType(parsed_roles), revoked=frozenset(revoked_ids), raw=raw)


def _keyid(value: object, what: str) -> str:
    if not isinstance(value, str) or not KEYID_RE.fullmatch(value):
        raise RootError(f"{what} {clip(value)} is not 64 lowercase hex digits")
    return value


def _expires(value: object) -> datetime:
    if not isinstance(value, str) or not EXPIRES_RE.fullmatch(value):
        raise RootError(f"expires {clip(value)} is not a UTC time like 2027-01-01T00:00:00Z")
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError as exc:
        raise RootError(f"expires {clip(value)} is not a real date and time") from exc


def _keys(value: object) -> dict[str, PublicKey]:
    if not isinstance(value, dict) or not 0 < len(value) <= MAX_KEYS:
        raise RootError(f"keys must be an object of 1 to {MAX_KEYS} keys")
    keys = {}
    for keyid, spec in value.items():
        _keyid(keyid, "key id")
        if not isinstance(spec, dict) or set(spec) != {"keytype", "public"}:
            raise RootError(f'key {keyid[:16]} must be {{"keytype": "ed25519", "public": <64 hex digits>}}')
        if spec["keytype"] != "ed25519":
            raise RootError(f"key {keyid[:16]} has keytype {clip(spec['keytype'])}; only ed25519 is supported")
        if not isinstance(spec["public"], str) or not PUBLIC_RE.fullmatch(spec["public"]):
            raise RootError(f"key {keyid[:16]}: public {clip(spec['public'])} is not 64 lowercase hex digits")
        try:
            public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(spec["public"]))
        except ValueError as exc:
            raise RootError(f"key {keyid[:16]} is not an Ed25519 public key") from exc
        if key_id(public) != keyid:
            raise RootError(f"key id {keyid[:16]} is not the sha256 of its public key")
        keys[keyid] = PublicKey(key=public, keyid=keyid)
    return keys


def _role(name: str, value: object, keys: Mapping[str, PublicKey], revoked: frozenset[str]) -> Role:
    if not isinstance(value, dict) or set(value) != {"keyids", "threshold"}:
        raise RootError(f'role {name} must be {{"keyids": [...], "threshold": n}}')
    ids, threshold = value["keyids"], value["threshold"]
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_ROLE_KEYS:
        raise RootError(f"role {name} must list 1 to {MAX_ROLE_KEYS} key ids")
    keyids = tuple(_keyid(k, f"role {name} key id") for k in ids)
    if len(set(keyids)) != len(keyids):
        raise RootError(f"role {name} lists a key id twice")
    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 0 < threshold <= len(keyids):
        raise RootError(f"role {name} threshold {clip(threshold)} must be from 1 to its {len(keyids)} key(s)")
    for k in keyids:
        if k in revoked:
            raise RootError(f"role {name} lists revoked key {k[:16]}; remove it from the role")
        if k not in keys:
            raise RootError(f"role {name} lists key {k[:16]}, which keys does not hold")
    return Role(keyids=keyids, threshold=threshold)
