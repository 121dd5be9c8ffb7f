"""Resumable, size-capped, hashing download of a bundle into a staging file, within a deadline and a minimum rate.

Workflow: `fetch(ref, dest, client=...)` streams `ref.url` into `dest` (a file under staging/). If `dest` already
holds part of the file (a previous attempt or a restart), it asks for the rest with an HTTP Range request and
hashes the bytes it already has. It stops as soon as more than `ref.size` (or the device's cap) arrives, retries
transport errors with back-off, and finally checks the sha256 the deploy command named. Errors are mapped to
`protocol.errors.DownloadError` / `LengthOrHashMismatchError` at this edge.

Time: the whole download, every attempt and back-off included, must end within `deadline_s`
(`DownloadDeadlineError`), and the bytes received over any `rate_window_s` must average at least `min_rate_bps`
(`DownloadTooSlowError`); neither is retried, so one slow server cannot hold the update worker for long. A read
waits at most the rate window (or what is left of the deadline). `check()` runs between chunks: it raises to stop
the download (a cancelled deployment). Disk errors (OSError) pass through unchanged for the caller to type.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httpx

from protocol.errors import DownloadDeadlineError, DownloadError, DownloadTooSlowError, LengthOrHashMismatchError
from protocol.messages import BundleRef

from .store import sha256_of

CHUNK = 1 << 16  # bytes per read


class _Pace:
    """The deadline and the minimum rate, measured with a monotonic clock."""

    def __init__(self, deadline_s: float, min_rate_bps: float, window_s: float, clock: Callable[[], float]) -> None:
        self.clock, self.min_rate, self.window = clock, min_rate_bps, window_s
        self.started = clock()
        self.deadline = self.started + deadline_s
        self.deadline_s = deadline_s
        self.samples: deque[tuple[float, int]] = deque()  # (time, bytes received so far in this attempt)

    def begin_attempt(self) -> None:
        self.samples.clear()
        self.samples.append((self.clock(), 0))

    def read_timeout(self, timeout_s: float) -> float:
        limit = min(timeout_s, self.window) if self.min_rate > 0 else timeout_s
        return max(0.01, min(limit, self.left()))

    def left(self) -> float:
        return self.deadline - self.clock()

    def check_deadline(self, have: int, size: int) -> None:
        if self.left() <= 0:
            raise DownloadDeadlineError(
                f"download did not finish within the {self.deadline_s:g}s deadline ({have} of {size} bytes)"
            )

    def tick(self, received: int, have: int, size: int) -> None:
        """Note `received` bytes of this attempt; raise when past the deadline or under the minimum rate."""
        now = self.clock()
        self.samples.append((now, received))
        self.check_deadline(have, size)
        if self.min_rate <= 0:
            return
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()  # keep one sample at least a window old
        t0, b0 = self.samples[0]
        if now - t0 >= self.window and (received - b0) / (now - t0) < self.min_rate:
            raise DownloadTooSlowError(
                f"download ran at {(received - b0) / (now - t0):.0f} bytes/s over {now - t0:.1f}s, under this "
                f"device's minimum of {self.min_rate:g} bytes/s ({have} of {size} bytes)"
            )

    def stalled(self, have: int, size: int) -> DownloadError:
        """The error for a read that timed out."""
        if self.left() <= 0:
            return DownloadDeadlineError(
                f"download did not finish within the {self.deadline_s:g}s deadline ({have} of {size} bytes)"
            )
        if self.min_rate > 0:
            return DownloadTooSlowError(
                f"no bytes for {self.window:g}s, under this device's minimum of {self.min_rate:g} bytes/s "
                f"({have} of {size} bytes)"
            )
        return DownloadError(f"no bytes within the read timeout ({have} of {size} bytes)")


def fetch(
    ref: BundleRef,
    dest: Path,
    *,
    client: httpx.Client,
    max_bytes: int,
    attempts: int = 5,
    timeout_s: float = 60.0,
    deadline_s: float = 1800.0,
    min_rate_bps: float = 0,
    rate_window_s: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
    check: Callable[[], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Download `ref` into `dest`, resuming a partial file; return `dest` once its sha256 matches."""
    if ref.size > max_bytes:
        raise DownloadError(f"bundle is {ref.size} bytes, over this device's cap of {max_bytes} bytes")
    dest.parent.mkdir(parents=True, exist_ok=True)
    pace = _Pace(deadline_s, min_rate_bps, rate_window_s, clock)
    last: Exception | None = None
    for attempt in range(max(1, attempts)):
        try:
            _attempt(ref, dest, client, timeout_s, progress, pace, check)
            break
        except (DownloadTooSlowError, DownloadDeadlineError):
            raise
        except DownloadError as exc:
            last = exc
            if attempt + 1 < attempts:
                pause = min(2.0**attempt * 0.5, 10.0)
                if pace.left() <= pause:
                    raise DownloadDeadlineError(
                        f"download did not finish within the {deadline_s:g}s deadline: {exc}"
                    ) from exc
                sleep(pause)
                if check:
                    check()
    else:
        raise DownloadError(f"download of {ref.url} failed after {attempts} attempt(s): {last}") from last
    digest = sha256_of(dest)
    if digest != ref.sha256:
        dest.unlink(missing_ok=True)
        raise LengthOrHashMismatchError(
            f"downloaded bundle sha256 {digest[:16]}... differs from the deploy command's {ref.sha256[:16]}..."
        )
    return dest


def _attempt(ref: BundleRef, dest: Path, client: httpx.Client, timeout_s: float, progress, pace: _Pace, check) -> None:
    have = dest.stat().st_size if dest.exists() else 0
    if have > ref.size:
        dest.unlink()
        have = 0
    if have == ref.size:
        return
    pace.check_deadline(have, ref.size)
    pace.begin_attempt()
    received = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    read = pace.read_timeout(timeout_s)
    timeout = httpx.Timeout(min(timeout_s, max(0.01, pace.left())), read=read)
    try:
        with client.stream("GET", ref.url, headers=headers, timeout=timeout) as resp:
            if resp.status_code == 200 and have:
                have = 0  # the server ignored Range: start over
            elif resp.status_code not in (200, 206):
                raise DownloadError(f"server answered HTTP {resp.status_code} for {ref.url}")
            with dest.open("r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                for chunk in resp.iter_bytes():  # each piece as it arrives, so the pace is measured as it goes
                    have += len(chunk)
                    received += len(chunk)
                    if have > ref.size:
                        raise LengthOrHashMismatchError(
                            f"server sent more than the {ref.size} bytes the deploy command announced"
                        )
                    f.write(chunk)
                    if progress:
                        progress(have, ref.size)
                    if check:
                        check()
                    pace.tick(received, have, ref.size)
    except httpx.TimeoutException as exc:
        raise pace.stalled(have, ref.size) from exc
    except httpx.HTTPError as exc:
        raise DownloadError(f"{type(exc).__name__}: {exc}") from exc
    if have != ref.size:
        raise DownloadError(f"connection closed after {have} of {ref.size} bytes")
