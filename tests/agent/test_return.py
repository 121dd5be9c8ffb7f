"""Going back below the version floor, against real parts (amqtt broker, signed bundles of the tiny int4 model over
a counting HTTP server, onnxruntime-genai health checks): a fleet-signed deploy command for the version the device
keeps as `previous`, from the bundle file it was installed from, with its files intact, switches back to it without
downloading; every other command below the floor is refused exactly as before, and nothing changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from agent.config import Limits
from agent.runtime import LoadedModel
from agent.scheduler import Scheduler
from agent.store import ModelRef, Store
from agent.update import State, Updater
from protocol import topics
from protocol.messages import UpdateState, encode
from tests.agent.helpers_rig import CountingRig
from tests.agent.test_updates import assert_still_serving, states

pytestmark = pytest.mark.integration
U = UpdateState
V1, V2, V3 = (ModelRef("triage", v) for v in (1, 2, 3))


@pytest.fixture(scope="module")
def rig(tmp_path_factory, tiny_int4):
    """Installed v1, v2, v3 in turn: v3 serves, v2 is kept as previous, v1 was pruned, the floor is 3."""
    r = CountingRig(tmp_path_factory.mktemp("return"), Path(tiny_int4))
    r.start_agent()
    r.files = {v: r.bundle(v) for v in (1, 2, 3)}
    for v in (1, 2, 3):
        assert states(r.send(r.command(r.files[v], v)))[-1] is U.ACTIVE
    store = r.agent.store
    assert (store.active(), store.previous(), store.floor("triage")) == (V3, V2, 3)
    assert not store.version_dir(V1).exists()
    assert not store.manifest_file(V1).exists() and not store.digest_file(V1).exists()  # pruned whole
    yield r
    r.close()


def trusted_state(store: Store) -> dict:
    """Everything a refused command must leave as it was."""
    return {"active": store.active(), "previous": store.previous(), "floor": store.floor("triage"),
            "installed": sorted((r.name, r.version) for r in store.installed()),
            "manifest_v2": store.trusted_manifest(V2), "digest_v2": store.bundle_digest(V2),
            "staging": sorted(p.name for p in store.staging_root.iterdir())}


def flip_a_byte(path: Path) -> bytes:
    """Change one byte in the middle (same size, so only a sha256 check sees it); return the original bytes."""
    data = path.read_bytes()
    i = len(data) // 2
    path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    return data


REFUSED = [
    # id, command for (rig) -> (command, undo), expected states (None: dropped by the gate), error code
    ("older_version_not_previous", lambda r: (r.command(r.files[1], 1), None),
     [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.REJECTED], "bad_version"),
    ("previous_with_another_digest", lambda r: (r.command(r.bundle(2, name="v2-other.bundle", description="rebuilt"), 2),
                                                None),
     [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.REJECTED], "bad_version"),
    ("previous_with_damaged_files", lambda r: damaged_previous(r),
     [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.REJECTED], "bad_version"),
    ("unsigned_command", lambda r: (r.command(r.files[2], 2, signer=None), None), None, "forged"),
    ("forged_command", lambda r: (r.command(r.files[2], 2, signer=r.other), None), None, "forged"),
]


def damaged_previous(r: CountingRig):
    model = r.agent.store.version_dir(V2) / "model.onnx"
    original = flip_a_byte(model)
    return r.command(r.files[2], 2), lambda: model.write_bytes(original)


@pytest.mark.parametrize(("make", "expect", "code"), [pytest.param(m, e, c, id=i) for i, m, e, c in REFUSED])
def test_refused_below_the_floor(rig, make, expect, code):
    store = rig.agent.store
    before = trusted_state(store)
    sample = rig.agent.metrics.registry.get_sample_value
    dropped = sample("slmops_agent_commands_dropped_total", {"reason": "forged"}) or 0
    cmd, undo = make(rig)
    try:
        if expect is None:
            rig.pub.publish(str(topics.cmd("dev-1")), encode(cmd), qos=1).wait_for_publish(5)
            assert rig.silence()
            assert sample("slmops_agent_commands_dropped_total", {"reason": code}) == dropped + 1
        else:
            reports = rig.send(cmd)
            assert states(reports) == expect
            assert reports[-1].error_code == code and reports[-1].active_version == 3
    finally:
        if undo:
            undo()
    assert trusted_state(store) == before
    assert store.inspect(V2, hashes=True) is None
    assert_still_serving(rig, 3)


def test_goes_back_to_the_kept_previous_version_after_a_restart(rig):
    """The fleet aborts a rollout of v3 and sends v2 back, signed, to a device restarted since: it switches to the
    v2 it kept, fetching nothing, health-checks it and says it went back; the floor stays at 3."""
    rig.restart()
    asked = rig.gets(rig.files[2])
    reports = rig.send(rig.command(rig.files[2], 2))
    assert states(reports) == [U.RECEIVED, U.VERIFYING, U.HEALTH_CHECK, U.ACTIVE]
    assert reports[-1].active_version == 2 and reports[-1].error_code is None
    assert "went back to the previous version v2" in reports[-1].detail and "v3 is kept as previous" in reports[-1].detail
    assert rig.gets(rig.files[2]) == asked  # nothing downloaded
    store = rig.agent.store
    assert (store.active(), store.previous(), store.floor("triage")) == (V2, V3, 3)
    assert list(store.staging_root.iterdir()) == []
    assert_still_serving(rig, 2)

    rig.restart()  # what it went back to survives a restart, and the floor still refuses v1
    assert_still_serving(rig, 2)
    assert rig.agent.store.floor("triage") == 3
    reports = rig.send(rig.command(rig.files[1], 1))
    assert states(reports)[-1] is U.REJECTED and reports[-1].error_code == "bad_version"
    assert_still_serving(rig, 2)


def test_the_newer_version_installs_again_after_going_back(rig):
    """After going back, v3 (now previous, at the floor) is a plain update again: fetched, verified, installed."""
    asked = rig.gets(rig.files[3])
    reports = rig.send(rig.command(rig.files[3], 3))
    assert states(reports) == [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.INSTALLING, U.HEALTH_CHECK, U.ACTIVE]
    assert rig.gets(rig.files[3]) == asked + 1
    assert (rig.agent.store.active(), rig.agent.store.previous()) == (V3, V2)
    assert_still_serving(rig, 3)


class PowerLoss(BaseException):
    """Stands for the process dying: no handler may catch it."""


def updater(root: Path, keyring, reports: list) -> Updater:
    store, runtime = Store(root), Scheduler()
    runtime.swap(LoadedModel.load(store.version_dir(store.active()), store.active()))
    return Updater(store=store, runtime=runtime, keyring=keyring, limits=Limits(), client=httpx.Client(),
                   report=lambda **kw: reports.append(kw))


@pytest.mark.parametrize("state", [State.REUSE, State.HEALTH_CHECK, State.COMMIT], ids=lambda s: f"killed_in_{s.value}")
def test_power_loss_while_going_back(rig, tmp_path, state):
    """The agent dies while going back; the restarted one ends the update where Mender's rules say: REUSE runs again
    (it changed nothing), HEALTH_CHECK and COMMIT roll back to the version that served. No state is lost."""
    shutil.copytree(rig.agent.store.root, tmp_path / "data", ignore=shutil.ignore_patterns("outbox"))
    keyring = rig.agent.gate.bundle_keyring()
    cmd = rig.command(rig.files[2], 2)
    reports: list[dict] = []
    first = updater(tmp_path / "data", keyring, reports)
    original = first.handlers[state]

    def die(rec):
        if state is State.COMMIT:
            original(rec)
        raise PowerLoss(state.value)

    first.handlers[state] = die
    with pytest.raises(PowerLoss):
        first.handle(cmd)
    reports.clear()
    second = updater(tmp_path / "data", keyring, reports)
    second.resume()
    final = reports[-1]
    if state is State.REUSE:
        assert [r["state"] for r in reports] == [U.VERIFYING, U.HEALTH_CHECK, U.ACTIVE]
        serving, previous = V2, V3
    else:
        assert final["state"] is U.ROLLED_BACK and final["error_code"] == "interrupted"
        serving, previous = V3, V2
    assert final["deployment_id"] == cmd.deployment_id
    assert (second.store.active(), second.store.previous(), second.store.floor("triage")) == (serving, previous, 3)
    assert second.runtime.current.ref == serving
    assert second.store.inspect(V2, hashes=True) is None and second.store.inspect(V3, hashes=True) is None
