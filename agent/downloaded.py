"""The one bundle a download-only deploy command left on disk, verified, for a later command to install.

    <data_dir>/downloaded/bundle.tar    the bundle file, exactly as downloaded (its sha256 is the command's)
    <data_dir>/downloaded/bundle.json   what it is: {"name", "version", "url", "sha256", "size"} (a BundleRef)

Workflow (driven by agent/update.py):
- a download-only update downloads into staging/<deployment>/ and verifies it like any other (signature, expiry,
  version floor, target, every file hash); then `keep(staging_tar, bundle)` moves the bundle file here (the file
  first, bundle.json last, so a half-kept download has no bundle.json and is never used) and the update ends
  `downloaded`. Nothing was installed.
- a later command for the same bundle (name, version, sha256 and size equal) calls `take(bundle, dest)` from its
  DOWNLOAD step: the file's sha256 is computed again and, when it still matches, the file is moved into that
  update's staging folder, so the download finds it complete and asks the server for nothing; VERIFY then checks
  the signature and every file hash again before anything is installed. A damaged or missing file is removed and
  the bundle is downloaded again.
- at most one bundle is kept (disk stays bounded: one bundle beside the active and previous versions): a command
  for any other bundle removes it (`drop_unless`) before it runs.

This folder is outside staging/, so the start-up clean-up of staging leftovers keeps it; the agent restarting
between the download-only command and the install changes nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from protocol.errors import StateDamagedError
from protocol.messages import BundleRef

from .store import Store, read_json, sha256_of, write_json_atomic

log = logging.getLogger("slmops.agent.update")


class Downloaded:
    """The kept download of one data folder."""

    def __init__(self, store: Store) -> None:
        self.folder = store.root / "downloaded"

    @property
    def tar(self) -> Path:
        return self.folder / "bundle.tar"

    @property
    def info(self) -> Path:
        return self.folder / "bundle.json"

    def bundle(self) -> BundleRef | None:
        """The bundle kept here, or None (nothing kept, half kept, or its description unreadable)."""
        try:
            doc = read_json(self.info)
            return BundleRef.model_validate(doc) if doc is not None else None
        except (StateDamagedError, ValueError):  # pydantic's ValidationError is a ValueError
            return None

    def holds(self, bundle: dict[str, Any]) -> bool:
        """Whether the kept download is described as `bundle` (name, version, sha256 and size; the URL may differ)."""
        kept = self.bundle()
        return kept is not None and _same(kept.model_dump(mode="json"), bundle)

    def keep(self, staged: Path, bundle: dict[str, Any]) -> None:
        """Move a verified bundle file here (idempotent: a finished keep of the same bundle is left alone)."""
        if not staged.exists() and self.holds(bundle):
            return
        self.clear()
        self.folder.mkdir(parents=True, exist_ok=True)
        os.replace(staged, self.tar)
        write_json_atomic(self.info, BundleRef.model_validate(bundle).model_dump(mode="json"))

    def take(self, bundle: dict[str, Any], dest: Path) -> bool:
        """Move the kept file to `dest` when it is `bundle` and its sha256 still matches; True when it was moved.
        Anything else kept here is removed (another bundle, or damaged)."""
        if not self.info.exists() and not self.tar.exists():
            return False
        if not self.holds(bundle):
            self.drop_unless(bundle)
            return False
        try:
            digest = sha256_of(self.tar)
        except OSError as exc:
            digest = f"unreadable ({exc.strerror})"
        if digest != bundle["sha256"]:
            log.warning("the kept download of %s v%s is damaged (sha256 %s); downloading it again",
                        bundle["name"], bundle["version"], digest[:16])
            self.clear()
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tar, dest)
        self.clear()
        log.info("using the kept download of %s v%s; nothing to fetch", bundle["name"], bundle["version"])
        return True

    def drop_unless(self, bundle: dict[str, Any]) -> None:
        """Remove the kept download unless it is `bundle`: a command for another bundle supersedes it."""
        if not self.folder.exists() or self.holds(bundle):
            return
        kept = self.bundle()
        log.info("removing the kept download of %s: deployment of %s v%s supersedes it",
                 f"{kept.name} v{kept.version}" if kept else "an unknown bundle", bundle["name"], bundle["version"])
        self.clear()

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("name", "version", "sha256", "size"))
