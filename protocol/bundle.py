"""The bundle container: one uncompressed tar file that a device downloads.

Layout (member order is fixed):
    manifest.json          the signed envelope (see protocol.trust)
    model/<path>           each file the manifest names, exactly as onnxruntime-genai loads the folder

int4 weights barely compress, so the tar is uncompressed: a device can hash while it reads, and Range requests
resume at any byte. This module works over binary streams the caller opens; it never opens a file or a socket.

Workflow: the fleet calls `write_bundle`; a device calls `read_envelope`, verifies it with `protocol.trust`, then
`unpack(..., sink=...)`, which checks every member against the verified manifest.

Hostile tars: members are read header by header here (`tarfile.TarInfo.frombuf` decodes one 512-byte block), never
through tarfile's extraction, so nothing a header says is acted on before it is checked. Each member's header must
describe a plain regular file named exactly `model/<a path in the manifest>`, once, with the manifest's size; links,
devices, fifos, directories, GNU sparse files and GNU long-name records are refused, and a PAX extended header may
only carry what `write_bundle` writes: a `path` that extends a name too long (or not ASCII) for the ustar field
and agrees with it, and a `size` for a file of 8 GiB or more whose ustar size is 0. On a seekable stream every
header is checked before the first byte is handed to the sink; then each file is copied and hashed, stopping at
its declared size, so the bytes written never exceed the bytes read.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import (
    BadHeaderError,
    DuplicateFileError,
    LengthOrHashMismatchError,
    ManifestError,
    MissingFileError,
    NotRegularFileError,
    UnexpectedFileError,
    UnsafePathError,
    clip,
)
from .manifest import FileEntry, Manifest
from .trust import MAX_ENVELOPE_BYTES, check_file

ENVELOPE_NAME = "manifest.json"
MODEL_DIR = "model"
CHUNK = 1 << 20  # bytes read at a time while hashing
BLOCK = tarfile.BLOCKSIZE  # bytes in a tar header block; member data is padded to a multiple of it
MAX_PAX_BYTES = 8 * 1024  # bytes: a larger PAX extended header is refused unread
USTAR_MAX_SIZE = 8**11  # bytes: the smallest size a ustar header cannot hold (needs a PAX "size")
USTAR_NAME_BYTES = 100  # bytes in the ustar name field
_KINDS = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.DIRTYPE: "directory",
    tarfile.FIFOTYPE: "fifo",
    tarfile.CONTTYPE: "contiguous file",
    tarfile.GNUTYPE_SPARSE: "GNU sparse file",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name record",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link record",
    tarfile.XGLTYPE: "global PAX header",
    tarfile.XHDTYPE: "second PAX header in a row",
}


def write_bundle(out: BinaryIO, envelope: bytes, files: Iterable[tuple[str, BinaryIO, int]]) -> None:
    """Write the envelope, then each (relative path, open stream, size) under model/."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(ENVELOPE_NAME, len(envelope)), io.BytesIO(envelope))
        for path, stream, size in files:
            tar.addfile(_info(f"{MODEL_DIR}/{path}", size), stream)


def read_envelope(fileobj: BinaryIO) -> bytes:
    """Return the envelope bytes from the start of a bundle stream (seek(0) or reopen to unpack)."""
    try:
        first = _Reader(fileobj).next_member()
    except (BadHeaderError, NotRegularFileError) as exc:
        raise ManifestError(f"not a slmops bundle (tar) file: {exc}") from exc
    if first is None:
        raise ManifestError(f"not a slmops bundle (tar) file: it holds no {ENVELOPE_NAME}")
    return first.envelope(fileobj)


def unpack(fileobj: BinaryIO, manifest: Manifest, sink: Callable[[str], BinaryIO] | None = None) -> None:
    """Stream every model file out of the bundle, checking it against the verified manifest.

    `sink(path)` returns a writable stream for a file (closed by this function); with no sink the files are
    only checked. A seekable stream has every header checked (and every named file found) before `sink` is first
    called. Raises on a member that is not a plain file, a path outside model/ or not in the manifest, a duplicate,
    a header size or digest that differs from the manifest, a PAX header that rewrites a member, or a missing file.
    """
    if fileobj.seekable():
        check_headers(fileobj, manifest)
    for entry, member in _members(fileobj, manifest):
        out = sink(entry.path) if sink else None
        try:
            sha256 = member.copy(fileobj, out)
        finally:
            if out is not None:
                out.close()
        check_file(entry, member.size, sha256)


