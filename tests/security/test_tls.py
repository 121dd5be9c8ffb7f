"""TLS and mutual TLS on loopback, one table per server: a real mosquitto run with deploy/mosquitto/tls.conf, the
fleet's HTTP under uvicorn (slmops.story.FleetServer), and fleet/tls.py's server context on its own.

Every row presents one client credential from a project CA made by fleet/pki.py: a valid device certificate, none,
one from another CA, an expired one (issued with the clock in the past), a revoked one (in the CRL). A valid one is
let in; every other is refused during the TLS handshake, and the server afterwards holds nothing of that client
(mosquitto never admitted its identity, the fleet stored nothing). Each refusal is tried over TLS 1.2, where the
server's alert names the reason, and over TLS 1.3, where the client cert is checked after the client finished.
Server-side rows: the client refuses a server certificate for another host name or from an untrusted CA.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from fleet import pki
from fleet.tls import build_server_context, client_context
from protocol.errors import ConfigError
from slmops.story import FleetServer
from tests.net import MOSQUITTO, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
TLS_CONF = ROOT / "deploy" / "mosquitto" / "tls.conf"
T12, T13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
CREDS = ("valid", "none", "other-ca", "expired", "revoked")
# what the server's alert says to a TLS 1.2 client, per refused credential
ALERT = {"none": "alert handshake failure", "other-ca": "alert unknown ca", "expired": "alert certificate expired", "revoked": "alert certificate revoked"}


@dataclass(frozen=True)
class Cred:
    cn: str
    cert: Path | None
    key: Path | None


@dataclass(frozen=True)
class Pki:
    ca: Path  # ca.pem of the project CA
    other_ca: Path  # ca.pem of a CA nobody trusts
    crl: Path
    stale_crl: Path  # a CRL of the project CA past its next-update time
    other_crl: Path  # a CRL of the other CA
    server: pki.IssuedFiles  # localhost, 127.0.0.1
    elsewhere: pki.IssuedFiles  # elsewhere.example only
    creds: dict[str, Cred]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    now = datetime.now(timezone.utc)
    ca, other = tmp / "ca", tmp / "other"
    pki.init_ca(ca, "test CA", now - timedelta(days=400), days=3650)
    pki.init_ca(other, "other CA", now, days=365)
    server = pki.issue_server(ca, ["localhost", "127.0.0.1"], now, 30)
    elsewhere = pki.issue_server(ca, ["elsewhere.example"], now, 30, stem="elsewhere")
    valid = pki.issue_device(ca, "dev-valid", now, 30)
    expired = pki.issue_device(ca, "dev-expired", now - timedelta(days=100), 30)  # the clock 100 days back
    revoked = pki.issue_device(ca, "dev-revoked", now, 30)
    stranger = pki.issue_device(other, "dev-stranger", now, 30)
    pki.revoke(ca, revoked.issued.serial, now)
    stale = tmp / "stale-crl.pem"
    shutil.copy(pki.write_crl(ca, now - timedelta(days=30), 7), stale)
    other_crl = tmp / "other-crl.pem"
    shutil.copy(pki.write_crl(other, now, 7), other_crl)
    crl = pki.write_crl(ca, now, 7)
    creds = {
        "valid": Cred("dev-valid", valid.cert_file, valid.key_file),
        "none": Cred("dev-none", None, None),
        "other-ca": Cred("dev-stranger", stranger.cert_file, stranger.key_file),
        "expired": Cred("dev-expired", expired.cert_file, expired.key_file),
        "revoked": Cred("dev-revoked", revoked.cert_file, revoked.key_file),
    }
    return Pki(ca / "ca.pem", other / "ca.pem", crl, stale, other_crl, server, elsewhere, creds)


def _client_ctx(trust: Path, cred: Cred, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = client_context(trust, cert_file=cred.cert, key_file=cred.key)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


# ---- fleet/tls.py's server context, handshake in memory: the server's own reason for each refusal ---------------


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> BaseException | None:
    """Run a TLS handshake between two contexts through memory buffers; the server's error, or None if it let in."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server_done = client_done = False
    for _ in range(20):
        if not client_done:
            with contextlib.suppress(ssl.SSLWantReadError):
                client.do_handshake()
                client_done = True
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return exc
        if server_done and client_done:
            return None
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    raise AssertionError("the handshake neither finished nor failed")


