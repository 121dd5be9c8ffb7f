"""`slmops keys` and the fleet's trust folder: key files 0600, roots a device accepts after init, rotate and revoke
(checked with the device's own verification, protocol/root.py), refusals that write nothing, the trust routes, and
deploy commands signed under the current root."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fleet.api.app import create_app
from fleet.bundles import build_bundle
from fleet.keys_cli import app
from fleet.settings import Settings
from fleet.trust import load_trust
from protocol import topics
from protocol.errors import SignatureError
from protocol.messages import DeployCommand, parse_message
from protocol.root import load_trusted_root, walk_chain
from protocol.trust import PrivateKey, sign_envelope, verify_envelope, verify_message

from .conftest import ADMIN, wait_until

runner = CliRunner()
NOW = datetime.now(timezone.utc)


def keys(*args: str, ok: bool = True):
    r = runner.invoke(app, [str(a) for a in args])
    assert (r.exit_code == 0) is ok, r.output
    return r


def roots(folder: Path) -> dict[int, bytes]:
    return {int(p.name.split(".")[0]): p.read_bytes() for p in (folder / "root").glob("*.root.json")}


def private(folder: Path, pattern: str) -> list[PrivateKey]:
    return [PrivateKey.from_pem(p.read_bytes()) for p in sorted(folder.glob(pattern))]


@pytest.fixture
def trust(tmp_path: Path) -> Path:
    folder = tmp_path / "trust"
    keys("init", folder, "--bundle-keys", 3, "--bundle-threshold", 2, "--root-keys", 2, "--root-threshold", 2)
    return folder


def test_init_writes_private_keys_0600_and_a_root_devices_accept(trust: Path) -> None:
    key_files = sorted(trust.glob("*.key"))
    assert len(key_files) == 2 + 3 + 1
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in key_files)
    assert all(p.with_suffix(".pub").is_file() for p in key_files)
    root = load_trusted_root((trust / "root.json").read_bytes(), NOW)
    assert roots(trust) == {1: (trust / "root.json").read_bytes()}
    assert root.roles["bundles"].threshold == 2 and len(root.roles["bundles"].keyids) == 3
    assert root.roles["root"].threshold == 2
    assert {k.keyid for k in private(trust, "bundles-*.key")} == set(root.roles["bundles"].keyids)
    assert load_trust(trust).command_key.keyid == root.roles["commands"].keyids[0]
    keys("init", trust, ok=False)  # never over an existing root


def test_rotations_and_revocation_give_roots_a_device_walks(trust: Path) -> None:
    device = load_trusted_root(roots(trust)[1], NOW)
    old_bundles = private(trust, "bundles-*.key")
    old_command = PrivateKey.from_pem((trust / "commands.key").read_bytes())
    keys("rotate", trust, "--role", "commands")
    keys("rotate", trust, "--role", "bundles", "--new", 2, "--remove", old_bundles[0].keyid, "--remove",
         old_bundles[1].keyid, "--threshold", 2)
    keys("revoke", trust, old_bundles[2].keyid)
    keys("rotate", trust, "--role", "root")  # a third root key joins (2 of 3)
    chain = roots(trust)
    assert sorted(chain) == [1, 2, 3, 4, 5]
    final = walk_chain(device, chain.get, now=NOW)
    assert final.raw == (trust / "root.json").read_bytes() and old_bundles[2].keyid in final.revoked
    ring = final.keyring("bundles")
    assert {k.keyid for k in ring.keys}.isdisjoint(k.keyid for k in old_bundles) and ring.threshold == 2
    new_command = load_trust(trust).command_key
    assert new_command.keyid != old_command.keyid and new_command.keyid in final.roles["commands"].keyids
    assert (trust / f"commands-{old_command.keyid[:16]}.key").is_file()  # the old key is kept, not the signer
    assert len(final.roles["root"].keyids) == 3 and final.roles["root"].threshold == 2


def test_bundle_signed_by_a_revoked_key_is_refused_by_the_new_root(trust: Path, tmp_path: Path) -> None:
    from protocol.manifest import FileEntry, Manifest

    bundle_keys = private(trust, "bundles-*.key")
    keys("rotate", trust, "--role", "bundles")  # a fourth key, so revoking one keeps 2 of 3
    keys("revoke", trust, bundle_keys[0].keyid)
    root = load_trusted_root((trust / "root.json").read_bytes(), NOW)
    m = Manifest(name="m", version=1, created=NOW, files=(FileEntry(path="a", size=1, sha256="0" * 64),))
    ring = root.keyring("bundles")
    with pytest.raises(SignatureError):  # the revoked key and one good one: 1 of the 2 needed
        verify_envelope(sign_envelope(m, bundle_keys[:2]), ring)
    assert verify_envelope(sign_envelope(m, bundle_keys[1:3]), ring) == m


@pytest.mark.parametrize(("args", "why"), [
    pytest.param(lambda t: ("rotate", t, "--role", "targets"), "role", id="unknown_role"),
    pytest.param(lambda t: ("rotate", t, "--role", "bundles", "--threshold", 5), "threshold", id="threshold_too_high"),
    pytest.param(lambda t: ("rotate", t, "--role", "bundles", "--remove", "ab" * 32), "not in role", id="remove_unknown"),
    pytest.param(lambda t: ("revoke", t, "not-a-key-id"), "key id", id="revoke_malformed"),
    pytest.param(lambda t: ("revoke", t, load_trusted_root((t / "root.json").read_bytes()).roles["commands"].keyids[0]),
                 "threshold", id="revoke_last_command_key"),
])
def test_refused_changes_write_nothing(trust: Path, args, why: str) -> None:
    before = {p.name: p.read_bytes() for p in trust.rglob("*") if p.is_file()}
    r = keys(*args(trust), ok=False)
    assert r.exit_code == 2 and why in r.output
    assert {p.name: p.read_bytes() for p in trust.rglob("*") if p.is_file()} == before


def test_rotation_needs_the_root_keys(trust: Path) -> None:
    for p in trust.glob("root-*.key"):
        p.unlink()
    r = keys("rotate", trust, "--role", "bundles", ok=False)
    assert "root" in r.output and sorted(roots(trust)) == [1]


def test_show_prints_roles_fingerprints_and_version(trust: Path) -> None:
    root = load_trusted_root((trust / "root.json").read_bytes())
    for target in (trust, trust / "root" / "1.root.json"):
        out = keys("show", target).output
        assert "trust root v1" in out and "2 of 3" in out and root.roles["commands"].keyids[0][:16] in out


def test_generate_writes_a_0600_key(tmp_path: Path) -> None:
    keys("generate", "--out", tmp_path, "--name", "solo")
    assert stat.S_IMODE((tmp_path / "solo.key").stat().st_mode) == 0o600
    keys("generate", "--out", tmp_path, "--name", "solo", ok=False)


# ---- the running fleet with a trust folder ---------------------------------------------------------------------


@pytest.fixture
def trusted_client(settings: Settings, trust: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"trust_dir": trust})), headers=ADMIN) as c:
        assert c.app.state.fleet.messaging.wait_connected(5)
        yield c


@pytest.mark.parametrize(("path", "status"), [
    pytest.param("/api/v1/trust/root/1.json", 200, id="v1"),
    pytest.param("/api/v1/trust/root/2.json", 404, id="absent"),
    pytest.param("/api/v1/trust/root/01.json", 404, id="leading_zero"),
    pytest.param("/api/v1/trust/root/-1.json", 404, id="negative"),
    pytest.param(f"/api/v1/trust/root/{2**63}.json", 404, id="past_63_bits"),
    pytest.param("/api/v1/trust/root/1.json.bak", 404, id="suffix"),
    pytest.param("/api/v1/trust/root/%2e%2e%2froot.json", 404, id="dot_dot"),
])
def test_trust_routes(trusted_client: TestClient, trust: Path, path: str, status: int) -> None:
    r = trusted_client.get(path)
    assert r.status_code == status
    if status == 200:
        assert r.content == roots(trust)[1]
    else:
        assert b"signatures" not in r.content  # never a root (the router may answer before the route does)


def test_fleet_serves_a_rotation_and_signs_under_it_without_a_restart(trusted_client: TestClient, trust: Path,
                                                                      model_dir: Path, tmp_path: Path, devices) -> None:
    assert trusted_client.get("/api/v1/trust/root.json").content == (trust / "root.json").read_bytes()
    bundle = tmp_path / "b.bundle"
    build_bundle(model_dir, bundle, name="tiny", version=1, signers=private(trust, "bundles-*.key")[:2], now=NOW)
    unsigned = tmp_path / "u.bundle"
    build_bundle(model_dir, unsigned, name="tiny", version=2, signers=private(trust, "root-*.key"), now=NOW)
    assert trusted_client.post("/api/v1/bundles", content=unsigned.read_bytes()).status_code == 422  # not bundle keys
    assert trusted_client.post("/api/v1/bundles", content=bundle.read_bytes()).status_code == 201
    assert trusted_client.post("/api/v1/devices", json={"id": "dev-a", "groups": ["lab"]}).status_code == 201
    spy = devices("slmops-agent-dev-a")  # dev-a itself: only it may read its commands
    spy.subscribe(str(topics.cmd("dev-a")))
    keys("rotate", trust, "--role", "commands")
    assert trusted_client.get("/api/v1/trust/root/2.json").content == roots(trust)[2]
    assert trusted_client.post("/api/v1/deployments", json={"bundle": "tiny", "version": 1, "device_id": "dev-a"}
                               ).status_code == 201
    wait_until(lambda: spy.received(), what="the deploy command")
    cmd = parse_message(spy.received()[0].payload)
    assert isinstance(cmd, DeployCommand) and cmd.root_version == 2
    device = walk_chain(load_trusted_root(roots(trust)[1]), roots(trust).get, now=NOW)
    verify_message(cmd, device.keyring("commands"))
    with pytest.raises(SignatureError):
        verify_message(cmd, load_trusted_root(roots(trust)[1]).keyring("commands"))  # not the old command key

    # a bundle key revoked while the fleet runs stops counting for uploads at once
    first, *others = private(trust, "bundles-*.key")
    keys("revoke", trust, first.keyid)
    late = tmp_path / "late.bundle"
    build_bundle(model_dir, late, name="tiny", version=3, signers=[first, others[0]], now=NOW)
    refused = trusted_client.post("/api/v1/bundles", content=late.read_bytes())
    assert refused.status_code == 422 and refused.json()["code"] == "bad_signature"
    assert trusted_client.get("/api/v1/bundles/tiny/3").status_code == 404  # nothing stored
    build_bundle(model_dir, late, name="tiny", version=3, signers=others[:2], now=NOW)
    assert trusted_client.post("/api/v1/bundles", content=late.read_bytes()).status_code == 201


def test_metrics_show_the_trust_root_and_its_expiry(trusted_client: TestClient, trust: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def gauges() -> dict[str, float]:
        text = trusted_client.get("/metrics").text
        return {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.name.startswith("slmops_trust")}

    root = load_trusted_root(roots(trust)[1])
    assert gauges() == {"slmops_trust_root_version": 1, "slmops_trust_root_expiry_timestamp_seconds": root.expires.timestamp()}
    keys("rotate", trust, "--role", "commands", "--expires-in-days", "30")
    after = load_trusted_root(roots(trust)[2])
    assert gauges() == {"slmops_trust_root_version": 2, "slmops_trust_root_expiry_timestamp_seconds": after.expires.timestamp()}
