"""Identifiers from outside: one strict full-match pattern and bound each, refused with a typed error at parse time.

One row per bad value: the protocol check raises its typed error, a message or manifest carrying the value is
refused when it is parsed (MessageError / ManifestError, with a short reason), and good boundary values pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from protocol.errors import IdentifierError, ManifestError, MessageError, TopicError
from protocol.manifest import MAX_VERSION, Manifest, check_keyid, check_name, check_version
from protocol.messages import check_deployment_id, check_message_id, parse_message
from protocol.topics import check_device_id

from .tarcraft import manifest_of

SENT = "2026-01-01T00:00:00Z"
BAD_STRINGS = ["", ".", "..", "a/b", "../x", "x\n", "\nx", "x\r", "a b", "a\x00b", "é", "x" * 10_000, "-x", "_x"]
BAD_NON_STR = [5, None, ["a"], {"a": 1}, True]
BAD_VERSIONS = [0, -1, 2**63, 10**30, True, False, "1", 1.0, None, [1]]
BAD_KEYIDS = ["", "a" * 63, "a" * 65, "A" * 64, "g" * 64, "a" * 64 + "\n", " " + "a" * 63, "a" * 10_000, 7]


def deploy(**over: Any) -> dict:
    doc = {
        "kind": "deploy",
        "deployment_id": "dep-1",
        "device_id": "dev-1",
        "sent_at": SENT,
        "bundle": {"name": "triage", "version": 2, "url": "http://127.0.0.1:1/b", "sha256": "a" * 64, "size": 10},
    }
    for path, value in over.items():
        *parents, leaf = path.split("__")
        target = doc
        for p in parents:
            target = target[p]
        target[leaf] = value
    return doc


def status(**over: Any) -> dict:
    doc = {"kind": "status", "device_id": "dev-1", "deployment_id": "dep-1", "bundle_name": "triage",
           "bundle_version": 2, "state": "active", "active_version": 2, "sent_at": SENT}
    return {**doc, **over}


def telemetry(**over: Any) -> dict:
    doc = {"kind": "telemetry", "device_id": "dev-1", "active": {"name": "triage", "version": 2}, "uptime_s": 1,
           "requests_total": 0, "tokens_generated_total": 0, "tokens_per_s": 0, "cpu_percent": 0, "memory_rss_mb": 1,
           "memory_percent": 1, "sent_at": SENT}
    return {**doc, **over}


# (identifier, its check, the check's error, documents that carry it: field -> document builder)
IDENTIFIERS: list[tuple[str, Callable[[Any], Any], type, list[Any], list[Callable[[Any], dict]]]] = [
    ("device id", check_device_id, TopicError, BAD_STRINGS + BAD_NON_STR + ["x" * 129, "a+b", "a#"],
     [lambda v: deploy(device_id=v), lambda v: status(device_id=v), lambda v: telemetry(device_id=v),
      lambda v: {"kind": "presence", "device_id": v, "online": True, "sent_at": SENT}]),
    ("deployment id", check_deployment_id, IdentifierError, BAD_STRINGS + BAD_NON_STR + ["x" * 129],
     [lambda v: deploy(deployment_id=v), lambda v: status(deployment_id=v)]),
    ("bundle name", check_name, IdentifierError, BAD_STRINGS + BAD_NON_STR + ["x" * 65, "Tiny", "tiny\n"],
     [lambda v: deploy(bundle__name=v), lambda v: status(bundle_name=v), lambda v: telemetry(active={"name": v, "version": 1})]),
    ("version", check_version, IdentifierError, BAD_VERSIONS,
     [lambda v: deploy(bundle__version=v), lambda v: status(bundle_version=v),
      lambda v: status(active_version="x" if v is None else v),  # None is allowed here: "nothing serves"
      lambda v: telemetry(active={"name": "triage", "version": v})]),
    ("key id", check_keyid, IdentifierError, BAD_KEYIDS,
     [lambda v: deploy(signatures=[{"keyid": v, "sig": "0" * 128}])]),
    ("message id", check_message_id, IdentifierError, BAD_STRINGS + BAD_NON_STR,
     [lambda v: deploy(message_id=v), lambda v: status(message_id=v)]),
]
ROWS = [(name, check, error, bad, docs) for name, check, error, bads, docs in IDENTIFIERS for bad in bads]


def row_id(row: tuple) -> str:
    bad = row[3]
    shown = f"{type(bad).__name__}:{bad!r}"[:24] if not isinstance(bad, int) or abs(bad) < 10**20 else "huge-int"
    return f"{row[0]}-{shown}"


def payload(doc: dict) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize("name, check, error, bad, docs", ROWS, ids=[row_id(r) for r in ROWS])
def test_bad_identifier_is_refused_by_its_check_and_at_parse_time(name, check, error, bad, docs) -> None:
    with pytest.raises(error) as info:
        check(bad)
    assert len(str(info.value)) < 300  # a 10,000-char id is never echoed whole
    for build in docs:
        with pytest.raises(MessageError) as parsed:
            parse_message(payload(build(bad)))
        assert len(str(parsed.value)) < 600


@pytest.mark.parametrize(
    "check, good",
    [
        (check_device_id, ["a", "dev-1", "A.b_c-9", "x" * 128]),
        (check_deployment_id, ["d", "dep-1", "0123456789abcdef0123456789abcdef", "a..", "x" * 128]),
        (check_name, ["t", "tiny", "triage-v2.int4", "x" * 64]),
        (check_version, [1, 2, MAX_VERSION]),
        (check_keyid, ["0" * 64, "0123456789abcdef" * 4]),
        (check_message_id, ["m", "0123456789abcdef0123456789abcdef"]),
    ],
)
def test_good_identifiers_pass_unchanged(check, good) -> None:
    for value in good:
        assert check(value) == value


def test_valid_documents_still_parse() -> None:
    for doc in (deploy(), status(), telemetry(), deploy(signatures=[{"keyid": "a" * 64, "sig": "0" * 128}])):
        assert parse_message(payload(doc)).kind == doc["kind"]


@pytest.mark.parametrize("field, bad", [("name", v) for v in BAD_STRINGS + ["Tiny"]] + [("version", v) for v in BAD_VERSIONS])
def test_manifest_refuses_bad_name_and_version(field: str, bad: Any) -> None:
    signed = manifest_of().to_signed()
    signed[field] = bad
    with pytest.raises(ManifestError) as info:
        Manifest.from_signed(signed)
    assert field in str(info.value) and len(str(info.value)) < 600


@pytest.mark.parametrize(
    "path",
    ["a\nb", "a\x00b", "x" * 1025, "d/" + "x" * 256, "a\udcffb", "a\x7fb"],
    ids=["newline", "nul", "too_long", "long_part", "surrogate", "del"],
)
def test_manifest_refuses_file_paths_no_filesystem_should_see(path: str) -> None:
    signed = manifest_of().to_signed()
    signed["files"][0]["path"] = path
    with pytest.raises(ManifestError, match="path"):
        Manifest.from_signed(signed)


def test_sizes_and_counters_fit_63_bits() -> None:
    with pytest.raises(MessageError, match="size"):
        parse_message(payload(deploy(bundle__size=2**63)))
    with pytest.raises(MessageError, match="seq"):
        parse_message(payload(deploy(seq=2**63)))
    with pytest.raises(MessageError, match="requests_total"):
        parse_message(payload(telemetry(requests_total=2**64)))
    with pytest.raises(MessageError, match="cpu_percent"):
        parse_message(b'{"kind": "telemetry", "device_id": "d", "uptime_s": 1, "requests_total": 0, '
                      b'"tokens_generated_total": 0, "tokens_per_s": 0, "cpu_percent": NaN, "memory_rss_mb": 1, '
                      b'"memory_percent": 1, "sent_at": "2026-01-01T00:00:00Z"}')
    signed = manifest_of().to_signed()
    signed["files"][0]["size"] = 2**63
    with pytest.raises(ManifestError, match="size"):
        Manifest.from_signed(signed)
