"""The bundle container: one uncompressed tar file that a device downloads.

Layout (member order is fixed):
    manifest.json          the signed envelope (see protocol.trust)
    model/<path>           each file the manifest names, exactly as onnxruntime-genai loads the folder

int4 weights barely compress, so the tar is uncompressed: a device can hash while it reads, and Range requests
resume at any byte. This module works over binary streams the caller opens; it never opens a file or a socket.

Workflow: the fleet calls `write_bundle`; a device calls `read_envelope`, verifies it with `protocol.trust`, then
`unpack(..., sink=...)`, which checks every member against the verified manifest while it streams.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable, Iterable
from typing import BinaryIO

from .errors import ManifestError, MissingFileError, UnexpectedFileError
from .manifest import Manifest
from .trust import MAX_ENVELOPE_BYTES, check_file

ENVELOPE_NAME = "manifest.json"
MODEL_DIR = "model"
CHUNK = 1 << 20  # bytes read at a time while hashing


def write_bundle(out: BinaryIO, envelope: bytes, files: Iterable[tuple[str, BinaryIO, int]]) -> None:
    """Write the envelope, then each (relative path, open stream, size) under model/."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(ENVELOPE_NAME, len(envelope)), io.BytesIO(envelope))
        for path, stream, size in files:
            tar.addfile(_info(f"{MODEL_DIR}/{path}", size), stream)


def read_envelope(fileobj: BinaryIO) -> bytes:
    """Return the envelope bytes from the start of a bundle stream (the stream is read ahead; reopen or seek(0) to unpack)."""
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|")
        first = tar.next()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ManifestError(f"not a slmops bundle (tar) file: {exc}") from exc
    if first is None or first.name != ENVELOPE_NAME or not first.isfile():
        raise ManifestError(f"bundle must start with {ENVELOPE_NAME}; found {first.name if first else 'nothing'}")
    if first.size > MAX_ENVELOPE_BYTES:
        raise ManifestError(f"{ENVELOPE_NAME} is {first.size} bytes, over the {MAX_ENVELOPE_BYTES} byte limit")
    f = tar.extractfile(first)
    assert f is not None
    return f.read()


def unpack(fileobj: BinaryIO, manifest: Manifest, sink: Callable[[str], BinaryIO] | None = None) -> None:
    """Stream every model file out of the bundle, checking it against the verified manifest.

    `sink(path)` returns a writable stream for a file (closed by this function); with no sink the files are
    only checked. Raises on any file the manifest does not name, a size or digest mismatch, a duplicate, a link
    or other special member, or a named file that is missing.
    """
    seen: set[str] = set()
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|")
        for member in tar:
            if member.name == ENVELOPE_NAME and not seen:
                continue
            path = _model_path(member.name)
            entry = manifest.file(path) if path else None
            if entry is None or not member.isfile():
                raise UnexpectedFileError(f"bundle member {member.name!r} is not a file named by the manifest")
            if path in seen:
                raise UnexpectedFileError(f"bundle holds {path!r} twice")
            seen.add(path)
            src = tar.extractfile(member)
            assert src is not None
            out = sink(path) if sink else None
            try:
                digest, size = hashlib.sha256(), 0
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
            finally:
                if out is not None:
                    out.close()
            check_file(entry, size, digest.hexdigest())
    except (tarfile.TarError, EOFError) as exc:
        raise ManifestError(f"bundle file is damaged or cut short: {exc}") from exc
    missing = [f.path for f in manifest.files if f.path not in seen]
    if missing:
        raise MissingFileError(f"bundle lacks {len(missing)} file(s) the manifest names: {', '.join(missing[:5])}")


def file_sha256(stream: BinaryIO) -> tuple[str, int]:
    """sha256 hex digest and size of a stream read to its end."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        size += len(chunk)
        digest.update(chunk)
    return digest.hexdigest(), size


def _model_path(name: str) -> str | None:
    prefix = MODEL_DIR + "/"
    return name[len(prefix):] if name.startswith(prefix) and len(name) > len(prefix) else None


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # reproducible bundles: same inputs, same bytes
    return info
