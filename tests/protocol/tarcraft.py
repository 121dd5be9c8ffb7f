"""Hostile bundle tars built byte by byte with the tarfile module, for the protocol and fleet tests.

`member(...)` writes one header (tarfile's own `TarInfo.tobuf`) followed by whatever payload the test gives, so a
header can lie about its size, type, link or PAX fields while the payload stays short; `gnu_sparse(...)` patches
an old-GNU sparse header whose sparse map makes a few bytes stand for gigabytes.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from datetime import datetime, timezone
from collections.abc import Callable

from protocol.bundle import BLOCK
from protocol.manifest import FileEntry, Manifest
from protocol.trust import PrivateKey, sign_envelope

FILES = {"model.onnx": b"\x08\x01graph" * 500, "genai_config.json": b'{"model": {}}', "tokenizer/tokenizer.json": b"{}"}
TWO_GIB = 2 << 30


def manifest_of(files: dict[str, bytes] = FILES, name: str = "triage", version: int = 1) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        files=tuple(FileEntry(path=p, size=len(b), sha256=hashlib.sha256(b).hexdigest()) for p, b in files.items()),
        created=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )


def member(
    name: str,
    payload: bytes = b"",
    *,
    size: int | None = None,
    kind: bytes = tarfile.REGTYPE,
    linkname: str = "",
    pax: dict[str, str] | None = None,
    fmt: int = tarfile.PAX_FORMAT,
) -> bytes:
    """One member: a header saying `size` (default: the payload's length), then the payload, padded."""
    info = tarfile.TarInfo(name)
    info.size = len(payload) if size is None else size
    info.type, info.linkname, info.mode, info.mtime = kind, linkname, 0o644, 0
    info.pax_headers = dict(pax or {})
    return info.tobuf(fmt, "utf-8", "surrogateescape") + _padded(payload)


def gnu_sparse(name: str, payload: bytes, realsize: int) -> bytes:
    """An old-GNU sparse member: `payload` stored, a sparse map saying it is the tail of a `realsize`-byte file."""
    block = bytearray(member(name, size=len(payload), kind=tarfile.GNUTYPE_SPARSE, fmt=tarfile.GNU_FORMAT)[:BLOCK])
    block[386:398] = tarfile.itn(realsize - len(payload), 12, tarfile.GNU_FORMAT)  # sparse[0].offset
    block[398:410] = tarfile.itn(len(payload), 12, tarfile.GNU_FORMAT)  # sparse[0].numbytes
    block[482] = 0  # no extended sparse headers
    block[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)  # the file's real size
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block) + _padded(payload)


def envelope_member(envelope: bytes = b"{}") -> bytes:
    return member("manifest.json", envelope)


def model_members(files: dict[str, bytes] = FILES) -> list[bytes]:
    return [member(f"model/{p}", b) for p, b in files.items()]


def tar(*members: bytes) -> bytes:
    return b"".join(members) + b"\0" * (2 * BLOCK)


def signed_tar(key: PrivateKey, build: Callable[[list[bytes]], list[bytes]], files: dict[str, bytes] = FILES) -> bytes:
    """A bundle whose envelope is properly signed for `files`; `build` turns the honest members into hostile ones."""
    envelope = sign_envelope(manifest_of(files), [key])
    return tar(envelope_member(envelope), *build(model_members(files)))


class Unseekable(io.RawIOBase):
    """A read-only stream that cannot seek, like a socket or a pipe."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        chunk = self._inner.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def _padded(payload: bytes) -> bytes:
    return payload + b"\0" * (-len(payload) % BLOCK)
