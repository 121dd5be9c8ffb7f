"""The device's side of enrolment: against a real fleet (uvicorn on a free port, real SQLite, embedded broker),
the identity file (0600, strict parsing), and how `agent run` picks its credentials."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from agent.cli import app as agent_app
from agent.config import AgentConfig
from agent.enrol import Identity, enrol, identity_path, load_identity, resolve, save_identity
from fleet.api.app import create_app
from fleet.auth import DbAuthenticator
from protocol.errors import ConfigError
from tests.fleet.conftest import ADMIN, BROKER_PASSWORD, secure_settings
from tests.net import embedded_broker, free_port, wait_port

runner = CliRunner()
IDENTITY = Identity(
    device_id="pump-1", broker_username="pump-1", broker_password="p" * 20 + "Q1", api_token="slm_" + "t" * 43,
    broker_url="mqtt://127.0.0.1:1883", fleet_url="http://127.0.0.1:8700",
)  # fmt: skip


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[str, object]]:
    with embedded_broker() as broker:
        port = free_port()
        settings = secure_settings(tmp_path / "fleet", broker_url=broker.url, public_url=f"http://127.0.0.1:{port}",
                                   client_id="slmops-fleet-enrol")
        fleet_app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(fleet_app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            wait_port(port)
            yield f"http://127.0.0.1:{port}", fleet_app
        finally:
            server.should_exit = True
            thread.join(timeout=15)


def enrolment_token(url: str, **body: object) -> str:
    r = httpx.post(f"{url}/api/v1/enrolment-tokens", json={"groups": ["lab"], **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def test_agent_enrol_writes_a_private_identity_the_fleet_and_broker_accept(fleet, tmp_path: Path) -> None:
    url, fleet_app = fleet
    data = tmp_path / "agent"
    token = enrolment_token(url, device_id="pump-1")
    args = ["enrol", "--fleet", url, "--device-id", "pump-1", "--data-dir", str(data)]
    r = runner.invoke(agent_app, args, env={"SLMOPS_AGENT_ENROL_TOKEN": token})
    assert r.exit_code == 0, r.output
    path = identity_path(data)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    identity = load_identity(data)
    assert identity is not None and identity.device_id == "pump-1" and identity.fleet_url == url
    assert identity.broker_password not in r.output and identity.api_token not in r.output
    assert identity.api_token not in repr(identity) and identity.broker_password not in repr(identity)
    auth = DbAuthenticator(fleet_app.state.fleet.db.sessions, BROKER_PASSWORD)
    assert auth.authenticate(identity.broker_username, identity.broker_password) is not None
    listed = httpx.get(f"{url}/api/v1/bundles/tiny/1/file", headers={"Authorization": f"Bearer {identity.api_token}"})
    assert listed.status_code == 403  # a known device token; nothing is deployed to it

    again = runner.invoke(agent_app, args, env={"SLMOPS_AGENT_ENROL_TOKEN": token})
    assert again.exit_code == 2 and "--force" in again.output
    reused = runner.invoke(agent_app, [*args, "--force"], env={"SLMOPS_AGENT_ENROL_TOKEN": token})
    assert reused.exit_code == 2 and "already used" in reused.output
    assert load_identity(data) == identity  # a refused enrolment leaves the identity alone


def test_enrol_refusals_are_one_line_config_errors(fleet) -> None:
    url, _ = fleet
    with pytest.raises(ConfigError, match="HTTP 401.*unknown"):
        enrol(url, "slm_" + "x" * 43, "pump-1")
    with pytest.raises(ConfigError, match="HTTP 422"):
        enrol(url, enrolment_token(url), "fleet")


def test_the_agents_download_client_sends_the_token(tmp_path: Path) -> None:
    from agent.service import Agent

    from tests.trustkit import ORIGIN, TrustKit

    root = TrustKit().write_root(tmp_path / "root.json")
    config = AgentConfig(device_id="pump-1", data_dir=tmp_path / "a", trust_root=root, bundle_origins=(ORIGIN,),
                         fleet_token="slm_" + "z" * 43)
    assert "slm_" not in repr(config)
    agent = Agent(config)
    try:
        assert agent.http.headers["authorization"] == "Bearer slm_" + "z" * 43
    finally:
        agent.http.close()
    bare = Agent(AgentConfig(device_id="pump-2", data_dir=tmp_path / "b", trust_root=root, bundle_origins=(ORIGIN,)))
    try:
        assert "authorization" not in bare.http.headers
    finally:
        bare.http.close()


def test_saved_identity_round_trips_and_is_created_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = save_identity(tmp_path, IDENTITY)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(tmp_path) == IDENTITY
    assert load_identity(tmp_path / "never-enrolled") is None
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_identity(tmp_path)


GOOD = asdict(IDENTITY)
BAD_FILES = [
    ("not json", b"{"),
    ("not an object", b"[]"),
    ("missing api token", json.dumps({k: v for k, v in GOOD.items() if k != "api_token"}).encode()),
    ("device id with a slash", json.dumps(GOOD | {"device_id": "a/b"}).encode()),
    ("short password", json.dumps(GOOD | {"broker_password": "short"}).encode()),
    ("secret with a newline", json.dumps(GOOD | {"api_token": "slm_" + "x" * 20 + "\n"}).encode()),
    ("number for a url", json.dumps(GOOD | {"fleet_url": 8700}).encode()),
    ("file url", json.dumps(GOOD | {"fleet_url": "file:///etc/passwd"}).encode()),
    ("too large", json.dumps(GOOD | {"pad": "x" * 20_000}).encode()),
]


@pytest.mark.parametrize("case, data", BAD_FILES, ids=[r[0] for r in BAD_FILES])
def test_a_damaged_identity_file_is_a_config_error(tmp_path: Path, case: str, data: bytes) -> None:
    path = identity_path(tmp_path)
    path.parent.mkdir(parents=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    with pytest.raises(ConfigError, match="enrol again"):
        load_identity(tmp_path)


RESOLVE = [
    ("no identity, nothing given", False, None, None, ("mqtt://127.0.0.1:1883", None, None, None)),
    ("no identity, token given", False, "slm_cli", "mqtt://b:1", ("mqtt://b:1", "slm_cli", None, None)),
    ("identity fills in", True, None, None, (IDENTITY.broker_url, IDENTITY.api_token, "pump-1", IDENTITY.broker_password)),
    ("command line wins", True, "slm_cli", "mqtt5://b:2", ("mqtt5://b:2", "slm_cli", "pump-1", IDENTITY.broker_password)),
]


@pytest.mark.parametrize("case, saved, token, broker, expected", RESOLVE, ids=[r[0] for r in RESOLVE])
def test_agent_run_credentials(tmp_path: Path, case, saved, token, broker, expected) -> None:
    if saved:
        save_identity(tmp_path, IDENTITY)
    c = resolve(tmp_path, "pump-1", fleet_token=token, broker_url=broker)
    assert (c.broker_url, c.fleet_token, c.broker_username, c.broker_password) == expected


def test_an_identity_of_another_device_is_refused(tmp_path: Path) -> None:
    save_identity(tmp_path, IDENTITY)
    with pytest.raises(ConfigError, match="belongs to device 'pump-1'"):
        resolve(tmp_path, "pump-2", fleet_token=None, broker_url=None)
