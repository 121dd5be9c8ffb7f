"""Bundle upload, listing and Range download through the real app (SQLite file, real broker, real keys)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fleet.api.app import create_app
from fleet.bundles import read_bundle_envelope
from fleet.settings import Settings
from protocol.manifest import canonical_bytes

from .conftest import ADMIN, flip_byte, make_model_dir, rewrite_envelope


@pytest.fixture
def trusting_client(settings: Settings, tmp_path: Path, key) -> Iterator[TestClient]:
    """A fleet that accepts only bundles signed by `key`."""
    pub = tmp_path / "trusted.pub"
    pub.write_bytes(key.public.to_pem())
    with TestClient(create_app(settings.model_copy(update={"trusted_keys": [pub]})), headers=ADMIN) as c:
        yield c


def stored_files(settings: Settings) -> list[str]:
    """Every file in the bundle store and its upload area."""
    root = settings.data_dir
    return sorted(p.relative_to(root).as_posix() for d in ("bundles", "tmp") for p in (root / d).rglob("*") if p.is_file())


def test_upload_list_show_and_download_with_range(client: TestClient, settings: Settings, make_bundle) -> None:
    path = make_bundle("tiny", 2)
    data = path.read_bytes()
    r = client.post("/api/v1/bundles", content=data)
    assert r.status_code == 201, r.text
    summary = r.json()
    assert (summary["name"], summary["version"], summary["size"]) == ("tiny", 2, len(data))
    assert summary["eval"]["metrics"] == {"accuracy": 0.91} and summary["files"] == 4
    assert summary["warning"] is None
    assert stored_files(settings) == ["bundles/tiny/2.bundle"]

    assert [b["version"] for b in client.get("/api/v1/bundles").json()] == [2]
    detail = client.get("/api/v1/bundles/tiny/2").json()
    assert detail["manifest"]["name"] == "tiny" and len(detail["manifest"]["files"]) == 4

    full = client.get("/api/v1/bundles/tiny/2/file")
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{summary["sha256"]}"'
    part = client.get("/api/v1/bundles/tiny/2/file", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = client.get("/api/v1/bundles/tiny/2/file", headers={"Range": f"bytes={len(data) - 10}-"})
    assert tail.status_code == 206 and tail.content == data[-10:]


def test_same_bytes_again_is_ok_other_bytes_same_version_is_409(
    client: TestClient, settings: Settings, make_bundle, tmp_path: Path
) -> None:
    first = make_bundle("tiny", 1)
    assert client.post("/api/v1/bundles", content=first.read_bytes()).status_code == 201
    again = client.post("/api/v1/bundles", content=first.read_bytes())
    assert again.status_code == 200 and again.json()["sha256"] == client.get("/api/v1/bundles/tiny/1").json()["sha256"]

    other = make_bundle("tiny", 1, src=make_model_dir(tmp_path / "other", seed=7))
    r = client.post("/api/v1/bundles", content=other.read_bytes())
    assert r.status_code == 409
    assert "already stored with other content" in r.json()["detail"] and r.json()["code"] == "conflict"
    assert (settings.data_dir / "bundles/tiny/1.bundle").read_bytes() == first.read_bytes()
    assert stored_files(settings) == ["bundles/tiny/1.bundle"]


def test_older_version_is_stored_with_a_warning(client: TestClient, make_bundle) -> None:
    assert client.post("/api/v1/bundles", content=make_bundle("tiny", 5).read_bytes()).status_code == 201
    r = client.post("/api/v1/bundles", content=make_bundle("tiny", 3).read_bytes())
    assert r.status_code == 201
    assert "older than v5" in r.json()["warning"]


@pytest.mark.parametrize("attack", ["model_byte", "manifest_field", "other_signer", "unsigned"])
def test_refused_uploads_leave_nothing_behind(
    attack: str, trusting_client: TestClient, settings: Settings, make_bundle, other_key
) -> None:
    if attack == "other_signer":
        path = make_bundle(signers=[other_key])
    elif attack == "unsigned":
        path = make_bundle(signers=[])
    else:
        path = make_bundle()
    if attack == "model_byte":
        flip_byte(path, "model/model.onnx")
    elif attack == "manifest_field":
        doc = json.loads(read_bundle_envelope(path))
        doc["signed"]["eval"]["metrics"]["accuracy"] = 0.99
        rewrite_envelope(path, canonical_bytes(doc))
    expected = {"model_byte": "hash_mismatch", "manifest_field": "bad_signature"}.get(attack, "bad_signature")

    r = trusting_client.post("/api/v1/bundles", content=path.read_bytes())
    assert r.status_code == 422, r.text
    assert r.json()["code"] == expected
    assert trusting_client.get("/api/v1/bundles").json() == []
    assert trusting_client.get("/api/v1/bundles/tiny/1").status_code == 404
    assert stored_files(settings) == []


def test_trusted_signer_is_accepted(trusting_client: TestClient, make_bundle) -> None:
    assert trusting_client.post("/api/v1/bundles", content=make_bundle().read_bytes()).status_code == 201


def test_oversized_and_empty_uploads_are_refused(settings: Settings, make_bundle) -> None:
    data = make_bundle().read_bytes()
    with TestClient(create_app(settings.model_copy(update={"max_bundle_bytes": len(data) - 1})), headers=ADMIN) as c:
        r = c.post("/api/v1/bundles", content=data)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        chunked = c.post("/api/v1/bundles", content=iter([data[:5000], data[5000:]]))
        assert chunked.status_code == 413
        empty = c.post("/api/v1/bundles", content=b"")
        assert empty.status_code == 422 and "empty" in empty.json()["detail"]
        assert c.get("/api/v1/bundles").json() == []
    assert stored_files(settings) == []


def test_unknown_bundle_is_404_with_a_hint(client: TestClient) -> None:
    r = client.get("/api/v1/bundles/nope/1/file")
    assert r.status_code == 404 and "upload" in r.json()["detail"]