@pytest.mark.parametrize("version", [T12, T13], ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize(
    "cred, crl, client_ca, refused",
    [
        pytest.param("valid", "crl", True, None, id="valid"),
        pytest.param("none", "crl", True, "PEER_DID_NOT_RETURN_A_CERTIFICATE", id="no-cert"),
        pytest.param("other-ca", "crl", True, "unable to get local issuer certificate", id="other-ca"),
        pytest.param("expired", "crl", True, "certificate has expired", id="expired"),
        pytest.param("revoked", "crl", True, "certificate revoked", id="revoked"),
        pytest.param("valid", "stale_crl", True, "CRL has expired", id="stale-crl-refuses-everyone"),
        pytest.param("valid", "other_crl", True, "unable to get certificate CRL", id="crl-of-another-ca-refuses-everyone"),
        pytest.param("revoked", None, True, None, id="no-crl-no-revocation"),
        pytest.param("none", None, False, None, id="plain-tls-no-client-cert"),
    ],
)
def test_server_context_table(certs: Pki, cred: str, crl: str | None, client_ca: bool, refused: str | None, version) -> None:
    ctx = build_server_context(
        certs.server.cert_file, certs.server.key_file,
        client_ca_file=certs.ca if client_ca else None, crl_file=getattr(certs, crl) if crl else None,
    )
    assert ctx.minimum_version == T12
    error = _handshake(ctx, _client_ctx(certs.ca, certs.creds[cred], version))
    if refused is None:
        assert error is None
    else:
        assert error is not None and refused in f"{error.reason} {getattr(error, 'verify_message', '')}", repr(error)


@pytest.mark.parametrize(
    "which, match",
    [
        pytest.param({"cert": "missing.pem"}, "does not exist", id="missing-cert"),
        pytest.param({"key": "elsewhere_key"}, "cannot use server certificate", id="key-of-another-cert"),
        pytest.param({"crl_without_ca": True}, "only applies with a client CA", id="crl-without-client-ca"),
        pytest.param({"crl": "garbage.pem"}, "cannot use CRL file", id="garbage-crl"),
        pytest.param({"ca": "garbage.pem"}, "cannot use client CA file", id="garbage-client-ca"),
    ],
)
def test_server_context_refuses_unusable_files(certs: Pki, tmp_path: Path, which: dict, match: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
    cert = tmp_path / which["cert"] if "cert" in which else certs.server.cert_file
    key = certs.elsewhere.key_file if "key" in which else certs.server.key_file
    ca = garbage if "ca" in which else (None if "crl_without_ca" in which else certs.ca)
    crl = garbage if "crl" in which else (certs.crl if "crl_without_ca" in which else None)
    with pytest.raises(ConfigError, match=match):
        build_server_context(cert, key, client_ca_file=ca, crl_file=crl)


# ---- a real mosquitto with deploy/mosquitto/tls.conf ------------------------------------------------------------


def _derive(template: str, set_: dict[str, str | None], extra: str = "") -> str:
    """tls.conf with the named options replaced (None: removed); each named option must be in the template, so the
    test fails if the shipped file loses one."""
    lines, seen = [], set()
    for line in template.splitlines():
        key = line.split(" ", 1)[0] if line and not line.startswith("#") else None
        if key in set_:
            seen.add(key)
            if set_[key] is not None:
                lines.append(f"{key} {set_[key]}")
        else:
            lines.append(line)
    missing = set(set_) - seen
    assert not missing, f"{TLS_CONF} lacks {sorted(missing)}"
    head = "user root\n" if os.geteuid() == 0 else ""  # as root, mosquitto drops to a 'mosquitto' user otherwise
    return head + "\n".join(lines) + "\n" + extra


@dataclass
class Broker:
    port: int
    mismatch_port: int  # a listener whose certificate names only elsewhere.example
    log: Path

    def admitted(self, cn: str) -> bool:
        """Did mosquitto let a client in under this certificate identity (use_identity_as_username)?"""
        return re.search(rf"New client connected from .* u'{re.escape(cn)}'", self.log.read_text()) is not None


@contextlib.contextmanager
def _mosquitto(conf_text: str, conf: Path, ports: list[int]) -> Iterator[None]:
    conf.write_text(conf_text)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for p in ports:
            wait_port(p)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def brokers(certs: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, int]]:
    """(the mutual-TLS broker of tls.conf, the port of a plain-TLS broker made from it)."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    tmp = tmp_path_factory.mktemp("mosquitto")
    template = TLS_CONF.read_text()
    port, mismatch, plain = free_port(), free_port(), free_port()
    files = {"cafile": str(certs.ca), "certfile": str(certs.server.cert_file), "keyfile": str(certs.server.key_file)}
    log = tmp / "mtls.log"
    mismatch_listener = (
        f"listener {mismatch} 127.0.0.1\ncafile {certs.ca}\ncertfile {certs.elsewhere.cert_file}\n"
        f"keyfile {certs.elsewhere.key_file}\nrequire_certificate true\nuse_identity_as_username true\n"
    )
    mtls = _derive(
        template,
        {"listener": f"{port} 127.0.0.1", **files, "crlfile": str(certs.crl), "persistence": "false"},
        f"log_dest file {log}\nlog_type all\n" + mismatch_listener,
    )
    plain_tls = _derive(
        template,
        {"listener": f"{plain} 127.0.0.1", **files, "crlfile": None, "persistence": "false", "allow_anonymous": "true",
         "require_certificate": "false", "use_identity_as_username": "false"},
    )
    with _mosquitto(mtls, tmp / "mtls.conf", [port, mismatch]), _mosquitto(plain_tls, tmp / "plain.conf", [plain]):
        yield Broker(port, mismatch, log), plain


def _mqtt(port: int, trust: Path, cred: Cred, version: ssl.TLSVersion | None) -> str:
    """Connect with paho and wait for the CONNACK: 'accepted', or 'refused: <why>'."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"slmops-agent-{cred.cn}")
    if version is None:  # paho's own TLS set-up, as a device would call it
        c.tls_set(ca_certs=str(trust), certfile=str(cred.cert) if cred.cert else None, keyfile=str(cred.key) if cred.key else None)
    else:
        c.tls_set_context(_client_ctx(trust, cred, version))
    result: dict[str, str] = {}
    c.on_connect = lambda _c, _u, _f, rc, _p: result.setdefault("out", "accepted" if not rc.is_failure else f"refused: {rc}")
    c.on_disconnect = lambda _c, _u, _f, rc, _p: result.setdefault("out", f"refused: disconnected ({rc})")
    try:
        c.connect("127.0.0.1", port, keepalive=10)
        deadline = time.monotonic() + 5
        while "out" not in result and time.monotonic() < deadline:
            c.loop(timeout=0.1)
    except (OSError, ssl.SSLError) as exc:
        result.setdefault("out", f"refused: {type(exc).__name__}: {exc}")
    finally:
        if result.get("out") == "accepted":
            c.disconnect()
        if c.socket() is not None:
            c.socket().close()
    return result.get("out", "refused: no CONNACK in 5 s")


@pytest.mark.parametrize("cred", CREDS)
def test_the_agents_link_presents_its_device_certificate(certs: Pki, brokers: tuple[Broker, int], cred: str,
                                                         tmp_path: Path) -> None:
    """The agent's own MQTT link (mqttlink's client factory with --broker-ca/--broker-cert/--broker-key) against
    mosquitto with mutual TLS: connected and subscribed with a valid certificate, never with a bad one."""
    from agent.link import Link
    from agent.store import SeqCounter

    broker, _ = brokers
    c = certs.creds[cred]
    link = Link(c.cn, f"mqtts://127.0.0.1:{broker.port}", seq=SeqCounter(tmp_path / "seq.json"), on_deploy=lambda m: None,
                active=lambda: None, ca_file=certs.ca, cert_file=c.cert, key_file=c.key, reconnect_max_s=1.0)
    link.start()
    try:
        assert link.wait_connected(5 if cred == "valid" else 2) is (cred == "valid")
    finally:
        link.stop()
    assert broker.admitted(c.cn) is (cred == "valid")


@pytest.mark.parametrize("version", [None, T12, T13], ids=["paho-tls_set", "tls1.2", "tls1.3"])
@pytest.mark.parametrize("cred", CREDS)
def test_mosquitto_mutual_tls_table(certs: Pki, brokers: tuple[Broker, int], cred: str, version) -> None:
    broker, _ = brokers
    c = certs.creds[cred]
    out = _mqtt(broker.port, certs.ca, c, version)
    if cred == "valid":
        assert out == "accepted"
        assert broker.admitted(c.cn)  # the certificate's CN became the MQTT username
        return
    assert out.startswith("refused"), out
    if version == T12:
        assert ALERT[cred] in out, out
    assert not broker.admitted(c.cn)  # the broker never let this identity in
    assert _mqtt(broker.port, certs.ca, certs.creds["valid"], None) == "accepted"  # and still serves the valid one


@pytest.mark.parametrize(
    "where, trust, cred, expect",
    [
        pytest.param("mismatch", "ca", "valid", "IP address mismatch", id="server-cert-for-another-host"),
        # mosquitto sends the CA certificate with its own, which the client finds self-signed and not trusted
        pytest.param("mtls", "other_ca", "valid", "self-signed certificate in certificate chain", id="server-from-untrusted-ca"),
        pytest.param("plain", "ca", "none", "accepted", id="plain-tls-no-client-cert"),
        pytest.param("plain", "other_ca", "none", "self-signed certificate in certificate chain", id="plain-tls-untrusted-server"),
    ],
)
def test_mosquitto_server_identity_table(certs: Pki, brokers: tuple[Broker, int], where: str, trust: str, cred: str, expect: str) -> None:
    broker, plain = brokers
    port = {"mismatch": broker.mismatch_port, "mtls": broker.port, "plain": plain}[where]
    out = _mqtt(port, getattr(certs, trust), certs.creds[cred], None)
    if expect == "accepted":
        assert out == "accepted"
    else:
        assert out.startswith("refused: SSLCertVerificationError") and expect in out, out


# ---- the fleet's HTTP under uvicorn --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleets(certs: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetServer, FleetServer]]:
    """(a fleet with mutual TLS and the CRL, a fleet with plain TLS)."""
    tmp = tmp_path_factory.mktemp("fleets")
    tls = {"tls_cert_file": certs.server.cert_file, "tls_key_file": certs.server.key_file}
    mtls = FleetServer(tmp / "mtls", **tls, tls_client_ca_file=certs.ca, tls_crl_file=certs.crl)
    plain = FleetServer(tmp / "plain", **tls)
    try:
        mtls.start()
        plain.start()
        yield mtls, plain
    finally:
        mtls.stop()
        plain.stop()


def _http(url: str, trust: Path, cred: Cred, version: ssl.TLSVersion | None, **kwargs) -> httpx.Response | httpx.TransportError:
    try:
        with httpx.Client(verify=_client_ctx(trust, cred, version), timeout=5) as c:
            return c.request(url=url, **kwargs)
    except httpx.TransportError as exc:
        return exc


def _devices(fleet: FleetServer) -> list[str]:
    with contextlib.closing(sqlite3.connect(fleet.settings.data_dir / "fleet.db")) as db:
        return [row[0] for row in db.execute("SELECT id FROM devices")]


@pytest.mark.parametrize("version", [None, T12, T13], ids=["default", "tls1.2", "tls1.3"])
@pytest.mark.parametrize("cred", CREDS)
def test_fleet_http_mutual_tls_table(certs: Pki, fleets: tuple[FleetServer, FleetServer], cred: str, version) -> None:
    fleet, _ = fleets
    assert fleet.url.startswith("https://")
    c = certs.creds[cred]
    if cred == "valid":
        r = _http(f"{fleet.url}/healthz", certs.ca, c, version, method="GET")
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        return
    # a refused client tries to register itself: no response at all, and nothing stored
    r = _http(f"{fleet.url}/api/v1/devices", certs.ca, c, version, method="POST", json={"id": c.cn, "groups": ["x"]})
    assert isinstance(r, (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)), r
    assert c.cn not in _devices(fleet)
    ok = _http(f"{fleet.url}/healthz", certs.ca, certs.creds["valid"], None, method="GET")
    assert isinstance(ok, httpx.Response) and ok.status_code == 200  # the fleet still serves a valid client


@pytest.mark.parametrize(
    "which, trust, cred, sni, expect",
    [
        pytest.param("mtls", "ca", "valid", "elsewhere.example", "Hostname mismatch", id="server-cert-for-another-host"),
        # with a client CA loaded, OpenSSL sends the CA certificate along: self-signed and not trusted by this client
        pytest.param("mtls", "other_ca", "valid", None, "self-signed certificate in certificate chain", id="server-from-untrusted-ca"),
        pytest.param("plain", "ca", "none", None, 200, id="plain-tls-no-client-cert"),
        pytest.param("plain", "other_ca", "none", None, "unable to get local issuer certificate", id="plain-tls-untrusted-server"),
    ],
)
def test_fleet_http_server_identity_table(certs: Pki, fleets, which: str, trust: str, cred: str, sni: str | None, expect) -> None:
    fleet = fleets[0] if which == "mtls" else fleets[1]
    r = _http(f"{fleet.url}/healthz", getattr(certs, trust), certs.creds[cred], None, method="GET",
              extensions={"sni_hostname": sni} if sni else {})
    if expect == 200:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
    else:
        assert isinstance(r, httpx.ConnectError), repr(r)
        cause = r.__cause__
        while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):  # httpx > httpcore > ssl
            cause = cause.__cause__ or cause.__context__
        assert cause is not None and expect in str(cause), repr(r)


