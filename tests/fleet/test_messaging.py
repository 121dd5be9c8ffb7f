"""MQTT in and out of the fleet with a real amqtt broker and paho clients playing the devices."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fleet.models import Command, StatusReportRow, TelemetrySample
from protocol import topics
from protocol.messages import (
    ActiveModel,
    BundleRef,
    DeployCommand,
    Presence,
    StatusReport,
    Telemetry,
    UpdateState,
    encode,
    parse_message,
)

from .conftest import wait_until


def now() -> datetime:
    return datetime.now(timezone.utc)


def count(client: TestClient, table: type) -> int:
    with client.app.state.fleet.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


def status(device: str, deployment: str, state: UpdateState, *, seq: int, active: int | None = None, **kw) -> StatusReport:
    return StatusReport(
        device_id=device,
        deployment_id=deployment,
        bundle_name="tiny",
        bundle_version=1,
        state=state,
        active_version=active,
        seq=seq,
        sent_at=now(),
        **kw,
    )


@pytest.fixture
def stored(client: TestClient, make_bundle) -> dict:
    r = client.post("/api/v1/bundles", content=make_bundle("tiny", 1).read_bytes())
    assert r.status_code == 201
    return r.json()


@pytest.mark.both_databases
def test_group_deploy_publishes_one_command_per_device(client: TestClient, devices, stored: dict) -> None:
    for dev, groups in (("dev-a", ["lab"]), ("dev-b", ["lab", "edge"]), ("dev-c", ["edge"])):
        assert client.post("/api/v1/devices", json={"id": dev, "groups": groups}).status_code == 201
    assert client.post("/api/v1/devices", json={"id": "dev-c", "groups": ["lab"]}).status_code == 200
    spies = {dev: devices(f"slmops-agent-{dev}") for dev in ("dev-a", "dev-b", "dev-c")}
    for dev, spy in spies.items():
        spy.subscribe(str(topics.cmd(dev)))

    def received() -> list:  # every device's commands, device by device
        return [m for d in spies.values() for m in d.received()]

    r = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "group": "lab"})
    assert r.status_code == 201, r.text
    deployment = r.json()
    assert sorted(t["device_id"] for t in deployment["targets"]) == ["dev-a", "dev-b", "dev-c"]
    assert deployment["counts"] == {"pending": 3}

    wait_until(lambda: len(received()) >= 3, what="three deploy commands")
    msgs = received()
    assert len(msgs) == 3
    commands = [parse_message(m.payload) for m in msgs]
    assert all(isinstance(c, DeployCommand) for c in commands)
    assert sorted(m.topic for m in msgs) == [str(topics.cmd(d)) for d in ("dev-a", "dev-b", "dev-c")]
    for m, c in zip(msgs, commands):
        assert m.topic == str(topics.cmd(c.device_id)) and m.qos == 1 and not m.retain
        assert c.deployment_id == deployment["id"]
        assert c.bundle == BundleRef(
            name="tiny",
            version=1,
            url="http://fleet.test:8700/api/v1/bundles/tiny/1/file",
            sha256=stored["sha256"],
            size=stored["size"],
        )
    seqs = sorted(c.seq for c in commands)
    assert len(set(seqs)) == 3 and seqs[0] >= 1
    assert count(client, Command) == 3

    single = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "device_id": "dev-a"})
    assert single.status_code == 201
    wait_until(lambda: len(received()) == 4, what="the single-device command")
    assert parse_message(spies["dev-a"].received()[-1].payload).seq > seqs[-1]


def test_deploy_refusals_say_what_to_do(client: TestClient, stored: dict) -> None:
    r = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "group": "nobody"})
    assert r.status_code == 404 and "POST /api/v1/devices" in r.json()["detail"]
    r = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 9, "device_id": "x"})
    assert r.status_code == 404 and "upload it first" in r.json()["detail"]
    r = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "device_id": "x", "group": "g"})
    assert r.status_code == 422 and "exactly one" in r.text
    assert client.get("/api/v1/deployments").json() == []


@pytest.mark.both_databases
def test_status_reports_land_in_history_and_deployment_state(client: TestClient, devices, stored: dict) -> None:
    client.post("/api/v1/devices", json={"id": "dev-a", "groups": ["lab"]})
    dep = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "device_id": "dev-a"}).json()
    agent = devices("slmops-agent-dev-a")
    topic = str(topics.status("dev-a"))

    agent.publish(topic, encode(status("dev-a", dep["id"], UpdateState.DOWNLOADING, seq=5)))
    agent.publish(topic, encode(final := status("dev-a", dep["id"], UpdateState.ACTIVE, seq=9, active=1)))
    wait_until(lambda: client.get(f"/api/v1/deployments/{dep['id']}").json()["counts"] == {"active": 1}, what="active")

    agent.publish(topic, encode(final))  # a QoS 1 redelivery: same message_id
    late = status("dev-a", dep["id"], UpdateState.VERIFYING, seq=7)  # older seq, arriving late
    agent.publish(topic, encode(late))
    wait_until(lambda: count(client, StatusReportRow) == 3, what="the late report in the history")

    device = client.get("/api/v1/devices/dev-a").json()
    assert [h["state"] for h in device["history"]] == ["downloading", "active", "verifying"]  # as received
    assert device["active"] == {"name": "tiny", "version": 1}
    assert device["desired"] == {"deployment_id": dep["id"], "bundle_name": "tiny", "bundle_version": 1, "state": "active"}
    target = client.get(f"/api/v1/deployments/{dep['id']}").json()["targets"][0]
    assert target["state"] == "active"
    metrics = client.get("/metrics").text
    assert 'slmops_status_reports_total{state="active"} 1.0' in metrics
    assert 'slmops_status_reports_total{state="downloading"} 1.0' in metrics


def test_failed_report_keeps_reason(client: TestClient, devices, stored: dict) -> None:
    client.post("/api/v1/devices", json={"id": "dev-a"})
    dep = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "device_id": "dev-a"}).json()
    report = status("dev-a", dep["id"], UpdateState.REJECTED, seq=1, error_code="bad_signature", detail="untrusted key")
    devices("slmops-agent-dev-a").publish(str(topics.status("dev-a")), encode(report))
    url = f"/api/v1/deployments/{dep['id']}"
    wait_until(lambda: client.get(url).json()["targets"][0]["state"] == "rejected", what="rejected")
    target = client.get(url).json()["targets"][0]
    assert (target["error_code"], target["detail"]) == ("bad_signature", "untrusted key")


def test_malformed_payloads_are_dropped_and_ingest_goes_on(client: TestClient, devices, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="fleet.messaging")
    peers = {dev: devices(f"slmops-agent-{dev}") for dev in ("dev-x", "dev-y", "dev-ok")}
    deploy = DeployCommand(
        device_id="dev-x",
        deployment_id="d",
        sent_at=now(),
        bundle=BundleRef(name="tiny", version=1, url="http://x/y", sha256="0" * 64, size=1),
    )
    bad = [
        (str(topics.status("dev-x")), b"not json at all"),
        (str(topics.status("dev-x")), b'{"kind": "status", "device_id": "dev-x"}'),
        (str(topics.status("dev-x")), b'{"kind": "status", "schema_version": 7}'),
        (str(topics.status("dev-x")), encode(deploy)),
        (str(topics.telemetry("dev-x")), encode(Presence(device_id="dev-x", online=True, sent_at=now()))),
        (str(topics.presence("dev-y")), encode(Presence(device_id="dev-x", online=True, sent_at=now()))),
        (str(topics.status("dev-x")), b"{" + b" " * 70_000 + b"}"),
        ("slmops/v1/devices/dev-x/status/extra", b"{}"),
    ]
    for topic, payload in bad:
        peers[topic.split("/")[3]].publish(topic, payload)  # each from the device whose topic it is
    peers["dev-ok"].publish(str(topics.presence("dev-ok")), encode(Presence(device_id="dev-ok", online=True, sent_at=now())))
    wait_until(lambda: client.get("/api/v1/devices/dev-ok").status_code == 200, what="the valid presence after bad ones")

    assert [d["id"] for d in client.get("/api/v1/devices").json()] == ["dev-ok"]
    assert count(client, StatusReportRow) == 0
    dropped = [r.getMessage() for r in caplog.records if "dropped message" in r.getMessage()]
    assert len(dropped) == 7, dropped  # the 8th topic is not matched by the fleet's wildcards at all
    assert any("not JSON" in d for d in dropped)
    assert any("does not belong on the status channel" in d for d in dropped)
    assert any("came on 'dev-y'" in d for d in dropped)
    assert any("over the 65536 byte limit" in d for d in dropped)
    assert client.app.state.fleet.messaging.connected


@pytest.mark.both_databases
def test_telemetry_is_stored(client: TestClient, devices) -> None:
    sample = Telemetry(
        device_id="dev-t",
        active=ActiveModel(name="tiny", version=1),
        uptime_s=12.5,
        requests_total=3,
        tokens_generated_total=40,
        tokens_per_s=21.0,
        cpu_percent=30.0,
        memory_rss_mb=512.0,
        memory_percent=12.0,
        sent_at=now(),
    )
    devices("slmops-agent-dev-t").publish(str(topics.telemetry("dev-t")), encode(sample))
    wait_until(lambda: count(client, TelemetrySample) == 1, what="the telemetry sample")
    with client.app.state.fleet.db.sessions() as s:
        row = s.scalars(select(TelemetrySample)).one()
    assert (row.device_id, row.tokens_generated_total, row.memory_rss_mb) == ("dev-t", 40, 512.0)
    assert client.get("/api/v1/devices/dev-t").json()["last_seen"] is not None


def test_last_will_marks_a_dead_device_offline(client: TestClient, devices) -> None:
    presence = str(topics.presence("dev-w"))
    offline = encode(Presence(device_id="dev-w", online=False, agent_version="0.1", sent_at=now()))
    agent = devices("slmops-agent-dev-w", will=(presence, offline), loop=False)
    online = Presence(device_id="dev-w", online=True, agent_version="0.1", active=ActiveModel(name="tiny", version=1), sent_at=now())
    agent.publish(presence, encode(online), retain=True)
    wait_until(lambda: client.get("/api/v1/devices/dev-w").status_code == 200 and client.get("/api/v1/devices/dev-w").json()["online"], what="online")
    assert 'slmops_devices_online 1.0' in client.get("/metrics").text

    agent.client.socket().close()  # the device dies: no DISCONNECT packet, so the broker sends the will

    wait_until(lambda: not client.get("/api/v1/devices/dev-w").json()["online"], what="the last will")
    device = client.get("/api/v1/devices/dev-w").json()
    assert device["agent_version"] == "0.1" and device["active"] == {"name": "tiny", "version": 1}
    assert 'slmops_devices_online 0.0' in client.get("/metrics").text


@pytest.mark.both_databases
def test_device_coming_online_gets_its_unfinished_deployment_again(client: TestClient, devices, stored: dict) -> None:
    client.post("/api/v1/devices", json={"id": "dev-r"})
    dep = client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "device_id": "dev-r"}).json()
    agent = devices("slmops-agent-dev-r")
    agent.subscribe(str(topics.cmd("dev-r")))
    agent.publish(str(topics.presence("dev-r")), encode(Presence(device_id="dev-r", online=True, sent_at=now())))
    # the resend is decided once the presence is stored; until then a status report could land in the same ingest
    # batch, and a device already active is (rightly) not asked again
    wait_until(lambda: count(client, Command) == 2, what="the command sent again")
    wait_until(lambda: len(agent.received()) >= 1, what="the command at the device")
    for message in agent.received():  # the resend, and the first send too when the broker was slower than we were
        again = parse_message(message.payload)
        assert isinstance(again, DeployCommand) and again.deployment_id == dep["id"]

    agent.publish(str(topics.status("dev-r")), encode(status("dev-r", dep["id"], UpdateState.ACTIVE, seq=1, active=1)))
    wait_until(lambda: client.get(f"/api/v1/deployments/{dep['id']}").json()["counts"] == {"active": 1}, what="active")
    seen = client.get("/api/v1/devices/dev-r").json()["last_seen"]
    agent.publish(str(topics.presence("dev-r")), encode(Presence(device_id="dev-r", online=True, sent_at=now())))
    wait_until(lambda: client.get("/api/v1/devices/dev-r").json()["last_seen"] != seen, what="the second presence")
    assert count(client, Command) == 2  # the first send and one resend; none once the device is active