def check_headers(fileobj: BinaryIO, manifest: Manifest) -> None:
    """Check every member's header against the manifest, and that every named file is there, without reading any
    file's data (seeking over it); the seekable stream is left where it was."""
    start = fileobj.tell()
    end = fileobj.seek(0, io.SEEK_END)
    fileobj.seek(start)
    try:
        for _entry, member in _members(fileobj, manifest):
            if member.data_end > end:
                raise LengthOrHashMismatchError(f"bundle member {clip(member.name)} runs past the end of the file")
            member.skip(fileobj)
    finally:
        fileobj.seek(start)


def file_sha256(stream: BinaryIO) -> tuple[str, int]:
    """sha256 hex digest and size of a stream read to its end."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        size += len(chunk)
        digest.update(chunk)
    return digest.hexdigest(), size


def _entry(name: str, size: int, named: dict[str, FileEntry], seen: set[str]) -> FileEntry:
    """The manifest entry a member header stands for: its path must be exactly model/<a named path>, not seen
    before, and its declared size the manifest's. Adds the path to `seen`."""
    parts = name.split("/")
    if parts[0] != MODEL_DIR or len(parts) < 2 or "\\" in name or any(p in ("", ".", "..") for p in parts[1:]):
        raise UnsafePathError(f"bundle member {clip(name)} is not a path inside {MODEL_DIR}/")
    path = name[len(MODEL_DIR) + 1:]
    entry = named.get(path)
    if entry is None:
        raise UnexpectedFileError(f"bundle member {clip(name)} is not a file named by the manifest")
    if path in seen:
        raise DuplicateFileError(f"bundle holds {clip(name)} twice")
    if size != entry.size:
        raise LengthOrHashMismatchError(
            f"bundle member {clip(name)}: its header says {size} bytes, the manifest {entry.size}"
        )
    seen.add(path)
    return entry


