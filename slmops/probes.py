"""Attacks tried against a running fleet and its agents, each with what must happen: the demo's security step.

`probe_all(fleet, client, agents, bundle_folder)` runs every probe against the live parts of `slmops.story` and
returns one `Probe` each (what was tried, what must happen, what happened, whether that is what must happen):
- an anonymous MQTT client, and a device's credentials under another device's client id: refused at CONNECT;
- a deploy command published with the fleet's own broker password but signed by a key the devices do not trust:
  the agent drops it (its `slmops_agent_commands_dropped_total{reason="forged"}` goes up) and keeps its model;
- the fleet's API without a token (401), a device's token trying to deploy (403), an upload signed by an unknown
  key (422, nothing stored).
Only loopback is touched; every client made here is closed before the function returns.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

FORGED_WAIT_S = 10.0  # seconds the forged command may take to reach the agent and be counted


@dataclass(frozen=True)
class Probe:
    attack: str
    expected: str
    observed: str
    ok: bool


def _connack(broker_url: str, client_id: str, username: str | None, password: str | None) -> str:
    """'accepted' or the broker's refusal, in words."""
    import paho.mqtt.client as mqtt

    from protocol.topics import BrokerAddress

    addr = BrokerAddress.parse(broker_url)
    done, result = threading.Event(), {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if username is not None:
        c.username_pw_set(username, password)

    def on_connect(_c, _u, _f, reason, _p) -> None:
        result["rc"] = "accepted" if not reason.is_failure else f"refused ({reason})"
        done.set()

    def on_disconnect(_c, _u, _f, reason, _p) -> None:
        result.setdefault("rc", f"dropped ({reason})")
        done.set()

    c.on_connect, c.on_disconnect = on_connect, on_disconnect
    try:
        c.connect(addr.host, addr.port, keepalive=10)
        c.loop_start()
        done.wait(5)
    except OSError as exc:
        result["rc"] = f"refused ({exc.__class__.__name__})"
    finally:
        c.disconnect()
        c.loop_stop()
    return result.get("rc", "no answer")


def _dropped(api_url: str, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{api_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "slmops_agent_commands_dropped":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels.get("reason") == reason:
                    return s.value
    return 0.0


def _forged_command(fleet, agent, version: int) -> Probe:
    import paho.mqtt.client as mqtt

    from protocol import topics
    from protocol.messages import BundleRef, DeployCommand, encode
    from protocol.topics import BrokerAddress
    from protocol.trust import generate_keypair, sign_message

    attack = "deploy command sent with the fleet's broker password, signed by an unknown key"
    before, serving = _dropped(agent.api_url, "forged"), httpx.get(f"{agent.api_url}/v1/models", timeout=5).json()
    cmd = DeployCommand(
        device_id=agent.device_id, deployment_id=f"forged-{uuid.uuid4().hex[:8]}", seq=2**62, sent_at=datetime.now(timezone.utc),
        bundle=BundleRef(name="triage", version=version, url=f"{fleet.url}/api/v1/bundles/triage/{version}/file",
                         sha256="0" * 64, size=1),
    )
    forged = sign_message(cmd, [generate_keypair()])
    addr = BrokerAddress.parse(fleet.broker_url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"slmops-fleet-probe-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(fleet.settings.broker_username, fleet.settings.broker_password.get_secret_value())
    try:
        c.connect(addr.host, addr.port, keepalive=10)
        c.loop_start()
        c.publish(str(topics.cmd(agent.device_id)), encode(forged), qos=1).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()
    deadline = time.monotonic() + FORGED_WAIT_S
    while (after := _dropped(agent.api_url, "forged")) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    unchanged = httpx.get(f"{agent.api_url}/v1/models", timeout=5).json() == serving
    observed = f"dropped as forged ({after - before:g} counted), model {'unchanged' if unchanged else 'CHANGED'}"
    return Probe(attack, "dropped, counted, model unchanged", observed, after == before + 1 and unchanged)


def probe_all(fleet, client, agents: list, bundle_folder: Path, workdir: Path) -> list[Probe]:
    """Try each attack once against the running fleet and agents (see the module docstring)."""
    from fleet.bundles import build_bundle
    from protocol.trust import generate_keypair

    a, b = agents[0], agents[1 % len(agents)]
    probes = []
    rc = _connack(fleet.broker_url, "slmops-agent-intruder", None, None)
    probes.append(Probe("anonymous MQTT client", "refused at CONNECT", rc, rc.startswith("refused")))
    creds = a.identity or {}
    rc = _connack(fleet.broker_url, f"slmops-agent-{b.device_id}", creds.get("broker_username"), creds.get("broker_password"))
    probes.append(Probe(f"{a.device_id}'s password under {b.device_id}'s client id", "refused at CONNECT", rc,
                        rc.startswith("refused") and a is not b))
    probes.append(_forged_command(fleet, a, 99))

    r = httpx.get(f"{fleet.url}/api/v1/devices", timeout=10)
    probes.append(Probe("fleet API without a token", "401", str(r.status_code), r.status_code == 401))
    r = httpx.post(f"{fleet.url}/api/v1/deployments", json={"bundle": "triage", "version": 1, "device_id": a.device_id},
                   headers={"Authorization": f"Bearer {creds.get('api_token', '')}"}, timeout=10)
    probes.append(Probe("a device's API token creating a deployment", "403", str(r.status_code), r.status_code == 403))
    rogue = workdir / "rogue.bundle"
    build_bundle(bundle_folder, rogue, name="triage", version=98, signers=[generate_keypair()], now=datetime.now(timezone.utc))
    r = client.http.post("/api/v1/bundles", content=rogue.read_bytes(), headers={"content-type": "application/octet-stream"})
    stored = client.http.get("/api/v1/bundles/triage/98").status_code
    rogue.unlink()
    probes.append(Probe("upload signed by a key outside the trust root", "422, nothing stored",
                        f"{r.status_code} {r.json().get('code', '')}, stored: {'yes' if stored == 200 else 'no'}",
                        r.status_code == 422 and stored == 404))
    return probes
