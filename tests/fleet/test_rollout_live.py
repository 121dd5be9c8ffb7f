"""Rollouts end to end through a running fleet (uvicorn on a free port, a real MQTT broker) and the command line:
devices that answer their deploy commands the way an agent does, `slmops fleet rollout create --watch` following
the waves to the end, and a canary that catches a bad bundle before the rest of the fleet sees it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from fleet.cli import app

from .answering import AnsweringDevice
from .conftest import ADMIN, ADMIN_TOKEN

runner = CliRunner()


@pytest.fixture
def fleet_with_devices(live_fleet: str, make_bundle, devices) -> Iterator[tuple[str, list[AnsweringDevice]]]:
    ids = [f"d{i}" for i in range(6)]
    for d in ids:
        assert httpx.post(f"{live_fleet}/api/v1/devices", json={"id": d, "groups": ["lab"]}, headers=ADMIN).status_code == 201
    for v in (1, 2):
        r = httpx.post(f"{live_fleet}/api/v1/bundles", content=make_bundle("tiny", v).read_bytes(), headers=ADMIN)
        assert r.status_code == 201, r.text
    yield live_fleet, [AnsweringDevice(devices(f"slmops-agent-{d}"), d, bad_versions=frozenset({2})) for d in ids]


@pytest.mark.both_databases
def test_watch_follows_a_rollout_to_the_end_and_a_canary_stops_a_bad_bundle(fleet_with_devices) -> None:
    url, fleet_devices = fleet_with_devices
    env = {"SLMOPS_FLEET_TOKEN": ADMIN_TOKEN, "COLUMNS": "220"}
    good = runner.invoke(app, ["rollout", "create", "--bundle", "tiny", "--version", "1", "--group", "lab",
                               "--canary", "1", "--wave", "50%", "--wave", "100%", "--gate", "accuracy>=0.8",
                               "--watch", "--url", url], env=env)
    assert good.exit_code == 0, good.output
    assert "canary" in good.output and "wave 2" in good.output and "succeeded" in good.output
    assert all(d.updates and len(d.updates) == 1 for d in fleet_devices), "each device updated once"

    bad = runner.invoke(app, ["rollout", "create", "--bundle", "tiny", "--version", "2", "--query", "group=lab",
                              "--canary", "1", "--error-threshold", "0", "--allow-regression", "--watch", "--url", url],
                        env=env)
    assert bad.exit_code == 1 and "aborted" in bad.output and "canary: 1 of 1 devices failed" in bad.output, bad.output
    reached = [d for d in fleet_devices if len(d.updates) == 2]
    assert len(reached) == 1, "only the canary ever heard of the bad bundle"

    listed = runner.invoke(app, ["rollout", "list", "--url", url], env=env)
    assert listed.exit_code == 0 and "aborted" in listed.output and "succeeded" in listed.output
    rid = bad.output.split("rollout ")[1].split(":")[0].strip()
    shown = runner.invoke(app, ["rollout", "show", rid, "--url", url], env=env)
    assert shown.exit_code == 0 and "canary" in shown.output and "failed" in shown.output
    again = runner.invoke(app, ["rollout", "resume", rid, "--url", url], env=env)
    assert again.exit_code == 2 and "409" in again.output and "only a paused rollout" in again.output


def test_cli_refuses_malformed_options_before_calling_the_fleet() -> None:
    for args, message in [
        (["--group", "lab", "--query", "site=a"], "exactly one of --group and --query"),
        (["--group", "lab", "--wave", "abc"], "not a count"),
        (["--group", "lab", "--wave", "150%"], "1% to 100%"),
        (["--group", "lab", "--gate", "accuracy>0.8"], "METRIC>=SCORE"),
        (["--group", "lab", "--window", "1-5"], "HH:MM-HH:MM"),
    ]:
        r = runner.invoke(app, ["rollout", "create", "--bundle", "tiny", "--version", "1", *args,
                                "--url", "http://127.0.0.1:9"])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert "cannot reach" not in r.output


def test_tags_and_groups_from_the_command_line(live_fleet: str) -> None:
    env = {"SLMOPS_FLEET_TOKEN": ADMIN_TOKEN, "COLUMNS": "220"}
    assert httpx.post(f"{live_fleet}/api/v1/devices", json={"id": "t1", "groups": ["lab", "edge"]}, headers=ADMIN).status_code == 201
    tagged = runner.invoke(app, ["tag", "t1", "site=berlin", "tier=a", "--url", live_fleet], env=env)
    assert tagged.exit_code == 0 and "site=berlin, tier=a" in tagged.output, tagged.output
    removed = runner.invoke(app, ["tag", "t1", "tier=", "--url", live_fleet], env=env)
    assert removed.exit_code == 0 and "site=berlin" in removed.output and "tier" not in removed.output
    bad = runner.invoke(app, ["tag", "t1", "Bad Key=x", "--url", live_fleet], env=env)
    assert bad.exit_code == 2 and "422" in bad.output
    groups = runner.invoke(app, ["groups", "--url", live_fleet], env=env)
    assert groups.exit_code == 0 and "edge" in groups.output and "lab" in groups.output
