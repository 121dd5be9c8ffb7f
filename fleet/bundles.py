"""Bundle packing, signing, verification and storage on the fleet side.

Workflow:
- pack: `build_bundle(model_dir, out, ...)` hashes every file of the exported onnxruntime-genai folder, reads the
  trainer's `eval.json` into the manifest (metrics, smoke prompts, and the held-out set it names, a file of the
  folder packed like the others, checked with `protocol.evalset` before anything is written), signs it (or leaves it unsigned when no key is given) and writes the
  bundle through a temp file; `sign_bundle(path, keys)` adds signatures to an existing bundle.
- check: `verify_bundle(path, keyring)` reads the envelope, checks its signatures, then checks every member's tar
  header against the signed manifest (plain file, exact path, declared size; see `protocol.bundle`) before it
  hashes a byte, and only then streams the whole file so every member's sha256 is compared with the manifest.
- keep: `BundleStore(data_dir)` holds `bundles/<name>/<version>.bundle`; uploads stream into `tmp/` first and are
  moved into place only after `verify_bundle` accepted them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydantic import BaseModel, ConfigDict, ValidationError

from protocol import bundle as container
from protocol.evalset import parse_items
from protocol.errors import (
    ConfigError,
    ExpiredMetadataError,
    IdentifierError,
    LengthOrHashMismatchError,
    ManifestError,
    SignatureError,
)
from protocol.manifest import (
    MAX_EVAL_SET_BYTES,
    EvalMetrics,
    FileEntry,
    HealthCheck,
    HeldoutSet,
    Manifest,
    SmokePrompt,
    Target,
    canonical_bytes,
    check_keyid,
    first_error,
)
from protocol.trust import Keyring, PrivateKey, add_signatures, read_unverified, verify_envelope

DEFAULT_EXPIRY_DAYS = 90  # days a bundle's signature is valid when its builder names no expiry
EVAL_FILE = "eval.json"  # written by the trainer beside the model; goes into the manifest, not the bundle


class _EvalFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str = ""
    metrics: dict[str, float] = {}
    smoke: list[SmokePrompt] = []
    heldout: HeldoutSet | None = None


def build_bundle(
    model_dir: Path,
    out_path: Path,
    *,
    name: str,
    version: int,
    signers: Sequence[PrivateKey],
    now: datetime,
    base_model: str = "",
    precision: str = "int4",
    expires: datetime | None = None,
    description: str = "",
    execution_provider: str = "cpu",
) -> Manifest:
    """Pack `model_dir` into `out_path`; with no signers the envelope carries no signature (sign it later). Without
    `expires` the manifest expires `DEFAULT_EXPIRY_DAYS` after `now` (every manifest carries an expiry)."""
    model_dir = Path(model_dir)
    expires = expires if expires is not None else now + timedelta(days=DEFAULT_EXPIRY_DAYS)
    if not model_dir.is_dir():
        raise ConfigError(f"model folder {model_dir} does not exist; pass the folder the trainer exported")
    paths = _model_files(model_dir)
    entries = [_hash_entry(model_dir, p) for p in paths]
    evaluation = _read_eval(model_dir / EVAL_FILE)
    try:
        manifest = Manifest(
            name=name,
            version=version,
            base_model=base_model,
            target=Target(precision=precision, execution_provider=execution_provider),
            files=tuple(entries),
            created=now,
            expires=expires,
            eval=EvalMetrics(dataset=evaluation.dataset, metrics=evaluation.metrics, heldout=evaluation.heldout),
            health=HealthCheck(prompts=tuple(evaluation.smoke)) if evaluation.smoke else HealthCheck(),
            description=description,
        )
    except ValidationError as exc:
        raise ManifestError(f"cannot build the manifest: {first_error(exc)}") from exc
    if evaluation.heldout is not None:  # refuse a set the devices would refuse, before anything is written
        with (model_dir / evaluation.heldout.file).open("rb") as f:
            parse_items(f.read(MAX_EVAL_SET_BYTES + 1))
    envelope = _envelope(manifest, signers)
    with _atomic_output(Path(out_path)) as out:
        _write(out, envelope, model_dir, manifest)
    return manifest


def sign_bundle(path: Path, signers: Sequence[PrivateKey]) -> Manifest:
    """Add signatures to a bundle in place (replacing any earlier signature by the same key)."""
    path = Path(path)
    with path.open("rb") as f:
        envelope = container.read_envelope(f)
        manifest = read_unverified(envelope)
        f.seek(0)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".sign-") as tmp:
            root = Path(tmp)
            container.unpack(f, manifest, sink=lambda p: _open_for_write(root / p))
            signed = add_signatures(envelope, signers)
            with _atomic_output(path) as out:
                _write(out, signed, root, manifest)
    return manifest


def verify_bundle(path: Path, keyring: Keyring | None, *, now: datetime | None = None) -> Manifest:
    """Check signatures (any signer when `keyring` is None, but at least one), expiry, every member's header, then
    every file's hash."""
    with Path(path).open("rb") as f:
        envelope = container.read_envelope(f)
        _envelope_doc(envelope)  # JSON that Python cannot build (deep nesting, huge numbers) is a ManifestError
        if keyring is None:
            manifest = read_unverified(envelope)
            if not signer_keyids(envelope):
                raise SignatureError(
                    f"bundle {manifest.name} v{manifest.version} carries no signature; sign it with 'slmops bundle sign'"
                )
            if now is not None and manifest.is_expired(now):
                raise ExpiredMetadataError(
                    f"bundle {manifest.name} v{manifest.version} expired at {manifest.expires}; build it again with a later expiry"
                )
        else:
            manifest = verify_envelope(envelope, keyring, now=now)
        f.seek(0)
        container.unpack(f, manifest)  # checks every member's header (a seekable file) before it hashes a byte
    return manifest


