"""The embedded amqtt broker: retained messages, persistent sessions, start-up failures; and the fleet on it and on
mosquitto with MQTT 5."""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fleet.api.app import create_app
from fleet.broker import EmbeddedBroker
from protocol import topics
from protocol.errors import ConfigError
from protocol.messages import Presence, encode
from tests.net import MOSQUITTO, embedded_broker, free_port, mosquitto

from .conftest import ADMIN, Device, secure_settings, wait_until


def test_retained_message_reaches_later_subscribers_only(broker: EmbeddedBroker, devices) -> None:
    devices("slmops-agent-dev").publish("slmops/v1/devices/dev/presence", b"online", retain=True)
    fleet = devices("slmops-fleet-1")
    fleet.subscribe("slmops/v1/devices/+/presence")
    wait_until(lambda: len(fleet.received()) == 1, what="the retained presence")
    assert fleet.received()[0].payload == b"online" and fleet.received()[0].retain

    bystander = devices("slmops-agent-bystander")  # connects while someone holds the presence wildcard
    bystander.subscribe("slmops/v1/devices/bystander/cmd")
    other = devices("slmops-fleet-2")
    other.subscribe("slmops/v1/devices/+/presence")
    wait_until(lambda: len(other.received()) == 1, what="the retained presence for a second subscriber")
    assert bystander.received() == []


def test_persistent_session_gets_commands_sent_while_away(broker: EmbeddedBroker, devices) -> None:
    away = Device(broker.port, "slmops-agent-p", clean_session=False)
    away.subscribe("slmops/v1/devices/p/cmd")
    away.close()

    devices("slmops-fleet").publish("slmops/v1/devices/p/cmd", b"deploy-while-away")
    back = Device(broker.port, "slmops-agent-p", clean_session=False)
    try:
        wait_until(lambda: len(back.received()) == 1, what="the queued command")
        assert back.received()[0].payload == b"deploy-while-away"
    finally:
        back.close()


def test_busy_port_is_a_config_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="could not listen"):
            embedded_broker(s.getsockname()[1]).start()


def test_fleet_starts_its_own_broker_when_none_is_given(tmp_path: Path) -> None:
    port = free_port()
    settings = secure_settings(tmp_path / "fleet", embedded_broker_port=port)
    with TestClient(create_app(settings), headers=ADMIN) as c:
        health = c.get("/healthz").json()
        assert health == {"status": "ok", "database": "ok", "broker": "connected", "broker_url": f"mqtt://127.0.0.1:{port}"}
        Device(port, "probe").close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_fleet_speaks_mqtt5_to_mosquitto(tmp_path: Path) -> None:
    with mosquitto(tmp_path) as port:
        settings = secure_settings(tmp_path / "fleet", broker_url=f"mqtt5://127.0.0.1:{port}", client_id="slmops-fleet-v5")
        with TestClient(create_app(settings), headers=ADMIN) as c:
            assert c.app.state.fleet.messaging.wait_connected(5)
            dev = Device(port, "slmops-agent-dev-5")
            try:
                msg = Presence(device_id="dev-5", online=True, sent_at=datetime.now(timezone.utc))
                dev.publish(str(topics.presence("dev-5")), encode(msg))
                wait_until(lambda: c.get("/api/v1/devices/dev-5").status_code == 200, what="presence over mosquitto")
            finally:
                dev.close()
            assert c.get("/api/v1/devices/dev-5").json()["online"] is True
