"""Keys, signatures and verification as pure functions over bytes.

The envelope is TUF-shaped: `{"signed": <manifest>, "signatures": [{"keyid": ..., "sig": ...}]}` where each `sig`
is a hex Ed25519 signature over `canonical_bytes(signed)` and `keyid` is the sha256 of the raw public key.

Workflow:
- publisher: `generate_keypair()` once; `sign_envelope(manifest, [private_key])` -> envelope bytes.
- device: `verify_envelope(data, keyring, now=..., min_version=...)` -> `Manifest`, then `check_file(entry, size,
  sha256)` for every file it unpacks. Nothing here reads a clock, a file or a socket: callers pass them in.
- commands: the fleet `sign_message(cmd, [command_key])`; the device `verify_message(cmd, keyring)` with the
  commands keyring of its trust root (`protocol.root`); the signatures cover `msg.signing_bytes()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import (
    BadVersionNumberError,
    ConfigError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    ManifestError,
    SignatureError,
)
from .jsonbytes import load_bounded
from .manifest import FileEntry, Manifest, canonical_bytes

if TYPE_CHECKING:
    from .messages import _Message

_M = TypeVar("_M", bound="_Message")
MAX_ENVELOPE_BYTES = 1 << 20  # bytes: a manifest larger than 1 MiB is refused unparsed


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key and its key id."""

    key: Ed25519PublicKey = field(repr=False, compare=False)
    keyid: str

    @classmethod
    def from_pem(cls, pem: bytes) -> "PublicKey":
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"not a PEM public key: {exc}. Use a .pub file made by 'slmops keys generate'.") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("public key is not Ed25519; slmops signs bundles with Ed25519 keys only")
        return cls(key=key, keyid=key_id(key))

    def to_pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class PrivateKey:
    """An Ed25519 signing key and the key id of its public half."""

    key: Ed25519PrivateKey = field(repr=False, compare=False)
    keyid: str

    @classmethod
    def from_pem(cls, pem: bytes) -> "PrivateKey":
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"not an unencrypted PEM private key: {exc}. Use a .key file made by 'slmops keys generate'.") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("private key is not Ed25519; slmops signs bundles with Ed25519 keys only")
        return cls(key=key, keyid=key_id(key.public_key()))

    @property
    def public(self) -> PublicKey:
        return PublicKey(key=self.key.public_key(), keyid=self.keyid)

    def to_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


