"""The embedded amqtt broker on TLS, and the broker URL enrolment hands out.

Broker table (one row per client): a client that trusts the project CA and logs in is admitted; over the same TLS a
wrong password and no credentials are still refused by the fleet's authenticator; a client that trusts another CA,
or only the system store, refuses the broker's certificate during the handshake; a plain-TCP client sending a
CONNECT gets no CONNACK. Afterwards the broker admitted only the row's own client, if any.

Settings table: half a TLS setup, TLS for an external broker, TLS without a CA for the fleet's own client, a bad
public broker URL: each refused when the settings are read. Then a whole fleet (`create_app`) with a TLS embedded
broker: its own MQTT client connects over TLS, enrolment answers `public_broker_url` (or the effective mqtts:// URL),
and the enrolled device logs in to the TLS broker with the answer's credentials.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from fleet import pki
from fleet.api.app import create_app
from fleet.broker import EmbeddedBroker, ListenerTls, StaticAccounts
from fleet.settings import Settings
from mqttlink import ClientOptions, connect, make_client
from protocol.errors import ConfigError
from protocol.trust import generate_keypair
from tests.net import free_port

DEVICE = "tls-dev-1"
WAIT_S = 5.0


@dataclass(frozen=True)
class Certs:
    ca: Path
    other_ca: Path
    server: pki.IssuedFiles


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    tmp = tmp_path_factory.mktemp("pki")
    now = datetime.now(timezone.utc)
    ca = pki.init_ca(tmp / "ca", "embedded broker test CA", now, days=30)
    other = pki.init_ca(tmp / "other", "a CA nobody trusts", now, days=30)
    server = pki.issue_server(tmp / "ca", ["127.0.0.1", "localhost"], now, 30, stem="broker")
    return Certs(ca, other, server)


@dataclass
class Rig:
    broker: EmbeddedBroker
    fleet_password: str
    device_password: str
    ca: Path


@pytest.fixture(scope="module")
def rig(certs: Certs) -> Iterator[Rig]:
    fleet_pw, dev_pw = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    accounts = StaticAccounts(fleet_pw, {DEVICE: dev_pw})
    tls = ListenerTls(certs.server.cert_file, certs.server.key_file)
    with EmbeddedBroker("127.0.0.1", free_port(), authenticator=accounts, tls=tls) as broker:
        yield Rig(broker, fleet_pw, dev_pw, certs.ca)


def connack(opts: ClientOptions) -> str:
    """Connect as the agent does (mqttlink) and return the CONNACK's reason, or the TLS error's class name."""
    got: list[str] = []
    done = threading.Event()
    client = make_client(opts)
    client.on_connect = lambda _c, _u, _f, reason, _p=None: (got.append(str(reason)), done.set())
    try:
        client.connect(opts.address.host, opts.address.port, 30)  # the TLS handshake happens here
    except (ssl.SSLError, OSError) as exc:
        return exc.__class__.__name__
    client.loop_start()
    try:
        done.wait(WAIT_S)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else "no CONNACK"


def plain_connect_bytes(client_id: str, username: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with user name and password, as bytes on a plain socket."""

    def s(v: str) -> bytes:
        return struct.pack("!H", len(v.encode())) + v.encode()

    body = s("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30) + s(client_id) + s(username) + s(password)
    return bytes([0x10, len(body)]) + body


def plain_tcp(port: int, client_id: str, password: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(plain_connect_bytes(client_id, DEVICE, password))
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return "CONNACK" if answer[:1] == b"\x20" else "no CONNACK"


ROWS = [
    # id, CA the client trusts ("ca", "other", None: the system store), password ("right", "wrong", None), expected
    pytest.param("ca", "right", "Success", id="trusts-the-ca-right-password-admitted"),
    pytest.param("ca", "wrong", "Bad user name or password", id="trusts-the-ca-wrong-password-refused"),
    pytest.param("ca", None, "Bad user name or password", id="trusts-the-ca-no-credentials-refused"),
    pytest.param("other", "right", "SSLCertVerificationError", id="trusts-another-ca-refuses-the-broker"),
    pytest.param(None, "right", "SSLCertVerificationError", id="system-store-refuses-the-broker"),
]


@pytest.mark.parametrize(("trust", "password", "expected"), ROWS)
def test_embedded_broker_tls_table(rig: Rig, certs: Certs, trust: str | None, password: str | None, expected: str) -> None:
    cid = f"slmops-agent-{DEVICE}"
    pw = {"right": rig.device_password, "wrong": secrets.token_urlsafe(32), None: None}[password]
    ca = {"ca": certs.ca, "other": certs.other_ca, None: None}[trust]
    refused_before = rig.broker.gate.refused_connects
    rig.broker.gate.principals.pop(cid, None)
    opts = ClientOptions(rig.broker.url, cid, username=DEVICE if pw else None, password=pw, ca_file=ca)
    assert rig.broker.url.startswith("mqtts://")
    assert connack(opts) == expected
    if expected == "Success":
        assert rig.broker.gate.principals[cid].device_id == DEVICE
    else:
        assert cid not in rig.broker.gate.principals  # the broker never admitted this client
        # the authenticator refused it (counted), or the handshake failed before any CONNECT was read (not counted)
        assert rig.broker.gate.refused_connects == refused_before + (1 if expected.startswith("Bad") else 0)


def test_plain_tcp_gets_no_connack_from_the_tls_listener(rig: Rig) -> None:
    cid = f"slmops-agent-{DEVICE}"
    rig.broker.gate.principals.pop(cid, None)
    before = rig.broker.gate.refused_connects
    assert plain_tcp(rig.broker.port, cid, rig.device_password) == "no CONNACK"
    assert cid not in rig.broker.gate.principals and rig.broker.gate.refused_connects == before
    # and the listener still serves TLS clients afterwards
    opts = ClientOptions(rig.broker.url, cid, username=DEVICE, password=rig.device_password, ca_file=rig.ca)
    assert connack(opts) == "Success"


def test_a_bad_certificate_file_is_a_config_error_before_listening(certs: Certs, tmp_path: Path) -> None:
    bad = tmp_path / "broken.pem"
    bad.write_text("not a certificate\n")
    port = free_port()
    for cert, key, says in (
        (tmp_path / "missing.pem", certs.server.key_file, "does not exist"),
        (bad, certs.server.key_file, "cannot use"),
        (certs.server.cert_file, certs.server.cert_file, "cannot use"),  # the certificate as its own key
    ):
        broker = EmbeddedBroker("127.0.0.1", port, authenticator=StaticAccounts(secrets.token_urlsafe(32)),
                                tls=ListenerTls(cert, key))
        with pytest.raises(ConfigError, match=says):
            broker.start()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "nothing may listen after a refused start"


# ---- settings ---------------------------------------------------------------------------------------------------


def base(tmp: Path, **kw: object) -> dict[str, object]:
    return {"data_dir": tmp / "fleet", "embedded_broker_port": 18830, **kw}


SETTINGS_ROWS = [
    pytest.param({"embedded_broker_tls_cert_file": "c.pem"}, "set both embedded_broker_tls", id="cert-without-key"),
    pytest.param({"embedded_broker_tls_key_file": "k.pem"}, "set both embedded_broker_tls", id="key-without-cert"),
    pytest.param({"embedded_broker_tls_cert_file": "c.pem", "embedded_broker_tls_key_file": "k.pem",
                  "broker_ca_file": "ca.pem", "broker_url": "mqtts://broker.example:8883"},
                 "names an external", id="tls-for-an-external-broker"),
    pytest.param({"embedded_broker_tls_cert_file": "c.pem", "embedded_broker_tls_key_file": "k.pem"},
                 "needs broker_ca_file", id="tls-without-a-ca-for-the-fleet"),
    pytest.param({"public_broker_url": "http://broker.example"}, "public_broker_url", id="public-url-not-mqtt"),
    pytest.param({"public_broker_url": "mqtts://:8883"}, "public_broker_url", id="public-url-without-host"),
]


@pytest.mark.parametrize(("kw", "says"), SETTINGS_ROWS)
def test_settings_refuse(tmp_path: Path, kw: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(**base(tmp_path, **kw))


def test_settings_derive_the_broker_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = Settings(**base(tmp_path))
    assert plain.effective_broker_url == plain.public_broker_url == "mqtt://127.0.0.1:18830"
    tls = Settings(**base(tmp_path, embedded_broker_tls_cert_file="c.pem", embedded_broker_tls_key_file="k.pem",
                          broker_ca_file="ca.pem"))
    assert tls.effective_broker_url == tls.public_broker_url == "mqtts://127.0.0.1:18830"
    monkeypatch.setenv("SLMOPS_FLEET_PUBLIC_BROKER_URL", "mqtt5s://broker.example:8883")
    assert Settings(**base(tmp_path)).public_broker_url == "mqtt5s://broker.example:8883"
    assert Settings(**base(tmp_path)).effective_broker_url == "mqtt://127.0.0.1:18830"


# ---- a whole fleet with a TLS embedded broker ---------------------------------------------------------------------


ADMIN_TOKEN = "slm_" + secrets.token_urlsafe(32)


@pytest.mark.parametrize("public", [None, "mqtts://broker.example:8883"], ids=["default-effective-url", "public-broker-url"])
def test_fleet_with_a_tls_embedded_broker_enrols_devices_onto_it(tmp_path: Path, certs: Certs, public: str | None) -> None:
    pub = tmp_path / "release.pub"
    pub.write_bytes(generate_keypair().public.to_pem())
    settings = Settings(
        data_dir=tmp_path / "fleet", embedded_broker_port=free_port(), client_id="slmops-fleet-tls-test",
        embedded_broker_tls_cert_file=certs.server.cert_file, embedded_broker_tls_key_file=certs.server.key_file,
        broker_ca_file=certs.ca, admin_token=ADMIN_TOKEN, broker_password=secrets.token_urlsafe(32),
        trusted_keys=[pub], **({"public_broker_url": public} if public else {}),
    )
    assert settings.effective_broker_url.startswith("mqtts://127.0.0.1:")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(create_app(settings), headers=admin) as c:
        assert c.app.state.fleet.messaging.wait_connected(WAIT_S), "the fleet's own client did not connect over TLS"
        made = c.post("/api/v1/enrolment-tokens", json={"groups": ["lab"], "device_id": DEVICE})
        assert made.status_code == 201, made.text
        r = c.post("/api/v1/enrol", json={"token": made.json()["token"], "device_id": DEVICE}, headers={"Authorization": ""})
        assert r.status_code == 201, r.text
        ident = r.json()
        assert ident["broker_url"] == (public or settings.effective_broker_url)
        # the device logs in to the TLS broker (where the fleet listens) with what enrolment gave it
        opts = ClientOptions(settings.effective_broker_url, f"slmops-agent-{DEVICE}", username=ident["broker_username"],
                             password=ident["broker_password"], ca_file=certs.ca)
        assert connack(opts) == "Success"
        plain = ClientOptions(settings.effective_broker_url.replace("mqtts://", "mqtt://"), f"slmops-agent-{DEVICE}",
                              username=ident["broker_username"], password=ident["broker_password"])
        assert connack_plain(plain) == "no CONNACK"


def connack_plain(opts: ClientOptions) -> str:
    """A plain-TCP paho client against a TLS port: it never hears a CONNACK."""
    got: list[str] = []
    done = threading.Event()
    client = make_client(opts)
    client.on_connect = lambda _c, _u, _f, reason, _p=None: (got.append(str(reason)), done.set())
    connect(client, opts)
    try:
        done.wait(2.0)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else "no CONNACK"
