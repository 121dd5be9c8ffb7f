"""The spine with every security part on, end to end, with real parts.

- mosquitto 2 started from deploy/mosquitto/dynsec.conf, its plain listener replaced by a TLS one (a server
  certificate from the project CA, `fleet.pki`), set up with deploy/mosquitto/dynsec-init.sh over that TLS listener;
- the fleet (`slmops.story.FleetServer`, not in demo mode) serving HTTPS with mutual TLS (every HTTP client shows a
  certificate from the project CA), signing commands with its trust folder (`fleet.trust.init_trust`), talking to
  mosquitto over mqtt5s:// as `fleet`, and enrolling and revoking devices live through `fleet.dynsec.DynsecAccounts`;
- two devices, each a real `slmops agent run` process with the tiny int4 model: one enrolled by the operator's
  script (`FleetClient.enrol`), one by `slmops agent enrol --fleet-ca --fleet-cert --fleet-key`. Each gets its own
  mosquitto account at enrolment, logs in with it over TLS, downloads the signed bundle over HTTPS with its device
  token and its client certificate, and installs it.
Then one device is revoked (`POST /api/v1/devices/{id}/revoke`): mosquitto no longer knows it and refuses its
credentials, its device token downloads nothing, the fleet hears nothing more from it (its `last_seen` stands still
while its agent keeps trying), and the next deployment reaches only the other device, while the revoked one keeps
its installed model. Every assertion reads the fleet's records or the broker's own answers, never a log.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from fleet import pki
from fleet.bundles import build_bundle
from fleet.tls import client_context
from fleet.trust import init_trust
from protocol.trust import PrivateKey
from slmops.story import AgentProcess, FleetClient, FleetServer, ask
from tests.integration.dynsec import DynsecMosquitto, missing

pytestmark = pytest.mark.integration
KEPT, REVOKED = "secure-1", "secure-2"
GROUP = "secure"


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def enrol_with_the_cli(fleet: FleetServer, client: FleetClient, ca: Path, cert: pki.IssuedFiles, data_dir: Path,
                       device_id: str) -> dict:
    """`slmops agent enrol` over mutual TLS with a one-time token the operator made; the identity file it wrote."""
    made = client._ok(client.http.post("/api/v1/enrolment-tokens", json={"groups": [GROUP], "device_id": device_id}))
    env = {**os.environ, "SLMOPS_AGENT_ENROL_TOKEN": made["token"]}  # not on the command line
    r = subprocess.run(
        [sys.executable, "-m", "slmops.cli", "agent", "enrol", "--fleet", fleet.url, "--device-id", device_id,
         "--data-dir", str(data_dir), "--fleet-ca", str(ca), "--fleet-cert", str(cert.cert_file),
         "--fleet-key", str(cert.key_file)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    from agent.enrol import load_identity

    identity = load_identity(data_dir)
    assert identity is not None
    return {k: getattr(identity, k) for k in identity.__dataclass_fields__}


@pytest.mark.skipif(missing() is not None, reason=missing() or "")
def test_secure_spine_enrol_deploy_revoke(tmp_path: Path, tiny_int4) -> None:  # noqa: ANN001
    now = datetime.now(timezone.utc)
    ca_dir = tmp_path / "ca"
    ca = pki.init_ca(ca_dir, "secure spine CA", now, days=30)
    server = pki.issue_server(ca_dir, ["127.0.0.1", "localhost"], now, 30, stem="server")
    operator = pki.issue_fleet(ca_dir, now, 30, name="slmops-fleet-operator")
    device_certs = {d: pki.issue_device(ca_dir, d, now, 30) for d in (KEPT, REVOKED)}

    trust = tmp_path / "trust"
    init_trust(trust, now=now)
    signers = [PrivateKey.from_pem(p.read_bytes()) for p in sorted(trust.glob("bundles-*.key"))]
    bundles = {}
    for v in (1, 2):
        bundles[v] = tmp_path / f"triage-{v}.bundle"
        build_bundle(Path(tiny_int4), bundles[v], name="triage", version=v, signers=signers, now=now)

    broker = DynsecMosquitto(tmp_path / "mosquitto", tls=(ca, server))
    admin_token = "slm_" + secrets.token_urlsafe(32)
    fleet = FleetServer(
        tmp_path / "fleet", broker_url=broker.url, trust_dir=trust, admin_token=admin_token,
        broker_password=broker.fleet_password, broker_ca_file=ca, broker_admin_username="admin",
        broker_admin_password=broker.admin_password, tls_cert_file=server.cert_file, tls_key_file=server.key_file,
        tls_client_ca_file=ca,
    )
    agents: dict[str, AgentProcess] = {}
    client: FleetClient | None = None
    try:
        fleet.start()
        assert fleet.url.startswith("https://") and fleet.broker_url == broker.url
        client = FleetClient(fleet.url, admin_token,
                             verify=client_context(ca, cert_file=operator.cert_file, key_file=operator.key_file))
        # without a client certificate the fleet does not answer at all (mutual TLS)
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):  # TLS 1.3: after the handshake
            httpx.get(f"{fleet.url}/healthz", verify=client_context(ca), timeout=10)

        identities = {
            KEPT: client.enrol(KEPT, [GROUP]),
            REVOKED: enrol_with_the_cli(fleet, client, ca, device_certs[REVOKED], tmp_path / REVOKED, REVOKED),
        }
        for d, ident in identities.items():  # each device got its own account in mosquitto at enrolment
            assert ident["broker_url"] == broker.url and ident["fleet_url"] == fleet.url
            assert "error" not in broker.get_client(d), f"mosquitto does not know {d}"
            assert client.device(d)["enrolled"] is True
            agents[d] = AgentProcess(
                d, tmp_path / d, broker.url, trust / "root.json", fleet.url, tmp_path / f"{d}.log",
                identity=ident, broker_ca=ca, fleet_ca=ca,
                fleet_cert=device_certs[d].cert_file, fleet_key=device_certs[d].key_file,
            )
        for a in agents.values():
            a.start()
        for a in agents.values():
            a.wait_ready()
        client.wait_online([KEPT, REVOKED])
        for v, b in bundles.items():
            assert client.upload(b)["version"] == v

        first = client.wait(client.deploy("triage", 1, group=GROUP)["id"], timeout=120)
        assert {t["device_id"]: t["state"] for t in first["targets"]} == {KEPT: "active", REVOKED: "active"}
        for d in (KEPT, REVOKED):
            assert client.device(d)["active"] == {"name": "triage", "version": 1}
            assert ask(agents[d].api_url)[0] == "triage:v1"

        revoked = client.revoke(REVOKED)
        assert revoked["revoked_at"] is not None
        # mosquitto forgot the account at once (and ended its session), and refuses its credentials
        assert "not found" in str(broker.get_client(REVOKED).get("error", "")).lower()
        assert broker.login(identities[REVOKED]) in ("Bad user name or password", "Not authorized")
        time.sleep(1)  # reports the fleet took in before the revocation are stored by now
        seen = {d: client.device(d)["last_seen"] for d in (KEPT, REVOKED)}
        # its device token no longer downloads anything, even over mutual TLS with its own certificate
        dev_http = httpx.Client(verify=client_context(ca, cert_file=device_certs[REVOKED].cert_file,
                                                      key_file=device_certs[REVOKED].key_file), timeout=10)
        with dev_http:
            r = dev_http.get(f"{fleet.url}/api/v1/bundles/triage/1/file",
                             headers={"Authorization": f"Bearer {identities[REVOKED]['api_token']}"})
            assert r.status_code in (401, 403), r.text
        history_before = [h["state"] for h in client.device(REVOKED)["history"]]

        second = client.deploy("triage", 2, group=GROUP)
        states = lambda: {t["device_id"]: t["state"] for t in client.deployment(second["id"])["targets"]}  # noqa: E731
        wait_for(lambda: states()[KEPT] in ("active", "rejected", "rolled_back", "failed"), "the kept device's report", 120)
        time.sleep(3)  # time enough for the revoked device to be heard from, were it still connected
        final = states()
        assert final[KEPT] == "active"
        assert REVOKED not in final, final  # a revoked device is left out of the group's deployment
        kept, gone = client.device(KEPT), client.device(REVOKED)
        assert kept["active"] == {"name": "triage", "version": 2} and kept["online"] is True
        assert gone["active"] == {"name": "triage", "version": 1} and gone["revoked_at"] is not None
        assert gone["online"] is False
        # not a message from it since (its agent sends telemetry every 2 s and keeps trying to reconnect), while the
        # kept device was heard from all along
        assert gone["last_seen"] == seen[REVOKED] and kept["last_seen"] > seen[KEPT]
        assert [h["state"] for h in gone["history"]] == history_before
        assert agents[REVOKED].proc is not None and agents[REVOKED].proc.poll() is None  # still running, shut out
        assert ask(agents[REVOKED].api_url)[0] == "triage:v1"  # and still serving the model it had
        assert ask(agents[KEPT].api_url)[0] == "triage:v2"
    finally:
        for a in agents.values():
            a.stop()
        if client is not None:
            client.close()
        fleet.stop()
        broker.close()
