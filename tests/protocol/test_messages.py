"""Messages and topics: typed at the edge, malformed input refused with a reason."""

import json
from datetime import datetime, timezone

import pytest

from protocol import topics
from protocol.errors import MessageError, TopicError
from protocol.messages import BundleRef, DeployCommand, Presence, StatusReport, Telemetry, UpdateState, encode, parse_message

NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
REF = BundleRef(name="triage", version=2, url="http://127.0.0.1:1/b", sha256="a" * 64, size=10)


def test_each_message_roundtrips():
    msgs = [
        DeployCommand(deployment_id="d1", device_id="dev-1", bundle=REF, seq=5, sent_at=NOW),
        StatusReport(device_id="dev-1", deployment_id="d1", bundle_name="triage", bundle_version=2,
                     state=UpdateState.REJECTED, error_code="bad_signature", detail="why", sent_at=NOW),
        Telemetry(device_id="dev-1", uptime_s=1, requests_total=2, tokens_generated_total=3, tokens_per_s=4.5,
                  cpu_percent=1, memory_rss_mb=100, memory_percent=1, sent_at=NOW),
        Presence(device_id="dev-1", online=False, sent_at=NOW),
    ]
    for m in msgs:
        back = parse_message(encode(m))
        assert back == m and type(back) is type(m)


def test_telemetry_has_no_text_fields():
    text_fields = [n for n, f in Telemetry.model_fields.items() if f.annotation is str and n not in ("device_id", "message_id")]
    assert text_fields == []


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"kind": "nope", "sent_at": "2026-01-01T00:00:00Z"}', "does not match"),
        (b'{"kind": "presence", "device_id": "d", "sent_at": "2026-01-01T00:00:00Z"}', "online"),
        (b'{"kind": "presence", "schema_version": 9, "device_id": "d", "online": true, "sent_at": "2026-01-01T00:00:00Z"}', "schema_version 9"),
        (b'{"kind": "presence", "device_id": "d", "online": true, "sent_at": "2026-01-01T00:00:00Z", "x": 1}', "x"),
        (b"x" * 70000, "byte limit"),
    ],
)
def test_malformed_messages_say_what_is_wrong(payload, reason):
    with pytest.raises(MessageError, match=reason):
        parse_message(payload)


def test_topics_build_parse_and_match():
    t = topics.status("dev-1")
    assert str(t) == "slmops/v1/devices/dev-1/status"
    assert topics.Topic.parse(str(t)) == t
    assert t.matches(topics.Topic.wildcard(topics.Channel.STATUS))
    assert not t.matches(topics.Topic.wildcard(topics.Channel.TELEMETRY))
    assert topics.topic_matches("slmops/#", str(t))
    assert topics.shared("fleet", "a/+/b") == "$share/fleet/a/+/b"
    for bad in ("slmops/v2/devices/x/status", "slmops/v1/devices/x/nope", "slmops/v1/devices/a+b/cmd"):
        with pytest.raises(TopicError):
            topics.Topic.parse(bad)


def test_broker_urls():
    b = topics.BrokerAddress.parse("mqtt5://127.0.0.1:1999")
    assert (b.host, b.port, b.protocol, b.tls) == ("127.0.0.1", 1999, 5, False)
    assert str(topics.BrokerAddress.parse("mqtt://h")) == "mqtt://h:1883"
    for bad in ("http://h", "mqtt://:1", "mqtt://h:x"):
        with pytest.raises(TopicError):
            topics.BrokerAddress.parse(bad)


@pytest.mark.parametrize("field, value", [
    ("error_code", "Disk Full"), ("error_code", "disk_full\n"), ("error_code", "x" * 65), ("error_code", ""),
    ("detail", "d" * 4097),
])
def test_status_report_bounds_its_error_code_and_detail(field, value):
    from datetime import datetime, timezone

    from protocol.errors import MessageError
    from protocol.messages import StatusReport, UpdateState, encode, parse_message

    good = StatusReport(device_id="d-1", deployment_id="dep-1", bundle_name="triage", bundle_version=2,
                        state=UpdateState.FAILED, error_code="disk_full", detail="ok", sent_at=datetime.now(timezone.utc))
    assert parse_message(encode(good)) == good
    doc = json.loads(encode(good))
    doc[field] = value
    with pytest.raises(MessageError):
        parse_message(json.dumps(doc).encode())


class OlderDeployCommand(DeployCommand):
    """A receiver of the release before download-only: the same model without the field."""

    model_config = {**DeployCommand.model_config}


del OlderDeployCommand.model_fields["download_only"]
OlderDeployCommand.model_rebuild(force=True)


def test_download_only_is_off_the_wire_and_out_of_the_signature_while_false():
    """A command without download-only looks, byte for byte and signature for signature, like one from the release
    before it: older agents still parse and verify it; one that sets it says so on the wire and under the signature."""
    from protocol.trust import Keyring, generate_keypair, sign_message, verify_message

    key = generate_keypair()
    plain = sign_message(DeployCommand(deployment_id="d1", device_id="dev-1", bundle=REF, seq=5, sent_at=NOW), [key])
    wire = json.loads(encode(plain))
    assert "download_only" not in wire
    older = OlderDeployCommand.model_validate(wire)  # what the earlier release builds from these bytes
    assert "download_only" not in older.model_dump()
    assert older.signing_bytes() == plain.signing_bytes()
    verify_message(older, Keyring((key.public,)))

    staged = sign_message(plain.model_copy(update={"download_only": True}), [key])
    wire = json.loads(encode(staged))
    assert wire["download_only"] is True and parse_message(encode(staged)) == staged
    verify_message(parse_message(encode(staged)), Keyring((key.public,)))
    wire["download_only"] = False  # someone flips it on the way: the signature no longer holds
    with pytest.raises(Exception, match="signature"):
        verify_message(parse_message(json.dumps(wire).encode()), Keyring((key.public,)))


@pytest.mark.parametrize("value", ["yes", 1, None], ids=["string", "integer", "null"])
def test_download_only_must_be_a_boolean(value):
    doc = json.loads(encode(DeployCommand(deployment_id="d1", device_id="dev-1", bundle=REF, seq=5, sent_at=NOW)))
    doc["download_only"] = value
    with pytest.raises(MessageError, match="download_only"):
        parse_message(json.dumps(doc).encode())


def test_downloaded_is_a_terminal_state():
    assert UpdateState.DOWNLOADED.terminal and UpdateState("downloaded") is UpdateState.DOWNLOADED
