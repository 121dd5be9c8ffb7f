"""The command gate: only commands the fleet signed, each once, in order, for bundles on the fleet's origin.

Real Ed25519 roots and command signatures (tests/trustkit.py), a real data folder; the fetcher is the kit serving
signed roots like the fleet's /api/v1/trust/root/{n}.json. Each refusal is one row: the reason it is counted under,
and the state afterwards (the last accepted seq, the files, the trusted root) unchanged."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from agent.commands import CommandGate, RootFetcher, on_origin
from agent.config import AgentConfig, parse_origin
from agent.metrics import COMMAND_DROP_REASONS, Metrics
from protocol.errors import ConfigError, DownloadError
from protocol.messages import BundleRef, CancelCommand, DeployCommand
from protocol.trust import generate_keypair
from tests.trustkit import ORIGIN, TrustKit

NOW = datetime.now(timezone.utc)
URL = f"{ORIGIN}/api/v1/bundles/triage/2/file"


def deploy(seq: int, url: str = URL, dep: str = "d1") -> DeployCommand:
    ref = BundleRef(name="triage", version=2, url=url, sha256="0" * 64, size=10)
    return DeployCommand(deployment_id=dep, device_id="dev-1", bundle=ref, sent_at=NOW, seq=seq)


def cancel(seq: int) -> CancelCommand:
    return CancelCommand(deployment_id="d1", device_id="dev-1", sent_at=NOW, seq=seq)


class Device:
    """A gate over one data folder, as the agent builds it; `restart()` builds it again from disk."""

    def __init__(self, tmp: Path, kit: TrustKit, *, provisioned: int = 1) -> None:
        self.tmp, self.kit = tmp, kit
        self.provisioned = kit.write_root(tmp / "provisioned" / "root.json", provisioned)
        self.metrics = Metrics()
        self.fetched: list[int] = []
        self.gate = self.restart()

    def fetch(self, n: int) -> bytes | None:
        self.fetched.append(n)
        return self.kit.fetch(n)

    def restart(self) -> CommandGate:
        self.gate = CommandGate(self.tmp / "state", provisioned=self.provisioned, origins=(ORIGIN,), fetch=self.fetch,
                                metrics=self.metrics)
        return self.gate

    def dropped(self) -> dict[str, float]:
        get = self.metrics.registry.get_sample_value
        return {r: get("slmops_agent_commands_dropped_total", {"reason": r}) for r in COMMAND_DROP_REASONS
                if get("slmops_agent_commands_dropped_total", {"reason": r})}

    def files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((self.tmp / "state").iterdir())}


@pytest.fixture()
def kit() -> TrustKit:
    return TrustKit()


@pytest.fixture()
def dev(tmp_path: Path, kit: TrustKit) -> Device:
    d = Device(tmp_path, kit)
    assert d.gate.admit(kit.sign(deploy(5)))  # the last accepted command: seq 5
    return d


OTHER = generate_keypair()
DROPS = [
    # (id, command as it arrives (from the kit), reason)
    ("unsigned", lambda k: deploy(6), "forged"),
    ("signed_by_an_unknown_key", lambda k: k.sign(deploy(6), key=OTHER), "forged"),
    ("signed_by_a_bundle_key", lambda k: k.sign(deploy(6), key=k.bundle_keys[0]), "forged"),
    ("signed_by_a_root_key", lambda k: k.sign(deploy(6), key=k.root_keys[0]), "forged"),
    ("seq_raised_after_signing", lambda k: k.sign(deploy(6)).model_copy(update={"seq": 7}), "forged"),
    ("url_changed_after_signing", lambda k: k.sign(deploy(6)).model_copy(update={"bundle": deploy(
        6, f"{ORIGIN}/api/v1/bundles/evil/1/file").bundle}), "forged"),
    ("cancel_unsigned", lambda k: cancel(6), "forged"),
    ("same_seq_again", lambda k: k.sign(deploy(5, dep="d2")), "replayed"),
    ("same_command_again", lambda k: k.sign(deploy(5)), "replayed"),
    ("older_seq", lambda k: k.sign(deploy(4, dep="d0")), "reordered"),
    ("cancel_older_seq", lambda k: k.sign(cancel(3)), "reordered"),
    ("other_host", lambda k: k.sign(deploy(6, "http://127.0.0.2:8700/api/v1/bundles/triage/2/file")), "wrong_origin"),
    ("other_port", lambda k: k.sign(deploy(6, "http://127.0.0.1:8701/api/v1/bundles/triage/2/file")), "wrong_origin"),
    ("other_scheme", lambda k: k.sign(deploy(6, "https://127.0.0.1:8700/api/v1/bundles/triage/2/file")), "wrong_origin"),
    ("path_outside_bundles", lambda k: k.sign(deploy(6, f"{ORIGIN}/api/v1/devices")), "wrong_origin"),
    ("dot_dot_out_of_bundles", lambda k: k.sign(deploy(6, f"{ORIGIN}/api/v1/bundles/../devices")), "wrong_origin"),
    ("percent_encoded_dots", lambda k: k.sign(deploy(6, f"{ORIGIN}/api/v1/bundles/%2e%2e/devices")), "wrong_origin"),
    ("user_info", lambda k: k.sign(deploy(6, "http://u@127.0.0.1:8700/api/v1/bundles/t/2/file")), "wrong_origin"),
    ("query", lambda k: k.sign(deploy(6, f"{URL}?next=http://evil")), "wrong_origin"),
    ("not_http", lambda k: k.sign(deploy(6, "file:///etc/passwd")), "wrong_origin"),
    ("root_version_nobody_serves", lambda k: k.sign(deploy(6)).model_copy(update={"root_version": 9}), "root_unavailable"),
]


@pytest.mark.parametrize(("make", "reason"), [pytest.param(m, r, id=i) for i, m, r in DROPS])
def test_dropped_command(dev: Device, kit: TrustKit, make, reason: str) -> None:
    before = dev.files()
    assert dev.gate.admit(make(kit)) is False
    assert dev.dropped() == {reason: 1.0}
    assert dev.gate.last_seq == 5 and dev.files() == before and dev.gate.root.version == 1
    assert dev.restart().last_seq == 5


def test_accepted_commands_are_stored_before_they_are_acted_on(dev: Device, kit: TrustKit) -> None:
    assert dev.gate.admit(kit.sign(cancel(6)))
    assert dev.gate.admit(kit.sign(deploy(40, dep="d9")))  # seqs are fleet-wide: gaps are normal
    for name in ("commands.json", "commands.2.json"):
        assert json.loads((dev.tmp / "state" / name).read_text())["seq"] == 40
    assert dev.dropped() == {} and dev.restart().last_seq == 40
    assert dev.gate.admit(kit.sign(deploy(40, dep="d9"))) is False and dev.dropped() == {"replayed": 1.0}


@pytest.mark.parametrize("damaged", ["commands.json", "commands.2.json"])
def test_last_seq_survives_a_torn_copy(dev: Device, kit: TrustKit, damaged: str) -> None:
    (dev.tmp / "state" / damaged).write_bytes(b'{"seq": 9')  # cut short by a power loss
    gate = dev.restart()
    assert gate.last_seq == 5
    assert gate.admit(kit.sign(deploy(5))) is False and dev.dropped() == {"replayed": 1.0}


def test_last_seq_survives_a_copy_that_went_back(dev: Device, kit: TrustKit) -> None:
    (dev.tmp / "state" / "commands.json").write_text('{"seq": 0, "recent": []}')
    assert dev.restart().last_seq == 5


def test_rotation_is_walked_and_new_keys_work(dev: Device, kit: TrustKit) -> None:
    old_command_key, old_bundle_keys = kit.command_key, kit.bundle_keys
    kit.rotate(commands=True, bundles=True, revoke=True)
    assert dev.gate.admit(kit.sign(deploy(6)))  # names root v2: the device walks to it first
    assert dev.fetched == [2, 3] and dev.gate.root.version == 2
    assert [k.keyid for k in dev.gate.bundle_keyring().keys] == [k.keyid for k in kit.bundle_keys]
    assert all(k.keyid not in {o.keyid for o in old_bundle_keys} for k in dev.gate.bundle_keyring().keys)
    assert dev.gate.admit(kit.sign(deploy(7), key=old_command_key)) is False  # the revoked command key
    assert dev.dropped() == {"forged": 1.0}
    assert dev.restart().root.version == 2  # stored in state/root.json


def test_device_offline_through_three_rotations_walks_them(dev: Device, kit: TrustKit) -> None:
    kit.rotate(root=True)
    kit.rotate(bundles=True, revoke=True)
    kit.rotate(root=True, commands=True, revoke=True)
    assert dev.gate.admit(kit.sign(deploy(6)))
    assert dev.gate.root.version == 4 and dev.fetched == [2, 3, 4, 5]


def test_rotation_not_signed_by_the_old_root_is_refused(dev: Device, kit: TrustKit) -> None:
    kit.root_keys = [generate_keypair()]  # an attacker's root: signs v2 with keys the device never trusted
    kit._sign_next(kit.root_keys)
    before = dev.files()
    assert dev.gate.admit(kit.sign(deploy(6))) is False
    assert dev.dropped() == {"root_unavailable": 1.0} and dev.gate.root.version == 1 and dev.files() == before


def test_fleet_unreachable_for_a_new_root(dev: Device, kit: TrustKit) -> None:
    kit.rotate(commands=True)

    def down(n: int) -> bytes | None:
        raise DownloadError("connection refused")

    dev.gate.fetch = down
    assert dev.gate.admit(kit.sign(deploy(6))) is False
    assert dev.dropped() == {"root_unavailable": 1.0} and dev.gate.last_seq == 5


def test_expired_root_without_a_newer_one_drops_commands(tmp_path: Path) -> None:
    kit = TrustKit(days=1)
    d = Device(tmp_path, kit)
    d.gate.clock = lambda: NOW + timedelta(days=2)
    assert d.gate.admit(kit.sign(deploy(1))) is False and d.dropped() == {"root_unavailable": 1.0}
    kit.expires = NOW + timedelta(days=30)
    kit.rotate()  # the fleet publishes a fresh root: the device walks to it and accepts again
    assert d.gate.admit(kit.sign(deploy(2))) and d.gate.root.version == 2


def test_stored_root_wins_over_a_lower_provisioned_one_and_a_higher_one_is_walked_to(dev: Device, kit: TrustKit) -> None:
    kit.rotate(commands=True)
    kit.rotate(bundles=True)
    assert dev.gate.admit(kit.sign(deploy(6)))
    assert dev.restart().root.version == 3  # the provisioned file is still v1
    kit.rotate(commands=True)
    kit.write_root(dev.provisioned, 4)
    dev.fetched.clear()
    assert dev.restart().root.version == 4 and dev.fetched == []  # v4 follows v3: nothing to fetch
    kit.rotate()
    kit.rotate()
    kit.write_root(dev.provisioned, 6)
    assert dev.restart().root.version == 6 and dev.fetched == [5]


def test_damaged_stored_root_falls_back_to_the_provisioned_one(dev: Device) -> None:
    (dev.tmp / "state" / "root.json").write_bytes(b"")
    assert dev.restart().root.version == 1


def test_first_start_refuses_an_unusable_trust_root(tmp_path: Path, kit: TrustKit) -> None:
    bad = tmp_path / "root.json"
    bad.write_bytes(kit.roots[1].replace(b'"threshold":1', b'"threshold":2', 1))
    with pytest.raises(ConfigError, match="not usable"):
        CommandGate(tmp_path / "state", provisioned=bad, origins=(ORIGIN,), fetch=kit.fetch)
    with pytest.raises(ConfigError, match="--trust-root"):
        CommandGate(tmp_path / "state", provisioned=tmp_path / "missing.json", origins=(ORIGIN,), fetch=kit.fetch)
    assert not (tmp_path / "state" / "root.json").exists()


# ---- the agent acts only on admitted commands -------------------------------------------------------------------


def test_agent_acts_only_on_admitted_commands(tmp_path: Path, kit: TrustKit) -> None:
    from agent.service import Agent
    from tests.net import free_port

    cfg = AgentConfig(device_id="dev-1", data_dir=tmp_path / "d", broker_url=f"mqtt://127.0.0.1:{free_port()}",
                      trust_root=kit.write_root(tmp_path / "root.json"), bundle_origins=(ORIGIN,), api_port=0)
    agent = Agent(cfg)
    cancels: list[str] = []
    agent.updater.cancel = cancels.append  # type: ignore[method-assign]
    try:
        agent._command(deploy(1))  # unsigned
        agent._command(kit.sign(cancel(2), key=OTHER))
        agent._command(kit.sign(deploy(3, "http://evil:8700/api/v1/bundles/triage/2/file")))
        assert agent.commands.empty() and cancels == []
        good = kit.sign(deploy(4))
        agent._command(good)
        agent._command(good)  # a replay
        agent._command(kit.sign(cancel(5)))
        assert agent.commands.get_nowait() == good and agent.commands.empty() and cancels == ["d1"]
        text = agent.metrics.exposition().decode()
        assert 'slmops_agent_commands_dropped_total{reason="forged"} 2.0' in text
        assert 'slmops_agent_commands_dropped_total{reason="wrong_origin"} 1.0' in text
        assert 'slmops_agent_commands_dropped_total{reason="replayed"} 1.0' in text
        assert agent.updater.keyring().keys == kit.root.keyring("bundles").keys
    finally:
        agent.http.close()


@pytest.mark.parametrize(("kw", "match"), [
    pytest.param({"bundle_origins": (ORIGIN,)}, "--trust-root", id="no_trust_root"),
    pytest.param({"trust_root": Path("r.json")}, "--bundle-origin", id="no_bundle_origin"),
    pytest.param({"trust_root": Path("r.json"), "bundle_origins": ("ftp://fleet",)}, "http", id="origin_not_http"),
    pytest.param({"trust_root": Path("r.json"), "bundle_origins": ("http://fleet/api",)}, "http", id="origin_path"),
    pytest.param({"trust_root": Path("r.json"), "bundle_origins": ("http://fleet:99999",)}, "URL", id="origin_port"),
])
def test_agent_config_requires_trust(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AgentConfig(device_id="dev-1", data_dir=tmp_path, **kw)


def test_origin_matching() -> None:
    origins = (parse_origin("HTTP://Fleet.Example"), parse_origin("https://[::1]:8443/"))
    assert on_origin("http://fleet.example:80/api/v1/bundles/a/1/file", origins)
    assert on_origin("https://[::1]:8443/api/v1/bundles/a/1/file", origins)
    assert not on_origin("https://fleet.example/api/v1/bundles/a/1/file", origins)
    assert not on_origin("http://fleet.example:80:80/api/v1/bundles/a/1/file", origins)


# ---- the root fetcher -------------------------------------------------------------------------------------------


def test_root_fetcher(kit: TrustKit) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        n = request.url.path.rsplit("/", 1)[-1]
        if n == "1.json":
            return httpx.Response(200, content=kit.roots[1])
        if n == "2.json":
            return httpx.Response(404)
        if n == "3.json":
            return httpx.Response(200, content=b" " * 200_000)
        return httpx.Response(500)

    fetch = RootFetcher(httpx.Client(transport=httpx.MockTransport(handler)), ORIGIN)
    assert fetch(1) == kit.roots[1] and fetch(2) is None
    with pytest.raises(DownloadError, match="over"):
        fetch(3)
    with pytest.raises(DownloadError, match="500"):
        fetch(4)
