"""mqttlink: options refused with a reason, and a broker's refusals logged once, against the real embedded broker."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from agent.link import Link
from agent.store import SeqCounter
from mqttlink import ClientOptions, Watch, connect, make_client
from protocol import topics
from protocol.errors import ConfigError
from tests.net import device_password, embedded_broker


@pytest.mark.parametrize(("kwargs", "match"), [
    pytest.param({"broker_url": "http://x"}, "must start with", id="bad_scheme"),
    pytest.param({"password": "p"}, "without a user name", id="password_without_user"),
    pytest.param({"ca_file": Path("/nonexistent/ca.pem"), "broker_url": "mqtts://h"}, "does not exist", id="missing_ca"),
    pytest.param({"ca_file": Path(__file__)}, "does not use TLS", id="tls_file_without_tls"),
    pytest.param({"key_file": Path(__file__), "broker_url": "mqtts://h"}, "without its certificate", id="key_without_cert"),
    pytest.param({"reconnect_max_s": 0}, "reconnect_max_s", id="zero_backoff"),
    pytest.param({"client_id": ""}, "client id", id="no_client_id"),
    pytest.param({"receive_maximum": 65_536}, "receive_maximum", id="receive_maximum_too_large"),
    pytest.param({"receive_maximum": -1}, "receive_maximum", id="receive_maximum_negative"),
])
def test_bad_options_are_refused_with_the_reason(kwargs: dict, match: str) -> None:
    base = {"broker_url": "mqtt://127.0.0.1:1883", "client_id": "slmops-agent-x"}
    with pytest.raises(ConfigError, match=match):
        ClientOptions(**(base | kwargs))


def test_the_password_is_not_in_the_repr() -> None:
    opts = ClientOptions("mqtt://h:1", "c", username="u", password="s3cret-token")
    assert "s3cret-token" not in repr(opts)


def test_refused_credentials_are_logged_once_while_paho_keeps_retrying(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="slmops.agent.link")
    with embedded_broker() as broker:
        link = Link("dev-x", broker.url, seq=SeqCounter(tmp_path / "seq.json"), on_deploy=lambda c: None,
                    active=lambda: None, reconnect_max_s=0.5, username="dev-x", password="wrong")
        link.start()
        try:
            deadline = time.monotonic() + 10
            while broker.gate.refused_connects < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert broker.gate.refused_connects >= 3, "paho stopped retrying"
        finally:
            link.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "bad user name or password" in lines[0] and "dev-x" in lines[0] and "wrong" not in lines[0]
    assert not link.connected.is_set()


def test_a_refused_subscription_is_an_error_not_a_success(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="test.mqttlink")
    with embedded_broker() as broker:
        opts = ClientOptions(broker.url, "slmops-agent-dev-s", username="dev-s", password=device_password("dev-s"))
        client, watch, results = make_client(opts), Watch(logging.getLogger("test.mqttlink"), opts), []
        wanted = [str(topics.cmd("dev-s")), str(topics.cmd("dev-other"))]
        client.on_connect = lambda c, *_a: c.subscribe([(f, 1) for f in wanted])
        client.on_subscribe = lambda _c, _u, _m, rcs, _p: results.append(watch.suback_ok(wanted, rcs))
        connect(client, opts)
        try:
            deadline = time.monotonic() + 5
            while not results and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            client.disconnect()
            client.loop_stop()
    assert results == [False]
    [line] = [r.getMessage() for r in caplog.records]
    assert "dev-other/cmd" in line and line.count("/cmd") == 1, line  # only the refused filter is named