def signer_keyids(envelope: bytes) -> list[str]:
    """Key ids named by the envelope's signatures (signatures not checked; for display and records).

    Raises SignatureError when a signature names a key id that is not 64 lowercase hex digits."""
    doc = _envelope_doc(envelope)
    sigs = doc.get("signatures") if isinstance(doc, dict) else None
    if not isinstance(sigs, list):
        return []
    try:
        return sorted({check_keyid(s.get("keyid")) for s in sigs if isinstance(s, dict)})
    except IdentifierError as exc:
        raise SignatureError(f"bundle signature names a malformed key id: {exc}") from exc


def _envelope_doc(envelope: bytes) -> Any:
    try:
        return json.loads(envelope)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, int-digit limit, deep nesting
        raise ManifestError(f"manifest envelope is not JSON: {type(exc).__name__}: {str(exc)[:160]}") from exc


def read_bundle_envelope(path: Path) -> bytes:
    with Path(path).open("rb") as f:
        return container.read_envelope(f)


@dataclass
class Upload:
    """Bytes on their way into the store, hashed as they are written to a temp file."""

    path: Path
    file: BinaryIO
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0  # bytes written so far

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()

    def finish(self) -> None:
        """Flush to disk; call before reading the file back."""
        self.file.flush()
        os.fsync(self.file.fileno())


class BundleStore:
    """Bundle files under `<data_dir>/bundles/<name>/<version>.bundle`, moved into place atomically."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.tmp = self.root / "tmp"
        (self.root / "bundles").mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def relpath(name: str, version: int) -> str:
        return f"bundles/{name}/{version}.bundle"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    @contextmanager
    def incoming(self) -> Iterator[Upload]:
        """A temp file on the store's filesystem; removed on exit unless `commit` moved it into place."""
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".upload")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                yield Upload(path=path, file=f)
        finally:
            path.unlink(missing_ok=True)

    def commit(self, upload: Upload, *, name: str, version: int) -> str:
        """Move a verified upload to its final place; returns its path relative to the store."""
        upload.finish()
        rel = self.relpath(name, version)
        dest = self.path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(upload.path, dest)
        return rel


# ---- helpers ------------------------------------------------------------------------------------------------


def _model_files(model_dir: Path) -> list[str]:
    paths = sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and p.relative_to(model_dir).as_posix() != EVAL_FILE
    )
    if not paths:
        raise ConfigError(f"model folder {model_dir} holds no files besides {EVAL_FILE}")
    return paths


def _hash_entry(model_dir: Path, rel: str) -> FileEntry:
    with (model_dir / rel).open("rb") as f:
        sha256, size = container.file_sha256(f)
    try:
        return FileEntry(path=rel, size=size, sha256=sha256)
    except ValidationError as exc:
        raise ConfigError(f"cannot pack {model_dir / rel}: {first_error(exc)}") from exc


def _read_eval(path: Path) -> _EvalFile:
    if not path.exists():
        return _EvalFile()
    try:
        return _EvalFile.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ConfigError(
            f'{path} is not a valid eval file ({first_error(exc)}); expected {{"dataset": str, '
            '"metrics": {name: number}, "smoke": [{"prompt": str, "expect": regex}], "heldout": {"file": path, '
            '"metric": name, "min_score": number|null, "max_new_tokens": int, "match": "exact"|{"regex": str}}}'
        ) from exc


def _envelope(manifest: Manifest, signers: Sequence[PrivateKey]) -> bytes:
    unsigned = canonical_bytes({"signed": manifest.to_signed(), "signatures": []})
    return add_signatures(unsigned, signers) if signers else unsigned


class _HashingReader:
    """Passes reads through while hashing, so the bytes packed are the bytes the manifest names."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


def _write(out: BinaryIO, envelope: bytes, root: Path, manifest: Manifest) -> None:
    """Write the bundle, failing if a file changed between hashing and packing."""
    readers: list[tuple[FileEntry, _HashingReader]] = []

    def files() -> Iterator[tuple[str, BinaryIO, int]]:
        for entry in manifest.files:
            with (root / entry.path).open("rb") as raw:
                reader = _HashingReader(raw)
                readers.append((entry, reader))
                yield entry.path, cast(BinaryIO, reader), entry.size

    container.write_bundle(out, envelope, files())
    for entry, reader in readers:
        if (reader.size, reader.digest.hexdigest()) != (entry.size, entry.sha256):
            raise LengthOrHashMismatchError(f"{entry.path} changed while it was packed; build the bundle again")


def _open_for_write(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


@contextmanager
def _atomic_output(dest: Path) -> Iterator[BinaryIO]:
    """A temp file beside `dest`, fsynced and moved over it on success, removed on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, dest)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
