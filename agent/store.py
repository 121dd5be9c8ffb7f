"""The agent's on-disk layout and atomic writes.

    <data_dir>/
      state/active.json        which model serves: {"active": {name, version}, "previous": {...}, "floor": {name: v}}
      state/update.json        the update state machine's record (agent.update)
      staging/<deployment>/    downloads and unpacking; never loaded by the runtime
      versions/<name>/<version>/   installed model folders, exactly as onnxruntime-genai loads them

Every JSON state file is written to a temp file in the same folder, fsynced, then `os.replace`d, so a power loss
leaves either the old or the new file. Installing moves a verified staging folder into `versions/` with one rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError, IdentifierError
from protocol.manifest import check_name, check_version
from protocol.messages import check_deployment_id


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ModelRef | None":
        return cls(d["name"], int(d["version"])) if d else None


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"state file {path} is unreadable ({exc}); move it aside to start that state afresh") from exc


class Store:
    """Paths and pointer files under one data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.state_dir = self.root / "state"
        self.staging_root = self.root / "staging"
        self.versions_root = self.root / "versions"
        for d in (self.state_dir, self.staging_root, self.versions_root):
            d.mkdir(parents=True, exist_ok=True)

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

    def staging(self, deployment_id: str) -> Path:
        """staging/<deployment_id>/; IdentifierError unless the id is well-formed and the folder stays in staging/."""
        return _inside(self.staging_root, self.staging_root / check_deployment_id(deployment_id))

    def version_dir(self, ref: ModelRef) -> Path:
        """versions/<name>/<version>/; IdentifierError unless both are well-formed and the folder stays in versions/."""
        name, version = check_name(ref.name), check_version(ref.version)
        return _inside(self.versions_root, self.versions_root / name / str(version))

    # -- the active pointer -----------------------------------------------------------------------------------
    def _pointer(self) -> dict[str, Any]:
        return read_json(self.active_file) or {"active": None, "previous": None, "floor": {}}

    def snapshot(self) -> dict[str, Any]:
        """The whole pointer (active, previous, floor), for `restore` after a failed update."""
        return self._pointer()

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Write back a pointer taken with `snapshot`, in one atomic write."""
        write_json_atomic(self.active_file, snapshot)

    def active(self) -> ModelRef | None:
        return ModelRef.from_dict(self._pointer().get("active"))

    def previous(self) -> ModelRef | None:
        return ModelRef.from_dict(self._pointer().get("previous"))

    def floor(self, name: str) -> int | None:
        """The highest version of `name` this device ever committed: older bundles are refused."""
        return self._pointer().get("floor", {}).get(name)

    def switch(self, ref: ModelRef) -> None:
        """Make `ref` the active model in one atomic write; the old one becomes `previous`."""
        p = self._pointer()
        old = p.get("active")
        if old != ref.as_dict():
            p["previous"] = old
        p["active"] = ref.as_dict()
        floor = p.setdefault("floor", {})
        floor[ref.name] = max(ref.version, floor.get(ref.name, 0))
        write_json_atomic(self.active_file, p)

    # -- folders ----------------------------------------------------------------------------------------------
    def install(self, unpacked: Path, ref: ModelRef) -> Path:
        """Move a verified staging folder into versions/ (idempotent: a finished move is left alone)."""
        dest = self.version_dir(ref)
        if not unpacked.exists() and dest.exists():
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(unpacked, dest)
        _fsync_dir(dest.parent)
        return dest

    def remove_version(self, ref: ModelRef) -> None:
        if ref in (self.active(), self.previous()):
            return
        shutil.rmtree(self.version_dir(ref), ignore_errors=True)

    def clear_staging(self, deployment_id: str) -> None:
        shutil.rmtree(self.staging(deployment_id), ignore_errors=True)

    def prune(self) -> None:
        """Delete installed versions other than the active and previous ones (keeps disk bounded)."""
        keepers = {r for r in (self.active(), self.previous()) if r}
        for name_dir in self.versions_root.iterdir():
            for vdir in name_dir.iterdir() if name_dir.is_dir() else ():
                if vdir.name.isdigit() and ModelRef(name_dir.name, int(vdir.name)) not in keepers:
                    shutil.rmtree(vdir, ignore_errors=True)


class SeqCounter:
    """A message sequence number that only grows, across restarts, with one disk write per `block` numbers."""

    def __init__(self, path: Path, block: int = 1000) -> None:
        self.path, self.block = path, block
        self._lock = threading.Lock()
        self._next = int((read_json(path) or {}).get("reserved", 0))
        self._reserved = self._next

    def next(self) -> int:
        with self._lock:
            if self._next >= self._reserved:
                self._reserved = self._next + self.block
                write_json_atomic(self.path, {"reserved": self._reserved})
            self._next += 1
            return self._next


def _inside(root: Path, path: Path) -> Path:
    """`path` if it still lies under `root` once links are resolved; IdentifierError otherwise."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise IdentifierError(f"{path} resolves outside {root}; refusing to use it")
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
