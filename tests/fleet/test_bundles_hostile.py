"""Hostile bundle uploads: signed by a trusted key, but with tar members that lie. Each is refused from its header
with its own error code before any member is hashed, and nothing is left in the fleet's store."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fleet.api.app import create_app
from fleet.bundles import verify_bundle
from fleet.settings import Settings
from protocol import bundle as container
from protocol.errors import NotRegularFileError
from protocol.trust import Keyring
from tests.protocol.tarcraft import (
    FILES,
    TWO_GIB,
    envelope_member,
    gnu_sparse,
    member,
    model_members,
    signed_tar,
    tar,
)

from .conftest import ADMIN

ONNX = FILES["model.onnx"]


def replace_onnx(new: bytes):
    """Build step: the honest members with model/model.onnx (the first) replaced by `new`."""
    return lambda good: [new, *good[1:]]


CASES = [
    ("a_size_over_manifest", replace_onnx(member("model/model.onnx", ONNX[:100], size=len(ONNX) + 10**6)), "hash_mismatch"),
    ("b_gnu_sparse_2gib", replace_onnx(gnu_sparse("model/model.onnx", ONNX[:1000], TWO_GIB)), "not_regular_file"),
    ("c_symlink", replace_onnx(member("model/model.onnx", kind=tarfile.SYMTYPE, linkname="/etc/passwd")), "not_regular_file"),
    ("d_hardlink", replace_onnx(member("model/model.onnx", kind=tarfile.LNKTYPE, linkname="manifest.json")), "not_regular_file"),
    ("e_dotdot", lambda good: [*good, member("model/../../evil", b"x")], "unsafe_path"),
    ("e_outside_model", lambda good: [*good, member("evil.sh", b"x")], "unsafe_path"),
    ("f_duplicate", lambda good: [*good, good[0]], "duplicate_file"),
    ("g_not_in_manifest", lambda good: [*good, member("model/evil.py", b"print(1)")], "unexpected_file"),
    ("h_pax_size", replace_onnx(member("model/model.onnx", ONNX, pax={"size": str(TWO_GIB)})), "bad_header"),
]


@pytest.fixture
def trusting_client(settings: Settings, tmp_path: Path, key) -> Iterator[TestClient]:
    pub = tmp_path / "trusted.pub"
    pub.write_bytes(key.public.to_pem())
    with TestClient(create_app(settings.model_copy(update={"trusted_keys": [pub]})), headers=ADMIN) as c:
        yield c


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Names of the members whose bytes were read and hashed."""
    seen: list[str] = []
    copy = container._Member.copy

    def spy(self, f, out):
        seen.append(self.name)
        return copy(self, f, out)

    monkeypatch.setattr(container._Member, "copy", spy)
    return seen


def stored_files(settings: Settings) -> list[str]:
    root = settings.data_dir
    return sorted(p.relative_to(root).as_posix() for d in ("bundles", "tmp") for p in (root / d).rglob("*") if p.is_file())


@pytest.mark.parametrize("build, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_upload_is_refused_from_its_headers(
    build, code: str, trusting_client: TestClient, settings: Settings, key, hashed: list[str]
) -> None:
    r = trusting_client.post("/api/v1/bundles", content=signed_tar(key, build))
    assert r.status_code == 422, r.text
    assert r.json()["code"] == code, r.json()
    assert hashed == []  # refused before a single member was hashed
    assert stored_files(settings) == []
    assert trusting_client.get("/api/v1/bundles").json() == []


def test_honest_signed_tar_is_accepted(trusting_client: TestClient, key, hashed: list[str]) -> None:
    r = trusting_client.post("/api/v1/bundles", content=signed_tar(key, lambda good: good))
    assert r.status_code == 201, r.text
    assert sorted(hashed) == sorted(f"model/{p}" for p in FILES)


def test_verify_bundle_never_hashes_a_sparse_member(tmp_path: Path, key, hashed: list[str]) -> None:
    path = tmp_path / "sparse.bundle"
    path.write_bytes(signed_tar(key, replace_onnx(gnu_sparse("model/model.onnx", ONNX[:1000], TWO_GIB))))
    with pytest.raises(NotRegularFileError, match="model/model.onnx"):
        verify_bundle(path, Keyring(keys=(key.public,)))
    with pytest.raises(NotRegularFileError):
        verify_bundle(path, None)
    assert hashed == [] and path.stat().st_size < 20_000


@pytest.mark.parametrize(
    "envelope, code",
    [
        (b"[" * 400_000 + b"]" * 400_000, "bad_manifest"),  # nesting past Python's recursion limit
        (b'{"signed": ' + b"9" * 50_000 + b', "signatures": []}', "bad_manifest"),  # past the int-digit limit
        (b'{"signed": {"name": "\xff"}, "signatures": []}', "bad_manifest"),  # not UTF-8
    ],
    ids=["deep_nesting", "huge_number", "bad_utf8"],
)
def test_hostile_envelopes_are_422_not_500(envelope: bytes, code: str, client: TestClient, settings: Settings) -> None:
    r = client.post("/api/v1/bundles", content=tar(envelope_member(envelope)))
    assert r.status_code == 422, r.text
    assert r.json()["code"] == code and len(r.json()["detail"]) < 600
    assert stored_files(settings) == []


def test_malformed_signer_keyid_is_refused(client: TestClient, settings: Settings, key) -> None:
    doc = json.loads(container.read_envelope(io.BytesIO(signed_tar(key, lambda g: g))))
    doc["signatures"].append({"keyid": "K" * 64, "sig": "00"})
    r = client.post("/api/v1/bundles", content=tar(envelope_member(json.dumps(doc).encode()), *model_members()))
    assert r.status_code == 422 and r.json()["code"] == "bad_signature", r.text
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    "url",
    ["/api/v1/bundles/Tiny/1", "/api/v1/bundles/tiny/0", "/api/v1/bundles/tiny/99999999999999999999999",
     "/api/v1/bundles/tiny/-1/file", "/api/v1/bundles/" + "x" * 200 + "/1", "/api/v1/bundles?name=..%2Fx"],
)
def test_bad_names_and_versions_in_urls_are_422(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "bad_identifier"
