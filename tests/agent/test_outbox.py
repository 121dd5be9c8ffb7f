"""The telemetry outbox and its forwarder: order, bounds with the oldest dropped first, survival across a restart,
a full or read-only disk (injected errors, and a real tiny tmpfs when running as root), and the forwarder's
in-order, windowed, rate-bounded sending that removes a message only once the broker acknowledged it."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.link import Link
from agent.outbox import Outbox
from agent.store import write_bytes_atomic as write_file
from agent.store import SeqCounter
from agent.telemetry import Forwarder
from protocol.errors import ConfigError
from protocol.messages import Telemetry, parse_message


def msg(i: int) -> bytes:
    return f'{{"n": {i}}}'.encode()


def payloads(box: Outbox) -> list[bytes]:
    return [p for _, p in box.pending()]


def files(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "slmops.agent.outbox" and r.levelno >= logging.WARNING]


# -- the outbox -----------------------------------------------------------------------------------------------
def test_order_and_removal(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    keys = [box.put(msg(i)) for i in range(5)]
    assert keys == sorted(keys) and payloads(box) == [msg(i) for i in range(5)]
    assert box.pending(limit=2) == [(keys[0], msg(0)), (keys[1], msg(1))]
    box.remove(keys[1])
    box.remove(keys[1])  # twice: ignored
    assert payloads(box) == [msg(0), msg(2), msg(3), msg(4)]
    assert len(files(tmp_path / "outbox")) == 4 and len(box) == 4 and box.size_bytes == 4 * len(msg(0))


def test_count_bound_drops_the_oldest_first_and_counts(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="slmops.agent.outbox")
    now = [0.0]
    box = Outbox(tmp_path / "outbox", max_items=3, clock=lambda: now[0])
    for i in range(6):
        box.put(msg(i))
    assert payloads(box) == [msg(3), msg(4), msg(5)] and box.dropped == 3
    assert len(files(tmp_path / "outbox")) == 3
    assert len(warnings(caplog)) == 1 and "3 dropped so far" not in warnings(caplog)[0]  # one line a minute at most
    now[0] = 61.0
    box.put(msg(6))
    assert box.dropped == 4 and len(warnings(caplog)) == 2 and "4 dropped so far" in warnings(caplog)[1]


def test_byte_bound_drops_the_oldest_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", max_bytes=3 * len(msg(0)))
    for i in range(5):
        box.put(msg(i))
    assert payloads(box) == [msg(2), msg(3), msg(4)] and box.dropped == 2 and box.size_bytes == 3 * len(msg(0))


def test_a_new_outbox_over_the_same_folder_returns_what_was_pending(tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    box = Outbox(folder)
    keys = [box.put(msg(i)) for i in range(12)]  # keys past 9 check that order is numeric, not by name length
    box.remove(keys[0])
    (folder / ".0000000000000099.msg.abc.tmp").write_bytes(b"half")  # a crash before a rename
    (folder / "README").write_text("not ours")

    again = Outbox(folder)
    assert again.pending() == [(k, msg(i)) for i, k in enumerate(keys) if i > 0]
    assert not (folder / ".0000000000000099.msg.abc.tmp").exists() and (folder / "README").exists()
    assert again.put(msg(99)) > keys[-1]
    small = Outbox(folder, max_items=4)  # a smaller bound after a restart keeps the newest
    assert payloads(small) == [msg(9), msg(10), msg(11), msg(99)] and small.dropped == 8


def failing(code: int):
    def write(path: Path, payload: bytes) -> None:
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_a_failing_disk_falls_back_to_memory_and_says_so_once(tmp_path: Path, caplog, code: int) -> None:
    caplog.set_level(logging.INFO, logger="slmops.agent.outbox")
    mode = {"fail": True}

    def write(path: Path, payload: bytes) -> None:
        if mode["fail"]:
            raise OSError(code, os.strerror(code))
        write_file(path, payload)

    box = Outbox(tmp_path / "outbox", max_items=5, write=write)
    before = box.put(msg(0))
    for i in range(1, 4):
        box.put(msg(i))
    assert payloads(box) == [msg(i) for i in range(4)] and files(tmp_path / "outbox") == []
    [line] = warnings(caplog)
    assert os.strerror(code) in line and "memory" in line
    mode["fail"] = False
    box.put(msg(4))
    assert any("again" in r.getMessage() for r in caplog.records)
    assert len(files(tmp_path / "outbox")) == 1
    box.remove(before)  # memory-only messages are removed like the others
    box.put(msg(5))
    box.put(msg(6))  # over the bound: the oldest (memory-only) goes first
    assert payloads(box) == [msg(i) for i in (2, 3, 4, 5, 6)]
    assert payloads(Outbox(tmp_path / "outbox")) == [msg(4), msg(5), msg(6)]  # only what reached the disk


def test_a_folder_that_cannot_be_made_means_memory_only(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="slmops.agent.outbox")
    (tmp_path / "file").write_text("x")
    box = Outbox(tmp_path / "file" / "outbox")
    for i in range(3):
        box.put(msg(i))
    assert payloads(box) == [msg(0), msg(1), msg(2)] and len(warnings(caplog)) == 1


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only): a disk that really fills up and can be made read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a tiny tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_and_then_read_only_disk(tiny_tmpfs: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="slmops.agent.outbox")
    box = Outbox(tiny_tmpfs / "outbox")
    big = b"x" * 3000
    for _ in range(40):  # 120 KB into 64 KiB: the disk fills part way
        box.put(big)
    assert len(box) == 40 and 0 < len(files(tiny_tmpfs / "outbox")) < 40
    assert len(warnings(caplog)) == 1 and "No space" in warnings(caplog)[0]
    assert not [n for n in os.listdir(tiny_tmpfs / "outbox") if n.endswith(".tmp")]  # no half-written leftovers
    for key, _ in box.pending():
        box.remove(key)
    assert files(tiny_tmpfs / "outbox") == []

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    caplog.clear()
    ro = Outbox(tiny_tmpfs / "outbox")
    key = ro.put(msg(1))
    assert payloads(ro) == [msg(1)] and len(warnings(caplog)) == 1 and "Read-only" in warnings(caplog)[0]
    ro.remove(key)
    assert len(ro) == 0


# -- the forwarder --------------------------------------------------------------------------------------------
class FakeAck:
    def __init__(self, error: Exception | None = None) -> None:
        self.done, self.error = False, error

    def is_published(self) -> bool:
        if self.error:
            raise self.error
        return self.done


class FakeLink:
    """Stands in for `Link.publish_bytes` + `Link.connected`: records what is sent, acknowledges on demand."""

    def __init__(self) -> None:
        self.up = True
        self.sent: list[tuple[bytes, FakeAck]] = []
        self.error: Exception | None = None

    def send(self, payload: bytes) -> FakeAck:
        ack = FakeAck(self.error)
        self.sent.append((payload, ack))
        return ack

    def ack_all(self) -> None:
        for _, ack in self.sent:
            ack.done = True

    def payloads(self) -> list[bytes]:
        return [p for p, _ in self.sent]


def forwarder(box: Outbox, link: FakeLink, now: list[float], **kw) -> Forwarder:
    return Forwarder(box, link.send, lambda: link.up, clock=lambda: now[0], **kw)


def test_forwarder_sends_in_order_and_removes_only_acknowledged(tmp_path: Path) -> None:
    box, link, now = Outbox(tmp_path / "outbox"), FakeLink(), [0.0]
    fw = forwarder(box, link, now, window=3, rate_per_s=1000)
    for i in range(5):
        box.put(msg(i))
    assert fw.pump() == 3 and link.payloads() == [msg(0), msg(1), msg(2)]
    assert fw.pump() == 0 and len(box) == 5  # the window is full and nothing is acknowledged yet
    link.sent[1][1].done = True
    now[0] += 1
    assert fw.pump() == 1 and link.payloads()[-1] == msg(3)
    assert payloads(box) == [msg(0), msg(2), msg(3), msg(4)] and fw.sent == 1
    link.ack_all()
    now[0] += 1
    fw.pump()
    link.ack_all()
    now[0] += 1
    fw.pump()
    assert len(box) == 0 and link.payloads() == [msg(i) for i in (0, 1, 2, 3, 4)] and fw.sent == 5


def test_forwarder_waits_while_offline_and_drains_at_a_bounded_rate(tmp_path: Path) -> None:
    box, link, now = Outbox(tmp_path / "outbox"), FakeLink(), [0.0]
    fw = forwarder(box, link, now, window=5, rate_per_s=2)
    link.up = False
    for i in range(10):
        box.put(msg(i))
        now[0] += 1
        assert fw.pump() == 0
    link.up = True
    assert fw.pump() == 5  # the bucket holds one window's worth
    link.ack_all()
    assert fw.pump() == 0  # no tokens left
    now[0] += 1.0
    assert fw.pump() == 2  # 2 a second
    link.ack_all()
    now[0] += 10
    fw.pump()
    link.ack_all()
    now[0] += 10
    fw.pump()
    assert len(box) == 0 and link.payloads() == [msg(i) for i in range(10)]


def test_forwarder_resends_what_was_never_queued_or_never_acknowledged(tmp_path: Path) -> None:
    box, link, now = Outbox(tmp_path / "outbox"), FakeLink(), [0.0]
    fw = forwarder(box, link, now, window=2, rate_per_s=1000, ack_timeout_s=30)
    box.put(msg(0))
    link.error = ValueError("Message is not queued due to ERR_QUEUE_SIZE")
    fw.pump()
    link.error = None
    now[0] += 1
    fw.pump()  # the refused one is released, then sent again
    assert link.payloads() == [msg(0), msg(0)] and len(box) == 1
    link.up = False
    now[0] += 100  # offline time does not count towards the ack timeout
    fw.pump()
    link.up = True
    now[0] += 1
    assert fw.pump() == 0 and len(link.sent) == 2
    now[0] += 31
    fw.pump()  # released after 30 s of connected time
    now[0] += 1
    fw.pump()
    assert link.payloads() == [msg(0)] * 3
    link.ack_all()
    fw.pump()
    assert len(box) == 0


def test_forwarder_thread_sends_what_is_put(tmp_path: Path) -> None:
    box, link = Outbox(tmp_path / "outbox"), FakeLink()
    fw = Forwarder(box, link.send, lambda: link.up, tick_s=0.01)
    fw.start()
    try:
        t = Telemetry(device_id="dev-1", uptime_s=1, requests_total=0, tokens_generated_total=0, tokens_per_s=0,
                      cpu_percent=0, memory_rss_mb=1, memory_percent=1, seq=7, sent_at=datetime.now(timezone.utc))
        fw.put(t)
        deadline = time.monotonic() + 5
        while not link.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert parse_message(link.sent[0][0]) == t
        link.ack_all()
        while len(box) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(box) == 0 and files(tmp_path / "outbox") == []
    finally:
        fw.stop()


# -- reconnect backoff ----------------------------------------------------------------------------------------
def test_the_link_caps_its_reconnect_backoff(tmp_path: Path) -> None:
    trust = {"trust_root": tmp_path / "root.json", "bundle_origins": ("http://127.0.0.1:8700",)}
    assert AgentConfig(device_id="dev-1", data_dir=tmp_path, **trust).reconnect_max_s == 10.0
    seq = SeqCounter(tmp_path / "seq.json")
    link = Link("dev-1", "mqtt://127.0.0.1:1", seq=seq, on_deploy=lambda c: None, active=lambda: None, reconnect_max_s=2.5)
    assert (link.client._reconnect_min_delay, link.client._reconnect_max_delay) == (1.0, 2.5)
    with pytest.raises(ConfigError, match="reconnect_max_s"):
        Link("dev-1", "mqtt://127.0.0.1:1", seq=seq, on_deploy=lambda c: None, active=lambda: None, reconnect_max_s=0)
