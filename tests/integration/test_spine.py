"""The spine end to end with real parts: the fleet (HTTP + SQLite + MQTT ingest), a real broker (the embedded
amqtt one, and mosquitto over MQTT 5 with dynamic security when installed: every client logs in with its own
account), three `slmops agent run` processes, real signed int4 bundles of the tiny model and real
onnxruntime-genai inference. v1 and v2 must become active everywhere; v3, whose
weights are damaged, must be rolled back everywhere while v2 keeps answering."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from fleet.bundles import build_bundle
from fleet.trust import init_trust
from protocol.trust import PrivateKey
from slmops.probes import probe_all
from slmops.story import AgentProcess, FleetClient, FleetServer, ask, damaged_copy, rollout
from tests.integration.dynsec import DynsecMosquitto, missing

pytestmark = pytest.mark.integration
DEVICES = ["spine-1", "spine-2", "spine-3"]
STEPS = ["received", "downloading", "verifying", "installing", "health_check"]


def check_story(tmp: Path, model: Path, broker_url: str | None, **fleet_kwargs: object) -> None:
    now = datetime.now(timezone.utc)
    trust = tmp / "trust"
    init_trust(trust, now=now, bundle_keys=3, bundle_threshold=2)  # slmops keys init, 2 of 3 bundle keys
    signers = [PrivateKey.from_pem(p.read_bytes()) for p in sorted(trust.glob("bundles-*.key"))][:2]
    folders = {1: model, 2: model, 3: damaged_copy(model, tmp / "broken")}
    bundles = {}
    for v, folder in folders.items():
        bundles[v] = tmp / f"triage-{v}.bundle"
        build_bundle(folder, bundles[v], name="triage", version=v, signers=signers, now=now)

    fleet = FleetServer(tmp / "fleet", broker_url=broker_url, trust_dir=trust, **fleet_kwargs).start()  # type: ignore[arg-type]
    client = FleetClient(fleet.url, token=fleet.admin_token)
    agents: list[AgentProcess] = []
    try:
        for d in DEVICES:  # each device enrols with its own one-time token: its own broker secret and API token
            agents.append(AgentProcess(d, tmp / d, fleet.broker_url, trust / "root.json", fleet.url, tmp / f"{d}.log",
                                       identity=client.enrol(d, ["demo"])))
        for a in agents:
            a.start()
        for a in agents:
            a.wait_ready()
            client.register(a.device_id, ["demo"])
        client.wait_online(DEVICES)
        for b in bundles.values():
            assert client.upload(b)["signer_keyids"] == sorted(k.keyid for k in signers)

        outcomes: dict[int, dict[str, str]] = {}
        for v in (1, 2, 3):
            dep = rollout(client, "triage", v, "demo", timeout=180)
            outcomes[v] = {t["device_id"]: t["state"] for t in dep["targets"]}
            for a in agents:
                model_id, answer = ask(a.api_url)
                assert model_id == f"triage:v{min(v, 2)}"
                assert answer.split(":")[0] in ("ok", "warning", "fault")
            if v == 3:
                assert all("smoke prompt" in t["detail"] for t in dep["targets"])

        assert outcomes == {
            1: dict.fromkeys(DEVICES, "active"),
            2: dict.fromkeys(DEVICES, "active"),
            3: dict.fromkeys(DEVICES, "rolled_back"),
        }
        for d in DEVICES:
            dev = client.device(d)
            assert dev["online"] is True
            assert dev["active"] == {"name": "triage", "version": 2}
            history = [h["state"] for h in dev["history"]]
            assert history == STEPS + ["active"] + STEPS + ["active"] + STEPS + ["rolled_back"]
            last = dev["history"][-1]
            assert last["error_code"] == "health_check" and last["active_version"] == 2
        # the demo's attacks (slmops/probes.py): each refused, nothing changed
        probes = probe_all(fleet, client, agents, model, tmp)
        assert [p.attack for p in probes if not p.ok] == [], probes
    finally:
        for a in agents:
            a.stop()
        client.close()
        fleet.stop()


def test_spine_with_the_embedded_broker(tmp_path, tiny_int4):
    check_story(tmp_path, Path(tiny_int4), broker_url=None)


@pytest.mark.skipif(missing() is not None, reason=missing() or "")
def test_spine_with_mosquitto_over_mqtt5(tmp_path, tiny_int4):
    """mosquitto with dynamic security (deploy/mosquitto/dynsec.conf): the fleet logs in as `fleet` and enrols each
    device's own account live; every agent logs in with its own."""
    broker = DynsecMosquitto(tmp_path / "mosquitto")
    try:
        check_story(tmp_path, Path(tiny_int4), broker_url=broker.url, broker_password=broker.fleet_password,
                    broker_admin_username="admin", broker_admin_password=broker.admin_password)
    finally:
        broker.close()
