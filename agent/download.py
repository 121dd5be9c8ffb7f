"""Resumable, size-capped, hashing download of a bundle into a staging file.

Workflow: `fetch(ref, dest, client=...)` streams `ref.url` into `dest` (a file under staging/). If `dest` already
holds part of the file (a previous attempt or a restart), it asks for the rest with an HTTP Range request and
hashes the bytes it already has. It stops as soon as more than `ref.size` (or the device's cap) arrives, retries
transport errors with back-off, and finally checks the sha256 the deploy command named. Errors are mapped to
`protocol.errors.DownloadError` / `LengthOrHashMismatchError` at this edge.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from protocol.errors import DownloadError, LengthOrHashMismatchError
from protocol.messages import BundleRef

CHUNK = 1 << 16  # bytes per read


def fetch(
    ref: BundleRef,
    dest: Path,
    *,
    client: httpx.Client,
    max_bytes: int,
    attempts: int = 5,
    timeout_s: float = 60.0,
    progress: Callable[[int, int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download `ref` into `dest`, resuming a partial file; return `dest` once its sha256 matches."""
    if ref.size > max_bytes:
        raise DownloadError(f"bundle is {ref.size} bytes, over this device's cap of {max_bytes} bytes")
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(max(1, attempts)):
        try:
            _attempt(ref, dest, client, timeout_s, progress)
            break
        except DownloadError as exc:
            last = exc
            if attempt + 1 < attempts:
                sleep(min(2.0**attempt * 0.5, 10.0))
    else:
        raise DownloadError(f"download of {ref.url} failed after {attempts} attempt(s): {last}") from last
    digest = _sha256(dest)
    if digest != ref.sha256:
        dest.unlink(missing_ok=True)
        raise LengthOrHashMismatchError(
            f"downloaded bundle sha256 {digest[:16]}... differs from the deploy command's {ref.sha256[:16]}..."
        )
    return dest


def _attempt(ref: BundleRef, dest: Path, client: httpx.Client, timeout_s: float, progress) -> None:
    have = dest.stat().st_size if dest.exists() else 0
    if have > ref.size:
        dest.unlink()
        have = 0
    if have == ref.size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with client.stream("GET", ref.url, headers=headers, timeout=timeout_s) as resp:
            if resp.status_code == 200 and have:
                have = 0  # the server ignored Range: start over
            elif resp.status_code not in (200, 206):
                raise DownloadError(f"server answered HTTP {resp.status_code} for {ref.url}")
            with dest.open("r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                for chunk in resp.iter_bytes(CHUNK):
                    have += len(chunk)
                    if have > ref.size:
                        raise LengthOrHashMismatchError(
                            f"server sent more than the {ref.size} bytes the deploy command announced"
                        )
                    f.write(chunk)
                    if progress:
                        progress(have, ref.size)
    except httpx.HTTPError as exc:
        raise DownloadError(f"{type(exc).__name__}: {exc}") from exc
    if have != ref.size:
        raise DownloadError(f"connection closed after {have} of {ref.size} bytes")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
