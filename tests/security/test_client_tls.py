"""The fleet's HTTP clients over TLS: `slmops fleet ...` (--ca/--cert/--key), the agent's HTTP client (bundle and
root downloads, built in agent/service.py from --fleet-ca/--fleet-cert/--fleet-key) and `slmops agent enrol`.

One fleet serves HTTPS with mutual TLS (certificates from a project CA made by fleet.pki) for the module. Each row
presents one set of TLS options: the full set works; no client certificate, the system store instead of the
project CA, a key without its certificate and TLS files for an http:// URL are refused, with the reason, and the
fleet's state afterwards shows that the refused call stored nothing (no enrolment token made, none used).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.commands import RootFetcher
from agent.config import AgentConfig, fleet_tls
from agent.enrol import enrol
from agent.service import Agent
from fleet import pki
from fleet.cli import app as fleet_app
from fleet.tls import client_context
from fleet.trust import init_trust
from protocol.errors import ConfigError, DownloadError, TransportError
from slmops.story import FleetClient, FleetServer

runner = CliRunner()
ADMIN_TOKEN = "slm_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Rig:
    fleet: FleetServer
    admin: FleetClient
    ca: Path
    operator: pki.IssuedFiles
    device: pki.IssuedFiles
    trust: Path

    def tokens(self) -> list[dict]:
        return self.admin._ok(self.admin.http.get("/api/v1/enrolment-tokens"))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("client-tls")
    now = datetime.now(timezone.utc)
    ca = pki.init_ca(tmp / "ca", "client tls test CA", now, days=30)
    server = pki.issue_server(tmp / "ca", ["127.0.0.1", "localhost"], now, 30)
    operator = pki.issue_fleet(tmp / "ca", now, 30, name="slmops-fleet-operator")
    device = pki.issue_device(tmp / "ca", "tls-agent-1", now, 30)
    init_trust(tmp / "trust", now=now)
    fleet = FleetServer(tmp / "fleet", trust_dir=tmp / "trust", admin_token=ADMIN_TOKEN,
                        broker_password=secrets.token_urlsafe(32), tls_cert_file=server.cert_file,
                        tls_key_file=server.key_file, tls_client_ca_file=ca).start()
    admin = FleetClient(fleet.url, ADMIN_TOKEN, verify=client_context(ca, cert_file=operator.cert_file,
                                                                      key_file=operator.key_file))
    try:
        yield Rig(fleet, admin, ca, operator, device, tmp / "trust")
    finally:
        admin.close()
        fleet.stop()


# ---- slmops fleet ... --ca --cert --key ----------------------------------------------------------------------------

CLI_ROWS = [
    pytest.param("ca cert key", "https", 0, "", id="project-ca-and-client-cert"),
    pytest.param("env", "https", 0, "", id="the-same-from-the-environment"),
    pytest.param("ca", "https", 2, "cannot reach the fleet", id="no-client-certificate"),
    pytest.param("cert key", "https", 2, "--ca", id="system-store-does-not-know-the-project-ca"),
    pytest.param("ca key", "https", 2, "--key was given without --cert", id="key-without-cert"),
    pytest.param("ca cert key", "http", 2, "for an https:// fleet", id="tls-files-for-http"),
]


@pytest.mark.parametrize(("given", "scheme", "code", "says"), CLI_ROWS)
def test_fleet_cli_tls_table(rig: Rig, monkeypatch: pytest.MonkeyPatch, given: str, scheme: str, code: int, says: str) -> None:
    files = {"ca": rig.ca, "cert": rig.operator.cert_file, "key": rig.operator.key_file}
    args: list[str] = []
    if given == "env":
        for name, path in files.items():
            monkeypatch.setenv(f"SLMOPS_FLEET_{name.upper()}_FILE", str(path))
    else:
        for name in given.split():
            args += [f"--{name}", str(files[name])]
    url = rig.fleet.url if scheme == "https" else rig.fleet.url.replace("https://", "http://")
    before = len(rig.tokens())
    r = runner.invoke(fleet_app, ["enrol-token", "create", "--device", "cli-dev", "--url", url, "--token", ADMIN_TOKEN, *args])
    assert r.exit_code == code, r.output
    assert says in " ".join(r.output.split())
    assert len(rig.tokens()) == before + (1 if code == 0 else 0)  # a refused call made no token


# ---- the agent: enrolment and its HTTP client ------------------------------------------------------------------


def test_fleet_tls_refuses_half_a_setup(rig: Rig, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--fleet-key was given without --fleet-cert"):
        fleet_tls(rig.ca, None, rig.device.key_file)
    with pytest.raises(ConfigError, match="--fleet-ca .* does not exist"):
        fleet_tls(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("junk\n")
    with pytest.raises(ConfigError, match="cannot use --fleet-ca"):
        fleet_tls(tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="--fleet-key was given without --fleet-cert"):
        AgentConfig("tls-agent-1", tmp_path / "a", trust_root=rig.trust / "root.json", bundle_origins=(rig.fleet.url,),
                    fleet_key_file=rig.device.key_file)
    assert fleet_tls() is True  # nothing given: the system store


ENROL_ROWS = [
    pytest.param("ca", TransportError, "cannot reach the fleet", id="no-client-certificate"),
    pytest.param("cert key", TransportError, "--fleet-ca", id="system-store-does-not-know-the-project-ca"),
]


@pytest.mark.parametrize(("given", "error", "says"), ENROL_ROWS)
def test_agent_enrol_over_mutual_tls(rig: Rig, given: str, error: type[Exception], says: str) -> None:
    device_id = f"tls-enrol-{secrets.token_hex(3)}"
    made = rig.admin._ok(rig.admin.http.post("/api/v1/enrolment-tokens", json={"groups": [], "device_id": device_id}))
    files = {"ca": rig.ca, "cert": rig.device.cert_file, "key": rig.device.key_file}
    partial = {f"{n}_file": files[n] for n in given.split()}
    with pytest.raises(error, match=says):
        enrol(rig.fleet.url, made["token"], device_id, verify=fleet_tls(**partial))
    row = next(t for t in rig.tokens() if t["id"] == made["id"])
    assert row["used_at"] is None  # the token was never spent
    identity = enrol(rig.fleet.url, made["token"], device_id, verify=fleet_tls(rig.ca, rig.device.cert_file, rig.device.key_file))
    assert identity.device_id == device_id and identity.fleet_url == rig.fleet.url


AGENT_ROWS = [
    pytest.param("ca cert key", None, id="project-ca-and-client-cert"),
    pytest.param("ca", DownloadError, id="no-client-certificate"),
    pytest.param("cert key", DownloadError, id="system-store-does-not-know-the-project-ca"),
]


@pytest.mark.parametrize(("given", "error"), AGENT_ROWS)
def test_agent_http_client_fetches_roots_over_mutual_tls(rig: Rig, tmp_path: Path, given: str, error: type[Exception] | None) -> None:
    files = {"ca": rig.ca, "cert": rig.device.cert_file, "key": rig.device.key_file}
    config = AgentConfig("tls-agent-1", tmp_path / "agent", trust_root=rig.trust / "root.json",
                         bundle_origins=(rig.fleet.url,), api_port=0,
                         **{f"fleet_{n}_file": files[n] for n in given.split()})
    agent = Agent(config)  # built, not started: its HTTP client is the one bundle downloads and root fetches use
    try:
        fetch = RootFetcher(agent.http, rig.fleet.url)
        if error is None:
            assert fetch(1) == (rig.trust / "root.json").read_bytes()  # the fleet's only root, v1
            assert fetch(2) is None  # and a 404 for the next, as a device walking the chain sees it
        else:
            with pytest.raises(error):
                fetch(1)
    finally:
        agent.http.close()
