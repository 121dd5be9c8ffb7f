"""The agent's on-disk layout, atomic writes, and recovery of damaged state.

    <data_dir>/
      state/active.json        which model serves: {"active": {name, version}, "previous": {...}, "floor": {name: v}}
      state/floor.json         a second copy of the version floor {name: v}: the floor survives the loss of either file
      state/update.json        the update state machine's record and finished outcomes (agent.update)
      state/seq.json           reserved block of message sequence numbers
      staging/<deployment>/    downloads and unpacking; never loaded by the runtime
      versions/<name>/<version>/           installed model folders, exactly as onnxruntime-genai loads them
      versions/<name>/<version>.manifest.json   the verified manifest of that folder (sizes and sha256 per file)

Every JSON state file is written to a temp file in the same folder, fsynced, then `os.replace`d, so a power loss
leaves either the old or the new file. Installing moves a verified staging folder into `versions/` with one rename;
when that folder is the active or previous version (a repair), the new copy and the old one are exchanged in one
atomic rename, so a complete copy of the serving version is on disk at every moment.

Damage: an empty or unreadable active.json is rebuilt from `versions/` (the highest installed version whose files
match its manifest) and floor.json; what was rebuilt is kept in `notes` for the start-up report. A write that fails
raises OSError; `storage_error` turns it into the typed `StorageError` (disk_full, read_only, io_error).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import (
    DiskFullError,
    IdentifierError,
    ReadOnlyError,
    SlmopsError,
    StateDamagedError,
    StorageError,
)
from protocol.bundle import file_sha256
from protocol.manifest import SHA256_RE, Manifest, check_name, check_version
from protocol.messages import check_deployment_id
from protocol.trust import check_file

log = logging.getLogger("slmops.agent.store")


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ModelRef | None":
        return cls(d["name"], int(d["version"])) if d else None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably: a temp file in the same folder, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(path: Path) -> Any | None:
    """The JSON in `path`; None if there is no such file; StateDamagedError if it is empty or unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:  # EIO, not UTF-8, empty, not JSON
        raise StateDamagedError(f"state file {path.name} is unreadable ({type(exc).__name__}: {str(exc)[:120]})") from exc


def storage_error(exc: OSError, doing: str) -> StorageError:
    """The typed error for an OSError met while `doing` something on the device's disk."""
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{doing}: the disk is full ({why}); free space on the data folder's disk")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnlyError(f"{doing}: the data folder is not writable ({why}); remount it read-write")
    return StorageError(f"{doing}: {why} (errno {exc.errno})")


EMPTY_POINTER: dict[str, Any] = {"active": None, "previous": None, "floor": {}}


