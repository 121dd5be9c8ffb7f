"""Signatures and bundle verification: pure functions over bytes, each attack refused with its own error."""

import hashlib
import io
import json
from datetime import datetime, timedelta, timezone

import pytest

from protocol.bundle import read_envelope, unpack, write_bundle
from protocol.errors import (
    BadVersionNumberError,
    ConfigError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    ManifestError,
    MissingFileError,
    SignatureError,
    UnexpectedFileError,
)
from protocol.manifest import FileEntry, Manifest, canonical_bytes
from protocol.trust import (
    Keyring,
    PrivateKey,
    PublicKey,
    add_signatures,
    generate_keypair,
    read_unverified,
    sign_envelope,
    verify_envelope,
)

NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
FILES = {"model.onnx": b"\x08\x01graph" * 50, "genai_config.json": b'{"model": {}}', "sub/tokenizer.json": b"{}"}


def manifest(version=1, expires=None, files=FILES) -> Manifest:
    return Manifest(
        name="triage",
        version=version,
        files=[FileEntry(path=p, size=len(b), sha256=hashlib.sha256(b).hexdigest()) for p, b in files.items()],
        created=NOW,
        expires=expires,
    )


def bundle_bytes(envelope: bytes, files=FILES) -> bytes:
    out = io.BytesIO()
    write_bundle(out, envelope, [(p, io.BytesIO(b), len(b)) for p, b in files.items()])
    return out.getvalue()


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return generate_keypair()


@pytest.fixture(scope="module")
def ring(key) -> Keyring:
    return Keyring((key.public,))


def test_canonical_bytes_are_order_independent():
    assert canonical_bytes({"b": 1, "a": [1, "é"]}) == canonical_bytes({"a": [1, "é"], "b": 1}) == '{"a":[1,"é"],"b":1}'.encode()
    with pytest.raises(ManifestError):
        canonical_bytes({"x": float("nan")})


def test_sign_then_verify_roundtrip(key, ring):
    env = sign_envelope(manifest(), [key])
    m = verify_envelope(env, ring, now=NOW)
    assert m == manifest()
    assert json.loads(env)["signatures"][0]["keyid"] == key.keyid


def test_keys_roundtrip_through_pem(key):
    assert PrivateKey.from_pem(key.to_pem()).keyid == key.keyid
    assert PublicKey.from_pem(key.public.to_pem()).keyid == key.keyid
    with pytest.raises(ConfigError, match="PEM"):
        PublicKey.from_pem(b"not a key")


def test_changed_manifest_field_is_refused(key, ring):
    doc = json.loads(sign_envelope(manifest(), [key]))
    doc["signed"]["version"] = 99
    with pytest.raises(SignatureError, match="changed after signing"):
        verify_envelope(json.dumps(doc).encode(), ring)


def test_signature_by_another_key_is_refused(ring):
    other = generate_keypair()
    env = sign_envelope(manifest(), [other])
    with pytest.raises(SignatureError, match="untrusted key"):
        verify_envelope(env, ring)


def test_threshold_counts_distinct_trusted_keys(key):
    second = generate_keypair()
    ring2 = Keyring((key.public, second.public), threshold=2)
    one = sign_envelope(manifest(), [key])
    with pytest.raises(SignatureError, match="1 valid signature"):
        verify_envelope(one, ring2)
    doubled = json.loads(one)
    doubled["signatures"] *= 2  # the same signature twice must not count twice
    with pytest.raises(SignatureError):
        verify_envelope(json.dumps(doubled).encode(), ring2)
    assert verify_envelope(add_signatures(one, [second]), ring2).version == 1
    with pytest.raises(ConfigError):
        Keyring((key.public,), threshold=2)


def test_expired_and_rolled_back_manifests_are_refused(key, ring):
    env = sign_envelope(manifest(expires=NOW - timedelta(seconds=1)), [key])
    with pytest.raises(ExpiredMetadataError, match="expired"):
        verify_envelope(env, ring, now=NOW)
    env = sign_envelope(manifest(version=2), [key])
    with pytest.raises(BadVersionNumberError, match="older than v3"):
        verify_envelope(env, ring, min_version=3)


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b'{"signed": 1, "signatures": []}', b"\xff\xfe"])
def test_malformed_envelopes_get_a_manifest_error(payload, ring):
    with pytest.raises(ManifestError):
        verify_envelope(payload, ring)


def test_unverified_read_parses_but_does_not_trust(key):
    assert read_unverified(sign_envelope(manifest(version=7), [key])).version == 7


def test_unsafe_paths_are_rejected_by_the_schema():
    for bad in ("../x", "/etc/passwd", "a/../b", "a//b", "a\\b"):
        with pytest.raises(ValueError):
            FileEntry(path=bad, size=1, sha256="0" * 64)


def test_bundle_roundtrip_and_every_tamper(key, ring):
    env = sign_envelope(manifest(), [key])
    data = bundle_bytes(env)
    m = verify_envelope(read_envelope(io.BytesIO(data)), ring)
    got: dict[str, bytes] = {}

    class Sink(io.BytesIO):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def close(self):
            got[self.name] = self.getvalue()
            super().close()

    unpack(io.BytesIO(data), m, Sink)
    assert got == FILES

    # one changed byte inside a model file
    i = data.index(b"graph")
    flipped = data[:i] + b"G" + data[i + 1:]
    with pytest.raises(LengthOrHashMismatchError, match="model.onnx"):
        unpack(io.BytesIO(flipped), m)
    # a file the manifest does not name
    extra = bundle_bytes(env, {**FILES, "evil.py": b"print(1)"})
    with pytest.raises(UnexpectedFileError, match="evil.py"):
        unpack(io.BytesIO(extra), m)
    # a file missing
    short = bundle_bytes(env, {k: v for k, v in FILES.items() if k != "genai_config.json"})
    with pytest.raises(MissingFileError, match="genai_config.json"):
        unpack(io.BytesIO(short), m)
    # not a bundle at all
    with pytest.raises(ManifestError, match="not a slmops bundle"):
        read_envelope(io.BytesIO(b"hello"))