@dataclass(frozen=True)
class Keyring:
    """The keys a device trusts and how many distinct ones must sign (threshold)."""

    keys: tuple[PublicKey, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ConfigError("threshold must be at least 1")
        if len({k.keyid for k in self.keys}) < self.threshold:
            raise ConfigError(f"threshold {self.threshold} needs at least that many distinct trusted keys")


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair() -> PrivateKey:
    key = Ed25519PrivateKey.generate()
    return PrivateKey(key=key, keyid=key_id(key.public_key()))


def sign_envelope(manifest: Manifest, signers: Sequence[PrivateKey]) -> bytes:
    """Sign a manifest with each key; return the envelope as canonical JSON bytes."""
    if not signers:
        raise ConfigError("at least one signing key is needed")
    signed = manifest.to_signed()
    payload = canonical_bytes(signed)
    sigs = [{"keyid": k.keyid, "sig": k.key.sign(payload).hex()} for k in signers]
    return canonical_bytes({"signed": signed, "signatures": sigs})


def add_signatures(envelope: bytes, signers: Iterable[PrivateKey]) -> bytes:
    """Add signatures to an existing envelope (replacing earlier ones by the same key)."""
    doc = _parse_envelope(envelope)
    payload = canonical_bytes(doc["signed"])
    by_id = {s["keyid"]: s for s in doc["signatures"] if isinstance(s, dict) and "keyid" in s}
    for k in signers:
        by_id[k.keyid] = {"keyid": k.keyid, "sig": k.key.sign(payload).hex()}
    return canonical_bytes({"signed": doc["signed"], "signatures": sorted(by_id.values(), key=lambda s: s["keyid"])})


def read_unverified(envelope: bytes) -> Manifest:
    """Parse the manifest without checking signatures: for display and packing only, never for trust."""
    return Manifest.from_signed(_parse_envelope(envelope)["signed"])


def verify_envelope(
    envelope: bytes,
    keyring: Keyring,
    *,
    now: datetime | None = None,
    min_version: int | None = None,
) -> Manifest:
    """Check signatures (threshold of distinct trusted keys), then schema, expiry and version floor."""
    doc = _parse_envelope(envelope)
    payload = canonical_bytes(doc["signed"])
    trusted = {k.keyid: k for k in keyring.keys}
    good: set[str] = set()
    unknown: list[str] = []
    for s in doc["signatures"]:
        if not isinstance(s, dict) or not isinstance(s.get("keyid"), str) or not isinstance(s.get("sig"), str):
            continue
        key = trusted.get(s["keyid"])
        if key is None:
            unknown.append(s["keyid"][:12])
            continue
        try:
            key.key.verify(bytes.fromhex(s["sig"]), payload)
        except (InvalidSignature, ValueError):
            continue
        good.add(s["keyid"])
    if len(good) < keyring.threshold:
        hint = f"; signed by untrusted key(s) {', '.join(unknown)}" if unknown else ""
        raise SignatureError(
            f"manifest has {len(good)} valid signature(s) from trusted keys, {keyring.threshold} needed{hint}. "
            "The bundle was changed after signing or signed with a key this device does not trust."
        )
    manifest = Manifest.from_signed(doc["signed"])
    if now is not None and manifest.is_expired(now):
        raise ExpiredMetadataError(
            f"bundle {manifest.name} v{manifest.version} expired at {manifest.expires.isoformat()}; re-sign it with a later expiry"
        )
    if min_version is not None and manifest.version < min_version:
        raise BadVersionNumberError(
            f"bundle {manifest.name} v{manifest.version} is older than v{min_version} already trusted on this device; "
            "publish the model again with a higher version"
        )
    return manifest


def sign_message(msg: _M, signers: Sequence[PrivateKey]) -> _M:
    """A copy of `msg` carrying one signature per key over its `signing_bytes()` (earlier signatures replaced)."""
    from .messages import Signature

    if not signers:
        raise ConfigError("at least one signing key is needed")
    payload = msg.signing_bytes()
    by_id = {k.keyid: k for k in signers}
    sigs = tuple(Signature(keyid=i, sig=by_id[i].key.sign(payload).hex()) for i in sorted(by_id))
    return msg.model_copy(update={"signatures": sigs})


def verify_message(msg: _Message, keyring: Keyring) -> None:
    """SignatureError unless a threshold of distinct keys of `keyring` signed `msg` as it is now."""
    payload = msg.signing_bytes()
    trusted = {k.keyid: k for k in keyring.keys}
    good: set[str] = set()
    for s in msg.signatures:
        key = trusted.get(s.keyid)
        if key is None or s.keyid in good:
            continue
        try:
            key.key.verify(bytes.fromhex(s.sig), payload)
        except (InvalidSignature, ValueError):
            continue
        good.add(s.keyid)
    if len(good) < keyring.threshold:
        raise SignatureError(
            f"{getattr(msg, 'kind', 'message')} {msg.message_id[:32]} has {len(good)} valid signature(s) from the "
            f"trusted command key(s), {keyring.threshold} needed: not sent by this device's fleet, or changed on the way"
        )


def check_file(entry: FileEntry, size: int, sha256: str) -> None:
    """Raise unless a file's measured size and digest match its manifest entry."""
    if size != entry.size:
        raise LengthOrHashMismatchError(f"{entry.path}: size {size} bytes, manifest says {entry.size}")
    if sha256 != entry.sha256:
        raise LengthOrHashMismatchError(f"{entry.path}: sha256 {sha256[:16]}... differs from the signed {entry.sha256[:16]}...")


def _parse_envelope(envelope: bytes) -> dict:
    doc = load_bounded(envelope, limit=MAX_ENVELOPE_BYTES, error=ManifestError, what="manifest envelope")
    if not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict) or not isinstance(doc.get("signatures"), list):
        raise ManifestError('manifest envelope must be {"signed": {...}, "signatures": [...]}')
    return doc