def test_plain_http_to_the_tls_port_gets_no_answer(fleets) -> None:
    fleet, _ = fleets
    with pytest.raises(httpx.TransportError):
        httpx.get(fleet.url.replace("https://", "http://") + "/healthz", timeout=5)


def test_fleet_server_without_tls_still_serves_plain_http(tmp_path: Path) -> None:
    fleet = FleetServer(tmp_path / "fleet").start()
    try:
        assert fleet.url.startswith("http://")
        assert httpx.get(f"{fleet.url}/healthz", timeout=5).status_code == 200
    finally:
        fleet.stop()


# ---- slmops fleet serve ---------------------------------------------------------------------------------------


def _secure(tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """What `fleet serve` needs to start outside demo mode: real secrets in the environment and a trusted key."""
    import secrets as _secrets

    from protocol.trust import generate_keypair

    pub = tmp_path / "trusted.pub"
    pub.write_bytes(generate_keypair().public.to_pem())
    env = {"SLMOPS_FLEET_ADMIN_TOKEN": "slm_" + _secrets.token_urlsafe(32),
           "SLMOPS_FLEET_BROKER_PASSWORD": _secrets.token_urlsafe(32)}
    return env, ["--trusted-key", str(pub)]



@pytest.mark.parametrize(
    "args, match",
    [
        pytest.param(["--tls-cert", "{cert}"], "tls_key_file", id="cert-without-key"),
        pytest.param(["--tls-cert", "{tmp}/none.pem", "--tls-key", "{key}"], "does not exist", id="missing-cert"),
        pytest.param(["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-crl", "{crl}"], "tls_client_ca_file", id="crl-without-ca"),
    ],
)
def test_fleet_serve_refuses_a_bad_tls_setup_before_listening(certs: Pki, tmp_path: Path, args: list[str], match: str) -> None:
    from typer.testing import CliRunner

    from fleet.cli import app

    values = {"cert": certs.server.cert_file, "key": certs.server.key_file, "crl": certs.crl, "tmp": tmp_path}
    port = free_port()
    env, trusted = _secure(tmp_path)
    r = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path / "d"), "--port", str(port), *trusted,
                                 *[a.format(**values) for a in args]], env=env)
    assert r.exit_code == 2 and match in r.output, r.output
    assert not (tmp_path / "d" / "fleet.db").exists()  # nothing started


