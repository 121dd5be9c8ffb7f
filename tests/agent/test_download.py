"""Resumable, size-capped, hashing download (httpx MockTransport stands in for the fleet's Range server)."""

import hashlib

import httpx
import pytest

from agent.download import fetch
from protocol.errors import DownloadError, LengthOrHashMismatchError
from protocol.messages import BundleRef

DATA = bytes(range(256)) * 400


def ref(data=DATA, sha=None) -> BundleRef:
    return BundleRef(name="b", version=1, url="http://fleet/b", sha256=sha or hashlib.sha256(data).hexdigest(), size=len(data))


class Server:
    """Serves DATA with Range support; the first `cut` responses stop after `cut_at` bytes."""

    def __init__(self, data=DATA, cut=0, cut_at=1000, honour_range=True):
        self.data, self.cut, self.cut_at, self.honour_range = data, cut, cut_at, honour_range
        self.ranges: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        rng = request.headers.get("range")
        self.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng and self.honour_range else 0
        body = self.data[start:]
        if self.cut > 0:
            self.cut -= 1
            body = body[: self.cut_at]
            # a body shorter than announced: the transport ends the stream early
            return httpx.Response(206 if start else 200, content=body)
        return httpx.Response(206 if start else 200, content=body)


def client(server) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(server))


def test_plain_download_matches(tmp_path):
    dest = fetch(ref(), tmp_path / "b.tar", client=client(Server()), max_bytes=10**9, sleep=lambda s: None)
    assert dest.read_bytes() == DATA


def test_cut_download_resumes_with_range(tmp_path):
    server = Server(cut=2, cut_at=30000)
    dest = fetch(ref(), tmp_path / "b.tar", client=client(server), max_bytes=10**9, sleep=lambda s: None)
    assert dest.read_bytes() == DATA
    assert server.ranges == [None, "bytes=30000-", "bytes=60000-"]


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    server = Server(cut=1, cut_at=5000, honour_range=False)
    dest = fetch(ref(), tmp_path / "b.tar", client=client(server), max_bytes=10**9, sleep=lambda s: None)
    assert dest.read_bytes() == DATA


def test_size_cap_and_wrong_hash_and_dead_server(tmp_path):
    with pytest.raises(DownloadError, match="cap"):
        fetch(ref(), tmp_path / "a", client=client(Server()), max_bytes=100)
    with pytest.raises(LengthOrHashMismatchError, match="differs"):
        fetch(ref(sha="0" * 64), tmp_path / "b", client=client(Server()), max_bytes=10**9)
    assert not (tmp_path / "b").exists()
    longer = Server(data=DATA + b"extra")
    with pytest.raises(LengthOrHashMismatchError, match="more than"):
        fetch(ref(), tmp_path / "c", client=client(longer), max_bytes=10**9, attempts=1)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(ref(), tmp_path / "d", client=client(lambda r: httpx.Response(404)), max_bytes=10**9, attempts=2, sleep=lambda s: None)
