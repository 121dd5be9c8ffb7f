"""Download-only deploy commands against real parts (amqtt broker, signed bundles of the tiny int4 model over an
HTTP server that counts requests, onnxruntime-genai health checks): the bundle is downloaded and fully verified,
nothing is installed, the device answers `downloaded`; a later command for the same bundle installs it without a
second download (across a restart), a damaged or removed download is fetched again, and another bundle removes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.store import ModelRef
from protocol.messages import UpdateState
from tests.agent.helpers_rig import CountingRig
from tests.agent.test_updates import assert_still_serving, states

pytestmark = pytest.mark.integration
U = UpdateState
INSTALL = [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.INSTALLING, U.HEALTH_CHECK, U.ACTIVE]
STAGE = [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.DOWNLOADED]


@pytest.fixture(scope="module")
def rig(tmp_path_factory, tiny_int4):
    r = CountingRig(tmp_path_factory.mktemp("dlonly"), Path(tiny_int4))
    r.start_agent()
    assert states(r.send(r.command(r.bundle(2), 2)))[-1] is U.ACTIVE
    yield r
    r.close()


def kept(rig: CountingRig) -> dict | None:
    """What <data_dir>/downloaded/ describes, or None when it is empty."""
    info = rig.agent.store.root / "downloaded" / "bundle.json"
    return json.loads(info.read_text()) if info.exists() else None


def stage(rig: CountingRig, version: int, **kw) -> Path:
    """Send a download-only command for a fresh bundle of `version`; check it is downloaded, verified, not installed."""
    store = rig.agent.store
    active, floor = store.active(), store.floor("triage")
    path = rig.bundle(version, name=f"dl-{version}.bundle")
    reports = rig.send(rig.command(path, version, download_only=True, **kw))
    assert states(reports) == STAGE
    assert reports[-1].active_version == active.version and reports[-1].error_code is None
    assert "nothing installed" in reports[-1].detail
    assert rig.gets(path) == 1
    assert (store.active(), store.floor("triage")) == (active, floor)
    assert not store.version_dir(ModelRef("triage", version)).exists()
    assert list(store.staging_root.iterdir()) == []
    assert kept(rig)["version"] == version
    assert_still_serving(rig, active.version)
    return path


def test_download_only_then_install_after_a_restart_fetches_once(rig):
    v = rig.agent.store.active().version + 1
    path = stage(rig, v)
    rig.restart()
    assert kept(rig)["version"] == v  # the verified download survives the restart
    assert_still_serving(rig, v - 1)
    reports = rig.send(rig.command(path, v))  # a new deployment of the same bundle, to install it
    assert states(reports) == INSTALL
    assert rig.gets(path) == 1  # not downloaded again
    assert "nothing fetched again" in reports[-1].detail
    assert kept(rig) is None and list(rig.agent.store.staging_root.iterdir()) == []
    assert_still_serving(rig, v)


def test_the_same_deployment_without_download_only_installs_it(rig):
    v = rig.agent.store.active().version + 1
    path = stage(rig, v, dep=f"rollout-{v}")
    again = rig.send(rig.command(path, v, download_only=True, dep=f"rollout-{v}"))  # a redelivery: same answer
    assert states(again) == [U.DOWNLOADED]
    reports = rig.send(rig.command(path, v, dep=f"rollout-{v}"))
    assert states(reports) == INSTALL
    assert rig.gets(path) == 1
    assert_still_serving(rig, v)
    repeated = rig.send(rig.command(path, v, dep=f"rollout-{v}"))  # now finished as installed
    assert states(repeated) == [U.ACTIVE]


def flip(folder: Path) -> None:
    tar = folder / "bundle.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])


@pytest.mark.parametrize("harm", [flip, lambda folder: shutil.rmtree(folder)], ids=["damaged", "removed"])
def test_a_damaged_or_removed_download_is_fetched_again(rig, harm):
    v = rig.agent.store.active().version + 1
    path = stage(rig, v)
    harm(rig.agent.store.root / "downloaded")
    reports = rig.send(rig.command(path, v))
    assert states(reports) == INSTALL
    assert rig.gets(path) == 2
    assert reports[-1].detail == ""
    assert kept(rig) is None
    assert_still_serving(rig, v)


def test_another_bundle_supersedes_the_download(rig):
    v = rig.agent.store.active().version + 1
    stage(rig, v)
    newer = stage(rig, v + 1)  # a second download-only replaces the first: one bundle kept at most
    assert kept(rig)["version"] == v + 1
    other = rig.bundle(v + 2, name=f"inst-{v + 2}.bundle")
    assert states(rig.send(rig.command(other, v + 2))) == INSTALL
    assert kept(rig) is None and not (rig.agent.store.root / "downloaded").exists()
    assert rig.gets(newer) == 1
    assert_still_serving(rig, v + 2)


REFUSED = [
    # id, bundle (rig, active version) -> (file, version), error code
    ("signed_by_another_key", lambda r, v: (r.bundle(v + 1, name="dl-other.bundle", signer=r.other), v + 1),
     "bad_signature"),
    ("below_the_floor", lambda r, v: (r.bundle(1, name="dl-old.bundle"), 1), "bad_version"),
]


@pytest.mark.parametrize(("make", "code"), [pytest.param(m, c, id=i) for i, m, c in REFUSED])
def test_download_only_refuses_what_an_install_refuses(rig, make, code):
    store = rig.agent.store
    active = store.active()
    path, version = make(rig, active.version)
    reports = rig.send(rig.command(path, version, download_only=True))
    assert states(reports) == [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.REJECTED]
    assert reports[-1].error_code == code
    assert kept(rig) is None and list(store.staging_root.iterdir()) == []
    assert (store.active(), store.floor("triage")) == (active, active.version)
    assert_still_serving(rig, active.version)