@dataclass(frozen=True)
class Fresh:
    """A CA of its own with one device certificate, for rows that revoke while a server runs."""

    ca_dir: Path
    server: pki.IssuedFiles
    device: pki.IssuedFiles
    cred: Cred

    def revoke_and_publish(self) -> None:
        pki.revoke(self.ca_dir, self.device.issued.serial, datetime.now(timezone.utc))
        time.sleep(1.1)  # the new CRL's last-update time must be later than the one the server holds (whole seconds)
        pki.write_crl(self.ca_dir, datetime.now(timezone.utc), 7)


@pytest.fixture
def fresh(tmp_path: Path) -> Fresh:
    now = datetime.now(timezone.utc)
    d = tmp_path / "ca"
    pki.init_ca(d, "fresh CA", now, 30)
    server = pki.issue_server(d, ["localhost", "127.0.0.1"], now, 7)
    device = pki.issue_device(d, "dev-fresh", now, 7)
    pki.write_crl(d, now, 7)
    return Fresh(d, server, device, Cred("dev-fresh", device.cert_file, device.key_file))


def test_mosquitto_takes_a_new_crl_on_sighup(fresh: Fresh, tmp_path: Path) -> None:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    d = fresh.ca_dir
    conf = _derive(TLS_CONF.read_text(), {
        "listener": f"{port} 127.0.0.1", "cafile": str(d / "ca.pem"), "certfile": str(fresh.server.cert_file),
        "keyfile": str(fresh.server.key_file), "crlfile": str(d / "crl.pem"), "persistence": "false",
    })
    conf_file = tmp_path / "m.conf"
    conf_file.write_text(conf)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        assert _mqtt(port, d / "ca.pem", fresh.cred, T12) == "accepted"
        fresh.revoke_and_publish()
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while (out := _mqtt(port, d / "ca.pem", fresh.cred, T12)) == "accepted" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ALERT["revoked"] in out, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_fleet_serve_with_mutual_tls_takes_a_new_crl_on_sighup(fresh: Fresh, tmp_path: Path) -> None:
    import sys

    port, broker_port = free_port(), free_port()
    d = fresh.ca_dir
    cmd = [sys.executable, "-m", "slmops.cli", "fleet", "serve", "--data-dir", str(tmp_path / "d"), "--port", str(port),
           "--broker-port", str(broker_port), "--tls-cert", str(fresh.server.cert_file), "--tls-key", str(fresh.server.key_file),
           "--tls-client-ca", str(d / "ca.pem"), "--tls-crl", str(d / "crl.pem")]
    env, trusted = _secure(tmp_path)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd + trusted, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env})
    url = f"https://127.0.0.1:{port}/healthz"
    try:
        wait_port(port, timeout=20)
        ok = _http(url, d / "ca.pem", fresh.cred, None, method="GET")
        assert isinstance(ok, httpx.Response) and ok.status_code == 200, ok
        assert isinstance(_http(url, d / "ca.pem", Cred("x", None, None), T12, method="GET"), httpx.TransportError)
        fresh.revoke_and_publish()
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while isinstance(r := _http(url, d / "ca.pem", fresh.cred, T12, method="GET"), httpx.Response) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert isinstance(r, httpx.TransportError), r
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    text = log.read_text()
    assert f"fleet listening on https://127.0.0.1:{port} with client certificates" in text
    assert "reloaded the CRL" in text
