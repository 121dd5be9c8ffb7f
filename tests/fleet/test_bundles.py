"""Bundle build, sign and verify with real Ed25519 keys over fake model folders."""

from __future__ import annotations

import json
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest

from fleet.bundles import build_bundle, read_bundle_envelope, sign_bundle, signer_keyids, verify_bundle
from protocol.errors import (
    ConfigError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    ManifestError,
    SignatureError,
)
from protocol.manifest import canonical_bytes
from protocol.trust import Keyring

from .conftest import NOW, flip_byte, make_model_dir, rewrite_envelope


def test_build_then_verify_roundtrip(model_dir: Path, make_bundle, key) -> None:
    path = make_bundle("tiny", 3)
    manifest = verify_bundle(path, Keyring(keys=(key.public,)), now=NOW)
    assert (manifest.name, manifest.version) == ("tiny", 3)
    assert [f.path for f in manifest.files] == [
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer/tokenizer.json",
    ]
    assert manifest.file("model.onnx.data").size == 20_000
    assert manifest.eval.dataset == "ref-task" and manifest.eval.metrics == {"accuracy": 0.91}
    assert [(p.prompt, p.expect) for p in manifest.health.prompts] == [("2+2=", "4")]
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and "model/eval.json" not in names
    assert signer_keyids(read_bundle_envelope(path)) == [key.keyid]


def test_same_inputs_give_same_bytes(model_dir: Path, tmp_path: Path, key) -> None:
    a, b = tmp_path / "a.bundle", tmp_path / "b.bundle"
    for out in (a, b):
        build_bundle(model_dir, out, name="tiny", version=1, signers=[key], now=NOW)
    assert a.read_bytes() == b.read_bytes()


def test_unsigned_bundle_is_refused_until_signed(make_bundle, key, other_key) -> None:
    path = make_bundle(signers=[])
    with pytest.raises(SignatureError, match="no signature"):
        verify_bundle(path, None)
    with pytest.raises(SignatureError):
        verify_bundle(path, Keyring(keys=(key.public,)))
    sign_bundle(path, [key])
    sign_bundle(path, [other_key])
    both = Keyring(keys=(key.public, other_key.public), threshold=2)
    assert verify_bundle(path, both).name == "tiny"
    assert signer_keyids(read_bundle_envelope(path)) == sorted([key.keyid, other_key.keyid])


def test_changed_model_byte_is_refused(make_bundle, key) -> None:
    path = make_bundle()
    flip_byte(path, "model/model.onnx.data", at=12_345)
    with pytest.raises(LengthOrHashMismatchError, match="model.onnx.data"):
        verify_bundle(path, Keyring(keys=(key.public,)))


def test_changed_manifest_field_is_refused(make_bundle, key) -> None:
    path = make_bundle(version=1)
    doc = json.loads(read_bundle_envelope(path))
    doc["signed"]["version"] = 99
    rewrite_envelope(path, canonical_bytes(doc))
    with pytest.raises(SignatureError, match="0 valid signature"):
        verify_bundle(path, Keyring(keys=(key.public,)))


def test_signature_by_untrusted_key_is_refused(make_bundle, key, other_key) -> None:
    path = make_bundle(signers=[other_key])
    with pytest.raises(SignatureError, match="untrusted key"):
        verify_bundle(path, Keyring(keys=(key.public,)))


def test_expired_bundle_is_refused_with_and_without_keyring(tmp_path: Path, model_dir: Path, key) -> None:
    path = tmp_path / "old.bundle"
    build_bundle(model_dir, path, name="tiny", version=1, signers=[key], now=NOW, expires=NOW + timedelta(days=1))
    later = NOW + timedelta(days=2)
    with pytest.raises(ExpiredMetadataError):
        verify_bundle(path, Keyring(keys=(key.public,)), now=later)
    with pytest.raises(ExpiredMetadataError):
        verify_bundle(path, None, now=later)
    assert verify_bundle(path, None, now=NOW).version == 1


def test_not_a_bundle_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ManifestError):
        verify_bundle(junk, None)


def test_bad_inputs_are_config_errors(tmp_path: Path, key) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_bundle(tmp_path / "missing", tmp_path / "x.bundle", name="t", version=1, signers=[key], now=NOW)
    bad_eval = make_model_dir(tmp_path / "m", eval_doc='{"metrics": {"accuracy": "high"}}')
    with pytest.raises(ConfigError, match="eval file"):
        build_bundle(bad_eval, tmp_path / "x.bundle", name="t", version=1, signers=[key], now=NOW)
    good = make_model_dir(tmp_path / "ok")
    with pytest.raises(ManifestError, match="name"):
        build_bundle(good, tmp_path / "y.bundle", name="Not Valid", version=1, signers=[key], now=NOW)
    assert not (tmp_path / "x.bundle").exists() and not (tmp_path / "y.bundle").exists()
