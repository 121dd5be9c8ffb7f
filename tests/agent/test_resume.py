"""Power loss in each state of an update, then a restart: table-driven, with real bundles, a real HTTP server
and the real onnxruntime-genai health check. The agent is "killed" by an exception that no handler catches,
raised before or after a state's handler ran; a fresh Updater over the same disk then resumes."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from agent.config import Limits
from agent.runtime import LoadedModel
from agent.scheduler import Scheduler
from agent.store import ModelRef, Store
from agent.update import State, Updater
from fleet.bundles import build_bundle
from protocol.messages import BundleRef, DeployCommand, UpdateState
from protocol.trust import Keyring, generate_keypair

U = UpdateState
NOW = datetime.now(timezone.utc)


class PowerLoss(BaseException):
    """Stands for the process dying: no handler may catch it."""


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_int4):
    www = tmp_path_factory.mktemp("www")
    key = generate_keypair()
    for v in (1, 2):
        build_bundle(Path(tiny_int4), www / f"t{v}.bundle", name="triage", version=v, signers=[key], now=NOW)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}", Keyring((key.public,))
    server.shutdown()


def command(served, version: int, dep: str) -> DeployCommand:
    www, base, _ = served
    data = (www / f"t{version}.bundle").read_bytes()
    ref = BundleRef(name="triage", version=version, url=f"{base}/t{version}.bundle",
                    sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    return DeployCommand(deployment_id=dep, device_id="dev", bundle=ref, sent_at=NOW)


def updater(root: Path, served, reports: list) -> Updater:
    store, runtime = Store(root), Scheduler()
    active = store.active()
    if active:
        runtime.swap(LoadedModel.load(store.version_dir(active), active))
    return Updater(store=store, runtime=runtime, keyring=served[2], limits=Limits(), client=httpx.Client(),
                   report=lambda **kw: reports.append(kw))


def kill(up: Updater, state: State, when: str) -> None:
    original = up.handlers[state]

    def handler(rec):
        if when == "after":
            original(rec)
        raise PowerLoss(state.value)

    up.handlers[state] = handler


CASES = [
    # name, state, before/after the handler, outcome after restart, error code, serving after restart
    ("killed_in_download", State.DOWNLOAD, "before", U.ACTIVE, None, 2),
    ("killed_after_download", State.DOWNLOAD, "after", U.ACTIVE, None, 2),
    ("killed_in_verify", State.VERIFY, "after", U.ACTIVE, None, 2),
    ("killed_in_install", State.INSTALL, "after", U.ROLLED_BACK, "interrupted", 1),
    ("killed_in_health_check", State.HEALTH_CHECK, "before", U.ROLLED_BACK, "interrupted", 1),
    ("killed_in_commit", State.COMMIT, "after", U.ROLLED_BACK, "interrupted", 1),
    ("killed_in_cleanup", State.CLEANUP, "before", U.ACTIVE, None, 2),
]


@pytest.mark.parametrize("name, state, when, outcome, code, serving", CASES, ids=[c[0] for c in CASES])
def test_restart_after_power_loss(tmp_path, served, name, state, when, outcome, code, serving):
    reports: list[dict] = []
    first = updater(tmp_path, served, reports)
    assert first.handle(command(served, 1, "d1")) is U.ACTIVE

    second = updater(tmp_path, served, reports)
    kill(second, state, when)
    with pytest.raises(PowerLoss):
        second.handle(command(served, 2, "d2"))
    assert second.store.active() == (ModelRef("triage", 2) if (state, when) in (
        (State.COMMIT, "after"), (State.CLEANUP, "before")) else ModelRef("triage", 1))

    reports.clear()
    third = updater(tmp_path, served, reports)  # the restarted agent
    third.resume()
    final = reports[-1]
    assert final["state"] is outcome and final["deployment_id"] == "d2"
    assert final.get("error_code") == code
    assert third.store.active() == ModelRef("triage", serving)
    assert third.runtime.current.ref == ModelRef("triage", serving)
    assert list(third.store.staging_root.iterdir()) == []
    if outcome is U.ROLLED_BACK:
        assert not third.store.version_dir(ModelRef("triage", 2)).exists()
        assert third.store.floor("triage") == 1
    # the finished deployment is remembered: a redelivered command is ignored
    assert third.handle(command(served, 2, "d2")) is None


def test_a_state_entered_too_often_fails_instead_of_looping(tmp_path, served):
    reports: list[dict] = []
    assert updater(tmp_path, served, reports).handle(command(served, 1, "d1")) is U.ACTIVE
    up = updater(tmp_path, served, reports)
    kill(up, State.DOWNLOAD, "before")
    with pytest.raises(PowerLoss):
        up.handle(command(served, 2, "d2"))  # entered DOWNLOAD once
    for _ in range(2):  # the restarted agent dies in DOWNLOAD twice more
        up = updater(tmp_path, served, reports)
        kill(up, State.DOWNLOAD, "before")
        with pytest.raises(PowerLoss):
            up.resume()
    up = updater(tmp_path, served, reports)
    up.resume()  # a fourth entry is a loop: give up, change nothing
    assert reports[-1]["state"] is U.FAILED and reports[-1]["error_code"] == "state_loop"
    assert up.store.active() == ModelRef("triage", 1)
    assert up.runtime.current.ref == ModelRef("triage", 1)
