"""The fleet command line: keys, bundle build/sign/verify/inspect on files, and upload/deploy/devices against a
fleet served by uvicorn on a free port."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet.cli import app, bundle_app
from fleet.keys_cli import app as keys_app
from protocol.trust import PrivateKey, PublicKey
from tests.net import free_port

from .conftest import ADMIN, ADMIN_TOKEN

runner = CliRunner()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    for name in ("release", "stranger"):
        r = runner.invoke(keys_app, ["generate", "--out", str(out), "--name", name])
        assert r.exit_code == 0, r.output
    return out


def test_keys_generate_writes_a_private_pair_and_never_overwrites(keys: Path) -> None:
    key_file, pub_file = keys / "release.key", keys / "release.pub"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    private = PrivateKey.from_pem(key_file.read_bytes())
    assert PublicKey.from_pem(pub_file.read_bytes()).keyid == private.keyid
    before = key_file.read_bytes()
    r = runner.invoke(keys_app, ["generate", "--out", str(keys), "--name", "release"])
    assert r.exit_code == 2 and "already exist" in r.output
    assert key_file.read_bytes() == before


def test_bundle_build_verify_inspect(keys: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-4.bundle"
    args = ["--model", str(model_dir), "--name", "tiny", "--version", "4", "--out", str(out)]
    r = runner.invoke(bundle_app, ["build", *args, "--key", str(keys / "release.key"), "--base-model", "tiny-base"])
    assert r.exit_code == 0, r.output
    assert "tiny v4" in r.output and "accuracy=0.91" in r.output

    ok = runner.invoke(bundle_app, ["verify", str(out), "--trusted-key", str(keys / "release.pub")])
    assert ok.exit_code == 0 and "OK" in ok.output
    bad = runner.invoke(bundle_app, ["verify", str(out), "--trusted-key", str(keys / "stranger.pub")])
    assert bad.exit_code == 2 and "bad_signature" in bad.output and "OK" not in bad.output

    shown = runner.invoke(bundle_app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "tokenizer/tokenizer.json" in shown.output and "not checked" in shown.output


def test_unsigned_build_then_sign(keys: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "u.bundle"
    r = runner.invoke(bundle_app, ["build", "--model", str(model_dir), "--name", "tiny", "--version", "1", "--out", str(out)])
    assert r.exit_code == 0 and "unsigned" in r.output
    trusted = ["--trusted-key", str(keys / "release.pub")]
    assert runner.invoke(bundle_app, ["verify", str(out), *trusted]).exit_code == 2
    assert runner.invoke(bundle_app, ["sign", str(out), "--key", str(keys / "release.key")]).exit_code == 0
    assert runner.invoke(bundle_app, ["verify", str(out), *trusted]).exit_code == 0


def test_missing_key_file_is_a_one_line_error(model_dir: Path, tmp_path: Path) -> None:
    r = runner.invoke(
        bundle_app,
        ["build", "--model", str(model_dir), "--name", "t", "--version", "1", "--out", str(tmp_path / "x"), "--key", str(tmp_path / "nope.key")],
    )
    assert r.exit_code == 2 and "cannot read" in r.output and "Traceback" not in r.output


def test_upload_deploy_and_list_against_a_running_fleet(live_fleet: str, make_bundle, devices) -> None:
    import httpx

    assert httpx.post(f"{live_fleet}/api/v1/devices", json={"id": "dev-a", "groups": ["lab"]}, headers=ADMIN).status_code == 201
    anonymous = runner.invoke(app, ["upload", str(make_bundle("tiny", 1)), "--url", live_fleet], env={"SLMOPS_FLEET_TOKEN": ""})
    assert anonymous.exit_code == 2 and "401" in anonymous.output and "--token" in anonymous.output
    up = runner.invoke(app, ["upload", str(make_bundle("tiny", 1)), "--url", live_fleet, "--token", ADMIN_TOKEN])
    assert up.exit_code == 0 and "stored tiny v1" in up.output, up.output
    env = {"SLMOPS_FLEET_TOKEN": ADMIN_TOKEN}
    dep = runner.invoke(app, ["deploy", "--bundle", "tiny", "--version", "1", "--group", "lab", "--url", live_fleet], env=env)
    assert dep.exit_code == 0 and "dev-a: pending" in dep.output, dep.output
    listed = runner.invoke(app, ["devices", "--url", live_fleet], env=env)
    assert listed.exit_code == 0 and "dev-a" in listed.output and "lab" in listed.output
    missing = runner.invoke(app, ["deploy", "--bundle", "tiny", "--version", "7", "--device", "dev-a", "--url", live_fleet], env=env)
    assert missing.exit_code == 2 and "404" in missing.output


def test_tokens_enrolment_revoke_and_audit_from_the_command_line(live_fleet: str) -> None:
    import httpx

    env = {"SLMOPS_FLEET_TOKEN": ADMIN_TOKEN}
    made = runner.invoke(app, ["token", "create", "--name", "ci", "--role", "viewer", "--url", live_fleet], env=env)
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("slm_")
    assert httpx.get(f"{live_fleet}/api/v1/devices", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    listed = runner.invoke(app, ["token", "list", "--url", live_fleet], env=env)
    assert listed.exit_code == 0 and "ci" in listed.output and secret not in listed.output
    assert runner.invoke(app, ["token", "revoke", "1", "--url", live_fleet], env=env).exit_code == 0
    assert httpx.get(f"{live_fleet}/api/v1/devices", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    viewer_tries = runner.invoke(app, ["audit", "--url", live_fleet, "--token", secret])
    assert viewer_tries.exit_code == 2 and "401" in viewer_tries.output

    enrol_token = runner.invoke(app, ["enrol-token", "create", "--group", "lab", "--device", "dev-e", "--url", live_fleet], env=env)
    assert enrol_token.exit_code == 0, enrol_token.output
    one_time = enrol_token.stdout.strip().splitlines()[-1]
    r = httpx.post(f"{live_fleet}/api/v1/enrol", json={"token": one_time, "device_id": "dev-e"})
    assert r.status_code == 201, r.text
    gone = runner.invoke(app, ["revoke", "dev-e", "--url", live_fleet], env=env)
    assert gone.exit_code == 0 and "revoked" in gone.output
    log = runner.invoke(app, ["audit", "--url", live_fleet], env=env)
    assert log.exit_code == 0
    for action in ("token.created", "token.revoked", "enrolment_token.created", "device.enrolled", "device.revoked"):
        assert action in log.output


def test_unreachable_fleet_is_a_transport_error() -> None:
    r = runner.invoke(app, ["devices", "--url", f"http://127.0.0.1:{free_port()}"])
    assert r.exit_code == 2 and "cannot reach the fleet" in r.output


def test_importing_the_cli_stays_light() -> None:
    code = "import sys, fleet.cli; print(','.join(m for m in ('sqlalchemy', 'fastapi', 'uvicorn', 'amqtt', 'httpx', 'paho') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
