"""A bounded, append-only outbox on disk: messages wait here until the broker has acknowledged them.

    <data_dir>/outbox/<key>.msg    one encoded message per file; <key> is a zero-padded counter, so names sort
                                   in the order the messages were put

Workflow: `put(payload)` writes the payload to a temp file in the folder, fsyncs it and renames it to its key's
name (a power loss leaves the whole file or none), then keeps the payload in an in-memory index too, so sending
never reads the disk. `pending()` lists what waits, oldest first; the sender publishes it at QoS 1 and calls
`remove(key)` only once the broker acknowledged it (`agent.telemetry.Forwarder`). A new `Outbox` over the same
folder (after a crash or restart) returns every message that was not removed, in the same order.

Bounds: at most `max_items` messages and `max_bytes` payload bytes. When a `put` would pass either, the OLDEST
messages are dropped first; `dropped` counts them since start and a warning says so (at most once a minute).

A disk that fails (full, read-only, gone) never stops the caller: a payload that cannot be written is kept in
memory only, under the same bounds and in the same order, and one warning says so; a later `put` tries the disk
again and one line says when it works again. A file that cannot be removed is sent once more after a restart,
which the fleet ignores (it de-duplicates by message_id).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .store import write_bytes_atomic

log = logging.getLogger("slmops.agent.outbox")

MAX_ITEMS = 10_000  # messages: telemetry every 30 s fills this in about 3.5 days of outage
MAX_BYTES = 8 << 20  # bytes of payload, on disk and in memory alike
DROP_LOG_EVERY_S = 60.0  # seconds between two warnings about dropped messages
SUFFIX = ".msg"


class Outbox:
    def __init__(
        self,
        folder: Path,
        *,
        max_items: int = MAX_ITEMS,
        max_bytes: int = MAX_BYTES,
        write: Callable[[Path, bytes], None] = write_bytes_atomic,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("an outbox needs room for at least one message")
        self.folder, self.max_items, self.max_bytes = Path(folder), max_items, max_bytes
        self._write, self._clock = write, clock
        self._lock = threading.Lock()
        self._items: OrderedDict[int, tuple[bytes, bool]] = OrderedDict()  # key -> (payload, on disk)
        self._bytes = 0
        self._next = 1
        self.dropped = 0  # messages dropped to stay within the bounds, since this Outbox was made
        self._disk_ok = True
        self._drop_logged_at: float | None = None
        self._load()

    # -- public -----------------------------------------------------------------------------------------------
    def put(self, payload: bytes) -> int:
        """Keep `payload` until `remove(key)`; returns its key. Drops the oldest messages when over a bound."""
        with self._lock:
            key, self._next = self._next, self._next + 1
            on_disk = self._try_write(key, payload)
            self._items[key] = (payload, on_disk)
            self._bytes += len(payload)
            self._enforce_bounds()
            return key

    def pending(self, limit: int | None = None) -> list[tuple[int, bytes]]:
        """(key, payload) of waiting messages, oldest first."""
        with self._lock:
            out = []
            for key, (payload, _) in self._items.items():
                if limit is not None and len(out) >= limit:
                    break
                out.append((key, payload))
            return out

    def remove(self, key: int) -> None:
        """Forget a message the broker acknowledged (a key no longer here is ignored)."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self._forget(key, *item)

    def __contains__(self, key: int) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    # -- inside -----------------------------------------------------------------------------------------------
    def _path(self, key: int) -> Path:
        return self.folder / f"{key:016d}{SUFFIX}"

    def _load(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            names = sorted(os.listdir(self.folder))
        except OSError as exc:
            self._disk_failed(exc)
            return
        for name in names:
            path = self.folder / name
            stem = name.removesuffix(SUFFIX)
            if name.startswith(".") and name.endswith(".tmp"):  # a crash came before its rename
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
                continue
            if not name.endswith(SUFFIX) or not stem.isdigit():
                continue
            try:
                payload = path.read_bytes()
            except OSError as exc:
                log.warning("cannot read %s from the outbox (%s); skipping it", name, exc.strerror)
                continue
            key = int(stem)
            self._items[key] = (payload, True)
            self._bytes += len(payload)
            self._next = max(self._next, key + 1)
        self._enforce_bounds()
        if self._items:
            log.info("outbox: %d message(s) from before the restart wait to be sent", len(self._items))

    def _try_write(self, key: int, payload: bytes) -> bool:
        try:
            self._write(self._path(key), payload)
        except OSError as exc:
            self._disk_failed(exc)
            return False
        if not self._disk_ok:
            self._disk_ok = True
            log.info("outbox: the disk at %s takes messages again", self.folder)
        return True

    def _disk_failed(self, exc: OSError) -> None:
        if self._disk_ok:
            self._disk_ok = False
            log.warning("outbox: cannot write to %s (%s); keeping messages in memory until it works again "
                        "(they are lost if the agent stops meanwhile)", self.folder, exc.strerror or exc)

    def _enforce_bounds(self) -> None:
        dropped = 0
        while self._items and (len(self._items) > self.max_items or self._bytes > self.max_bytes):
            key, item = self._items.popitem(last=False)
            self._forget(key, *item)
            dropped += 1
        if dropped:
            self.dropped += dropped
            now = self._clock()
            if self._drop_logged_at is None or now - self._drop_logged_at >= DROP_LOG_EVERY_S:
                self._drop_logged_at = now
                log.warning("outbox full (%d messages, %d bytes at most): dropped the oldest; %d dropped so far",
                            self.max_items, self.max_bytes, self.dropped)

    def _forget(self, key: int, payload: bytes, on_disk: bool) -> None:
        self._bytes -= len(payload)
        if on_disk:
            try:
                self._path(key).unlink(missing_ok=True)
            except OSError:
                pass  # sent again after a restart; the fleet de-duplicates by message_id
