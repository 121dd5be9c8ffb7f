"""The agent's MQTT link against poison on its command topic, through a real amqtt broker: every bad payload (and
a bug in the deploy handler) is logged on one line and dropped, the network thread lives on, and the next valid
deploy command still reaches `on_deploy` — also when a retained poison message waits on the topic at start."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.link import Link
from agent.store import SeqCounter
from protocol import topics
from protocol.messages import BundleRef, DeployCommand, encode
from tests.net import FLEET_PASSWORD, device_password, embedded_broker

DEVICE = "dev-1"
CMD = str(topics.cmd(DEVICE))
GOOD = {
    "kind": "deploy", "deployment_id": "dep-1", "device_id": DEVICE, "sent_at": "2026-01-01T00:00:00Z",
    "bundle": {"name": "triage", "version": 2, "url": "http://127.0.0.1:1/b", "sha256": "a" * 64, "size": 10},
}
POISON = [
    ("digits_100k", b"9" * 100_000),
    ("digits_60k_in_json", b'{"kind": "deploy", "seq": ' + b"9" * 60_000 + b"}"),
    ("nested_100k", b"[" * 100_000 + b"]" * 100_000),
    ("nested_30k", b"[" * 30_000 + b"]" * 30_000),
    ("invalid_utf8", b'{"kind": "deploy", "deployment_id": "\xff\xfe"}'),
    ("one_mib", b"x" * (1 << 20)),
    ("empty", b""),
    ("array", b"[]"),
    ("null", b"null"),
    ("status_on_cmd", json.dumps({"kind": "presence", "device_id": DEVICE, "online": True,
                                  "sent_at": "2026-01-01T00:00:00Z"}).encode()),
    ("other_device", json.dumps({**GOOD, "device_id": "dev-2"}).encode()),
    ("deployment_dotdot", json.dumps({**GOOD, "deployment_id": ".."}).encode()),
    ("deployment_slash", json.dumps({**GOOD, "deployment_id": "a/b"}).encode()),
    ("deployment_newline", json.dumps({**GOOD, "deployment_id": "x\n"}).encode()),
    ("deployment_10k", json.dumps({**GOOD, "deployment_id": "x" * 10_000}).encode()),
    ("version_2_63", json.dumps({**GOOD, "bundle": {**GOOD["bundle"], "version": 2**63}}).encode()),
]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def command(n: int) -> bytes:
    ref = BundleRef(name="triage", version=2, url="http://127.0.0.1:1/b", sha256="a" * 64, size=10)
    return encode(DeployCommand(deployment_id=f"dep-{n}", device_id=DEVICE, bundle=ref, seq=n,
                                sent_at=datetime.now(timezone.utc)))


class Rig:
    """A real broker, a publisher playing the fleet, and a Link whose on_deploy appends to `got`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = embedded_broker().start()
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="slmops-fleet-test")
        self.pub.username_pw_set("fleet", FLEET_PASSWORD)
        self.pub.connect("127.0.0.1", self.broker.port)
        self.pub.loop_start()
        self.got: list[DeployCommand] = []
        self.fail_next = threading.Event()
        self.link: Link | None = None

    def on_deploy(self, cmd: DeployCommand) -> None:
        if self.fail_next.is_set():
            self.fail_next.clear()
            raise RuntimeError("a bug in the deploy handler " + "x" * 5000)
        self.got.append(cmd)

    def start_link(self) -> Link:
        self.link = Link(DEVICE, self.broker.url, seq=SeqCounter(self.tmp / "seq.json"), on_deploy=self.on_deploy,
                         active=lambda: None, agent_version="test", username=DEVICE, password=device_password(DEVICE))
        self.link.start()
        assert self.link.wait_connected(10), "the link did not subscribe to its command topic"
        return self.link

    def publish(self, payload: bytes, *, retain: bool = False) -> None:
        self.pub.publish(CMD, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        if self.link:
            self.link.stop()
        self.pub.loop_stop()
        self.pub.disconnect()
        self.broker.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def dropped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "slmops.agent.link" and "dropped" in r.getMessage()]


@pytest.mark.parametrize("payload", [p for _, p in POISON], ids=[n for n, _ in POISON])
def test_poison_is_dropped_and_the_next_command_is_delivered(rig: Rig, caplog, payload: bytes) -> None:
    caplog.set_level(logging.WARNING, logger="slmops.agent.link")
    rig.start_link()
    rig.publish(payload)
    rig.publish(command(1))
    wait_until(lambda: len(rig.got) == 1, what="the valid command after the poison")
    assert [c.deployment_id for c in rig.got] == ["dep-1"]
    [line] = dropped(caplog)
    assert CMD in line and "\n" not in line and len(line) < 700, line[:200]


def test_every_poison_in_a_row_then_commands_still_arrive(rig: Rig, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="slmops.agent.link")
    rig.start_link()
    for _, payload in POISON:
        rig.publish(payload)
    rig.publish(command(1))
    wait_until(lambda: len(rig.got) == 1, what="the valid command after every poison")
    assert len(dropped(caplog)) == len(POISON)


def test_a_bug_in_on_deploy_drops_that_command_only(rig: Rig, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="slmops.agent.link")
    rig.start_link()
    rig.fail_next.set()
    rig.publish(command(1))
    rig.publish(command(2))
    wait_until(lambda: len(rig.got) == 1, what="the command after the failing one")
    assert [c.deployment_id for c in rig.got] == ["dep-2"]
    [line] = dropped(caplog)
    assert "RuntimeError" in line and len(line) < 700


@pytest.mark.parametrize("name", ["digits_60k_in_json", "nested_30k", "invalid_utf8", "deployment_dotdot"])
def test_retained_poison_waiting_at_start_does_not_stop_the_link(rig: Rig, caplog, name: str) -> None:
    caplog.set_level(logging.WARNING, logger="slmops.agent.link")
    rig.publish(dict(POISON)[name], retain=True)  # sits on the command topic before the agent connects
    rig.start_link()
    wait_until(lambda: len(dropped(caplog)) == 1, what="the retained poison to reach the link and be dropped")
    rig.publish(command(1))
    wait_until(lambda: len(rig.got) == 1, what="the valid command after the retained poison")
    assert rig.got[0].deployment_id == "dep-1"


def test_a_cancel_command_reaches_the_agent_and_one_for_another_device_does_not(rig: Rig) -> None:
    from protocol.messages import CancelCommand

    rig.start_link()
    now = datetime.now(timezone.utc)
    rig.publish(encode(CancelCommand(deployment_id="dep-9", device_id="dev-2", sent_at=now)))
    rig.publish(encode(CancelCommand(deployment_id="dep-9", device_id=DEVICE, sent_at=now)))
    wait_until(lambda: rig.got, what="the cancel command")
    assert [(type(m).__name__, m.deployment_id, m.device_id) for m in rig.got] == [("CancelCommand", "dep-9", DEVICE)]