class Store:
    """Paths, pointer files and installed folders under one data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.state_dir = self.root / "state"
        self.staging_root = self.root / "staging"
        self.versions_root = self.root / "versions"
        for d in (self.state_dir, self.staging_root, self.versions_root):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only disk without the folder: serve what there is, fail updates later
                log.error("cannot create %s: %s", d, exc.strerror)
        self.notes: list[tuple[str, str]] = []  # (error code, what was found and done), for the start-up report
        self._held: dict[str, Any] | None = None  # a rebuilt pointer the disk refused to store

    # -- paths ------------------------------------------------------------------------------------------------
    @property
    def update_file(self) -> Path:
        return self.state_dir / "update.json"

    @property
    def seq_file(self) -> Path:
        return self.state_dir / "seq.json"

    @property
    def active_file(self) -> Path:
        return self.state_dir / "active.json"

    @property
    def floor_file(self) -> Path:
        return self.state_dir / "floor.json"

    def staging(self, deployment_id: str) -> Path:
        """staging/<deployment_id>/; IdentifierError unless the id is well-formed and the folder stays in staging/."""
        return _inside(self.staging_root, self.staging_root / check_deployment_id(deployment_id))

    def version_dir(self, ref: ModelRef) -> Path:
        """versions/<name>/<version>/; IdentifierError unless both are well-formed and the folder stays in versions/."""
        name, version = check_name(ref.name), check_version(ref.version)
        return _inside(self.versions_root, self.versions_root / name / str(version))

    def manifest_file(self, ref: ModelRef) -> Path:
        """versions/<name>/<version>.manifest.json: the verified manifest of an installed version."""
        d = self.version_dir(ref)
        return d.parent / f"{d.name}.manifest.json"

    def digest_file(self, ref: ModelRef) -> Path:
        """versions/<name>/<version>.bundle-sha256: the sha256 of the bundle file an installed version came from."""
        d = self.version_dir(ref)
        return d.parent / f"{d.name}.bundle-sha256"

    def bundle_digest(self, ref: ModelRef) -> str | None:
        """The sha256 of the bundle an installed version came from, or None (not recorded, or unreadable)."""
        try:
            text = self.digest_file(ref).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if SHA256_RE.fullmatch(text) else None

    # -- the active pointer -----------------------------------------------------------------------------------
    def _pointer(self) -> dict[str, Any]:
        if self._held is not None:
            return json.loads(json.dumps(self._held))
        try:
            doc = read_json(self.active_file)
        except StateDamagedError as exc:
            return self._rebuild(str(exc))
        if doc is None:
            if not self.floor_file.exists():  # a device that never committed anything
                return json.loads(json.dumps(EMPTY_POINTER))
            return self._rebuild("state file active.json is missing but floor.json shows a committed model")
        if not _valid_pointer(doc):
            return self._rebuild("state file active.json does not hold a pointer")
        return doc

    def _floor_copy(self) -> dict[str, int] | None:
        """floor.json, or None when it is missing or damaged."""
        try:
            doc = read_json(self.floor_file)
        except StateDamagedError:
            return None
        return doc if _valid_floor(doc) else None

    def _rebuild(self, why: str) -> dict[str, Any]:
        """A pointer rebuilt from versions/ and floor.json; written back when the disk allows, held in memory if not."""
        copy = self._floor_copy()
        fine = [r for r in self.installed() if self.inspect(r) is None]
        floor = dict(copy) if copy is not None else {}
        if copy is None:  # both copies lost: the highest intact install is the most that was trusted
            for r in fine:
                floor[r.name] = max(floor.get(r.name, 0), r.version)
        committed = [r for r in fine if r.version <= floor.get(r.name, 0)] or fine
        committed.sort(key=lambda r: (r.version, r.name), reverse=True)
        active = committed[0] if committed else None
        previous = next((r for r in committed[1:] if active and r.name == active.name), None)
        if active:
            floor[active.name] = max(floor.get(active.name, 0), active.version)
        p = {"active": active.as_dict() if active else None,
             "previous": previous.as_dict() if previous else None, "floor": floor}
        what = f"{why}; rebuilt from versions/ and floor.json: active {_name(active)}, floor {floor}"
        log.error("%s", what)
        self.notes.append(("state_damaged", what))
        try:
            self._write_pointer(p)
        except OSError as exc:
            log.error("cannot write the rebuilt pointer (%s); keeping it in memory", exc.strerror)
            self._held = p
        return json.loads(json.dumps(p))

    def _write_pointer(self, p: dict[str, Any]) -> None:
        """Write the floor copy (when it changes), then active.json. OSError when the disk refuses."""
        if self._floor_copy() != p.get("floor", {}):
            write_json_atomic(self.floor_file, p.get("floor", {}))
        write_json_atomic(self.active_file, p)
        self._held = None

    def recover(self) -> list[tuple[str, str]]:
        """At start: check both pointer files, rebuild or rewrite the damaged one; return what was found."""
        p = self._pointer()  # rebuilds a damaged active.json
        if self._floor_copy() is None and (self.floor_file.exists() or p.get("floor")):
            if self.floor_file.exists():
                what = "state file floor.json is unreadable; rewritten from active.json"
                log.error("%s", what)
                self.notes.append(("state_damaged", what))
            try:  # a missing copy (an agent from before floor.json) is written quietly
                write_json_atomic(self.floor_file, p.get("floor", {}))
            except OSError as exc:
                log.error("cannot rewrite floor.json: %s", exc.strerror)
        return list(self.notes)

    def snapshot(self) -> dict[str, Any]:
        """The whole pointer (active, previous, floor), for `restore` after a failed update."""
        return self._pointer()

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Write back a pointer taken with `snapshot` (nothing is written when the disk already holds it)."""
        if self._pointer() == snapshot and self._floor_copy() == snapshot.get("floor", {}):
            return
        self._write_pointer(snapshot)

    def active(self) -> ModelRef | None:
        return ModelRef.from_dict(self._pointer().get("active"))

    def previous(self) -> ModelRef | None:
        return ModelRef.from_dict(self._pointer().get("previous"))

    def floor(self, name: str) -> int | None:
        """The highest version of `name` this device ever committed, from either copy: older bundles are refused."""
        seen = [f[name] for f in (self._pointer().get("floor", {}), self._floor_copy() or {}) if name in f]
        return max(seen) if seen else None

    def switch(self, ref: ModelRef) -> None:
        """Make `ref` the active model in one atomic write; the old one becomes `previous`."""
        p = self._pointer()
        old = p.get("active")
        if old != ref.as_dict():
            p["previous"] = old
        p["active"] = ref.as_dict()
        floor = p.setdefault("floor", {})
        floor[ref.name] = max(ref.version, floor.get(ref.name, 0), (self._floor_copy() or {}).get(ref.name, 0))
        self._write_pointer(p)

    def use_previous(self, why: str) -> ModelRef | None:
        """The active model is unusable: make the previous one active (kept in memory if the disk refuses)."""
        p = self._pointer()
        bad, prev = p.get("active"), p.get("previous")
        p["active"], p["previous"] = prev, None
        try:
            write_json_atomic(self.active_file, p)
        except OSError as exc:
            log.error("cannot write the pointer (%s); serving the previous version from memory", exc.strerror)
            self._held = p
        what = f"{why}; {'now serving ' + _name(ModelRef.from_dict(prev)) if prev else 'no intact version to serve'}"
        log.error("active model %s: %s", _name(ModelRef.from_dict(bad)), what)
        return ModelRef.from_dict(prev)

    # -- installed folders ------------------------------------------------------------------------------------
    def installed(self) -> list[ModelRef]:
        """Every versions/<name>/<version>/ folder on disk."""
        refs = []
        for name_dir in _listdir(self.versions_root):
            for vdir in _listdir(name_dir):
                if vdir.is_dir() and vdir.name.isdigit() and not vdir.name.startswith("0"):
                    try:
                        refs.append(ModelRef(check_name(name_dir.name), check_version(int(vdir.name))))
                    except (IdentifierError, ValueError):
                        continue
        return refs

    def inspect(self, ref: ModelRef, *, hashes: bool = False) -> str | None:
        """Why an installed version's files differ from its verified manifest (sizes; sha256 too with `hashes`),
        or None when they match. A version installed before manifests were kept is checked for presence only."""
        folder = self.version_dir(ref)
        if not folder.is_dir():
            return f"folder {folder.relative_to(self.root)} is missing"
        try:
            doc = read_json(self.manifest_file(ref))
            if doc is None:
                return None if (folder / "genai_config.json").is_file() else "genai_config.json is missing"
            manifest = Manifest.from_signed(doc)
        except SlmopsError as exc:
            return f"its manifest is unreadable: {exc}"
        for entry in manifest.files:
            path = folder / entry.path
            try:
                size = path.stat().st_size
                digest = sha256_of(path) if hashes else entry.sha256
                check_file(entry, size, digest)
            except FileNotFoundError:
                return f"{entry.path} is missing"
            except OSError as exc:
                return f"{entry.path} cannot be read: {exc.strerror}"
            except SlmopsError as exc:
                return str(exc)
        return None

    def trusted_manifest(self, ref: ModelRef) -> dict[str, Any] | None:
        """The verified manifest this device keeps for an installed version, or None (none kept, or unreadable)."""
        try:
            doc = read_json(self.manifest_file(ref))
        except StateDamagedError:
            return None
        return doc if isinstance(doc, dict) else None

    def install(self, unpacked: Path, ref: ModelRef, manifest: dict[str, Any] | None = None,
                bundle_sha256: str | None = None) -> Path:
        """Move a verified staging folder into versions/ (idempotent: a finished move is left alone).

        The folder of the active or previous version is never removed: a new copy of it is exchanged in with one
        atomic rename, so either the old or the new complete copy is at `dest` at every moment."""
        dest = self.version_dir(ref)
        if not unpacked.exists() and dest.exists():
            return dest
        if manifest is not None:
            write_json_atomic(self.manifest_file(ref), manifest)
        if bundle_sha256 is not None:
            write_bytes_atomic(self.digest_file(ref), bundle_sha256.encode("ascii"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and ref in (self.active(), self.previous()):
            old = unpacked.parent / "replaced"
            shutil.rmtree(old, ignore_errors=True)
            if _exchange(unpacked, dest):
                os.replace(unpacked, old)
            else:  # no atomic exchange here: a short window where dest is absent; ROLLBACK cannot lose it
                os.replace(dest, old)
                os.replace(unpacked, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(unpacked, dest)
        _fsync_dir(dest.parent)
        return dest

    def remove_version(self, ref: ModelRef) -> None:
        if ref in (self.active(), self.previous()):
            return
        shutil.rmtree(self.version_dir(ref), ignore_errors=True)
        _unlink(self.manifest_file(ref))
        _unlink(self.digest_file(ref))

    def clear_staging(self, deployment_id: str) -> None:
        shutil.rmtree(self.staging(deployment_id), ignore_errors=True)

    def clear_all_staging(self) -> None:
        """Remove every staging folder (best effort): after a damaged update record, none belongs to an update."""
        for d in _listdir(self.staging_root):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else _unlink(d)

    def prune(self) -> None:
        """Delete installed versions other than the active and previous ones (keeps disk bounded)."""
        keepers = {r for r in (self.active(), self.previous()) if r}
        for name_dir in _listdir(self.versions_root):
            for entry in _listdir(name_dir):
                v = entry.name.split(".")[0]
                if v.isdigit() and ModelRef(name_dir.name, int(v)) not in keepers:
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    elif entry.name in (f"{v}.manifest.json", f"{v}.bundle-sha256"):
                        _unlink(entry)


class SeqCounter:
    """A message sequence number that only grows, across restarts, with one disk write per `block` numbers.

    It never stops the agent: an unreadable seq.json, or a disk that refuses the reservation, makes it count on
    from the clock (milliseconds since 1970, far above any reserved block) in memory; `note` says so, and every
    later number retries the reservation until the disk takes it again."""

    def __init__(self, path: Path, block: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self.path, self.block, self.clock = path, block, clock
        self._lock = threading.Lock()
        self.note: str | None = None
        self._degraded = False
        try:
            doc = read_json(path) or {}
            self._next = int(doc["reserved"]) if doc else 0
            if self._next < 0:
                raise ValueError("negative")
        except (StateDamagedError, KeyError, TypeError, ValueError) as exc:
            self._next = int(self.clock() * 1000)
            why = str(exc) if isinstance(exc, StateDamagedError) else f"state file seq.json holds no reservation ({exc!r})"
            self.note = f"{why}; message numbers go on from the clock"
            log.error("%s (%d)", self.note, self._next)
        self._reserved = self._next

    def next(self) -> int:
        with self._lock:
            if self._next >= self._reserved or self._degraded:
                try:
                    write_json_atomic(self.path, {"reserved": self._next + self.block})
                    self._reserved = self._next + self.block
                    if self._degraded:
                        log.warning("message numbers are reserved on disk again")
                    self._degraded = False
                except OSError as exc:
                    if not self._degraded:
                        self._next = max(self._next, int(self.clock() * 1000))
                        self.note = f"cannot reserve message numbers in seq.json ({exc.strerror}); counting from the clock"
                        log.error("%s", self.note)
                    self._degraded = True
                    self._reserved = self._next + self.block
            self._next += 1
            return self._next


def _valid_pointer(doc: Any) -> bool:
    if not isinstance(doc, dict) or not _valid_floor(doc.get("floor", {})):
        return False
    return all(_valid_ref(doc.get(k)) for k in ("active", "previous"))


def _valid_ref(d: Any) -> bool:
    if d is None:
        return True
    return (isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("version"), int)
            and not isinstance(d.get("version"), bool) and d["version"] >= 1)


def _valid_floor(doc: Any) -> bool:
    return isinstance(doc, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in doc.items()
    )


def _name(ref: ModelRef | None) -> str:
    return f"{ref.name} v{ref.version}" if ref else "none"


def _listdir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux renameat2 RENAME_EXCHANGE); False where that is unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _inside(root: Path, path: Path) -> Path:
    """`path` if it still lies under `root` once links are resolved; IdentifierError otherwise."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise IdentifierError(f"{path} resolves outside {root}; refusing to use it")
    return path


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    with path.open("rb") as f:
        return file_sha256(f)[0]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