# ---- reading, one header block at a time --------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    """A checked header: a plain regular file of `size` bytes whose data starts at `data_start`."""

    name: str
    size: int
    data_start: int

    @property
    def padded(self) -> int:
        return -(-self.size // BLOCK) * BLOCK

    @property
    def data_end(self) -> int:
        return self.data_start + self.size

    def skip(self, f: BinaryIO) -> None:
        f.seek(self.data_start + self.padded)

    def envelope(self, f: BinaryIO) -> bytes:
        if self.name != ENVELOPE_NAME:
            raise ManifestError(f"bundle must start with {ENVELOPE_NAME}; found {clip(self.name)}")
        if self.size > MAX_ENVELOPE_BYTES:
            raise ManifestError(f"{ENVELOPE_NAME} is {self.size} bytes, over the {MAX_ENVELOPE_BYTES} byte limit")
        data = _read_exact(f, self.size)
        if len(data) != self.size:
            raise ManifestError(f"bundle file is cut short inside {ENVELOPE_NAME}")
        _read_exact(f, self.padded - self.size)
        return data

    def copy(self, f: BinaryIO, out: BinaryIO | None) -> str:
        """Read exactly `size` bytes (hashing, writing them to `out`), then the padding; return the sha256."""
        digest, left = hashlib.sha256(), self.size
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise LengthOrHashMismatchError(
                    f"bundle member {clip(self.name)} is cut short: {self.size - left} of {self.size} bytes"
                )
            left -= len(chunk)
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
        _read_exact(f, self.padded - self.size)
        return digest.hexdigest()


class _Reader:
    """Walks a tar stream's headers, refusing anything that is not a plain file (see the module docstring)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = f.tell() if f.seekable() else 0

    def next_member(self) -> _Member | None:
        """The next member's checked header, with the stream at its first data byte; None at the end."""
        info = self._header()
        if info is None:
            return None
        pax: dict[str, str] = {}
        if info.type == tarfile.XHDTYPE:
            pax = self._pax(info.size)
            info = self._header()
            if info is None:
                raise BadHeaderError("bundle ends after a PAX header that describes no member")
        name, size = info.name, info.size
        if size < 0:  # a base-256 size field can be negative
            raise BadHeaderError(f"bundle member {clip(name)} declares a negative size")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = _KINDS.get(info.type, f"member of tar type {info.type!r}")
            raise NotRegularFileError(f"bundle member {clip(name)} is a {kind}, not a plain file")
        if "path" in pax:
            if name != pax["path"].encode("ascii", "replace")[:USTAR_NAME_BYTES].decode("ascii"):
                raise BadHeaderError(f"a PAX header renames bundle member {clip(name)} to {clip(pax['path'])}")
            name = pax["path"]
        if "size" in pax:
            declared = pax["size"]
            if not declared.isascii() or not declared.isdigit() or len(declared) > 19:
                raise BadHeaderError(f"a PAX header gives bundle member {clip(name)} the size {clip(declared)}")
            if size != 0 or int(declared) < USTAR_MAX_SIZE:
                raise BadHeaderError(
                    f"a PAX header changes the size of bundle member {clip(name)} from {size} to {declared}"
                )
            size = int(declared)
        member = _Member(name, size, self.pos)
        self.pos += member.padded
        return member

    def _header(self) -> tarfile.TarInfo | None:
        block = _read_exact(self.f, BLOCK)
        start, self.pos = self.pos, self.pos + len(block)
        if not block or block.count(0) == BLOCK:
            return None  # end of archive (a zero block, or the end of the stream)
        try:
            return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError) as exc:
            raise BadHeaderError(f"damaged tar header at byte {start}: {exc}") from exc

    def _pax(self, size: int) -> dict[str, str]:
        """Parse a PAX extended header ("<len> <key>=<value>\\n" records); only "path" and "size" may appear."""
        if not 0 <= size <= MAX_PAX_BYTES:
            raise BadHeaderError(f"PAX header of {size} bytes is outside 0-{MAX_PAX_BYTES} bytes")
        data = _read_exact(self.f, size)
        _read_exact(self.f, -(-size // BLOCK) * BLOCK - size)
        self.pos += -(-size // BLOCK) * BLOCK
        if len(data) != size:
            raise BadHeaderError("bundle is cut short inside a PAX header")
        records: dict[str, str] = {}
        while data:
            length, sep, _ = data.partition(b" ")
            if not sep or not length.isdigit() or len(length) > 5 or not 0 < int(length) <= len(data):
                raise BadHeaderError("malformed PAX header record")
            record, data = data[:int(length)], data[int(length):]
            key, eq, value = record[len(length) + 1:].partition(b"=")
            if not eq or not record.endswith(b"\n"):
                raise BadHeaderError("malformed PAX header record")
            try:
                k, v = key.decode("utf-8"), value[:-1].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadHeaderError("PAX header record is not UTF-8") from exc
            if k not in ("path", "size"):
                raise BadHeaderError(f"PAX header field {clip(k)} is not one slmops writes (sparse maps, links, ...)")
            if k in records:
                raise BadHeaderError(f"PAX header gives {k} twice")
            records[k] = v
        return records


def _members(f: BinaryIO, manifest: Manifest) -> Iterator[tuple[FileEntry, _Member]]:
    """The envelope first (skipped), then each model file's entry and checked header; MissingFileError at the end."""
    reader = _Reader(f)
    first = reader.next_member()
    if first is None:
        raise ManifestError(f"not a slmops bundle (tar) file: it holds no {ENVELOPE_NAME}")
    first.envelope(f)
    named, seen = {e.path: e for e in manifest.files}, set[str]()
    while (member := reader.next_member()) is not None:
        yield _entry(member.name, member.size, named, seen), member
    missing = [e.path for e in manifest.files if e.path not in seen]
    if missing:
        raise MissingFileError(f"bundle lacks {len(missing)} file(s) the manifest names: {', '.join(missing[:5])}")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes (fewer only at the end of the stream)."""
    parts, left = [], n
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # reproducible bundles: same inputs, same bytes
    return info
