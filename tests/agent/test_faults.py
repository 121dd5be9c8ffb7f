"""Faults a device meets in the field, one row each: a full, read-only or failing disk, a damaged state file, a
damaged model, commands redelivered, replaced or cancelled, a slow bundle server. Every row checks the terminal
report(s) the fleet gets AND the device's trusted state afterwards (active model, version floor, installed versions,
update record and history), in the manner of Mender's and python-tuf's tests.

Real parts throughout: signed bundles of the tiny int4 model over HTTP, the real onnxruntime-genai health check, a
real small file system (tmpfs, mounted as root; skipped with the reason where mounting is not permitted) and, where a
precise point is needed, a handler that raises the real OSError (ENOSPC, EROFS, EIO) before it writes anything.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from agent.config import AgentConfig, Limits
from agent.runtime import LoadedModel
from agent.scheduler import Scheduler
from agent.service import Agent
from agent.store import ModelRef, SeqCounter, Store
from agent.update import State, Updater
from fleet.bundles import build_bundle
from protocol.messages import BundleRef, CancelCommand, DeployCommand, StatusReport, UpdateState, parse_message
from protocol.trust import Keyring
from slmops.story import damaged_copy
from tests.net import device_password, embedded_broker
from tests.trustkit import TrustKit

U = UpdateState
NOW = datetime.now(timezone.utc)
T1, T2, T3 = ModelRef("triage", 1), ModelRef("triage", 2), ModelRef("triage", 3)


BUNDLES = "api/v1/bundles"  # the served folder mirrors the fleet's bundle paths (the agent checks the origin)
SLOW_PATH = f"/{BUNDLES}/slow/"
SEQ = itertools.count(1000)  # every command gets a seq above the last (the command gate drops the rest)


# -- the bundle server: plain files, and /api/v1/bundles/slow/<file> at about 40 kB/s ----------------------------
class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if not self.path.startswith(SLOW_PATH):
            return super().do_GET()
        data = (Path(self.directory) / BUNDLES / self.path[len(SLOW_PATH):]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            for i in range(0, len(data), 2048):
                self.wfile.write(data[i:i + 2048])
                self.wfile.flush()
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_int4):
    www = tmp_path_factory.mktemp("www")
    kit = TrustKit()
    key = kit.bundle_keys[0]
    (www / BUNDLES).mkdir(parents=True)
    for v in (1, 2, 3):
        build_bundle(Path(tiny_int4), www / BUNDLES / f"t{v}.bundle", name="triage", version=v, signers=[key], now=NOW)
    # v1 from another bundle file: older than the floor and not the kept previous version, so always refused
    build_bundle(Path(tiny_int4), www / BUNDLES / "t1-rebuilt.bundle", name="triage", version=1, signers=[key], now=NOW,
                 description="rebuilt")
    kit.write_root(www / "root.json")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}", Keyring((key.public,)), kit
    server.shutdown()


def command(served, version: int, dep: str, *, slow: bool = False, seq: int | None = None,
            file: str | None = None) -> DeployCommand:
    """A deploy command signed as the fleet signs it, with the next seq unless `seq` is given."""
    www, base, _, kit = served
    file = file or f"t{version}.bundle"
    data = (www / BUNDLES / file).read_bytes()
    ref = BundleRef(name="triage", version=version, url=f"{base}/{BUNDLES}/{'slow/' if slow else ''}{file}",
                    sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    cmd = DeployCommand(deployment_id=dep, device_id="dev-1", bundle=ref, sent_at=NOW,
                        seq=next(SEQ) if seq is None else seq)
    return kit.sign(cmd)


def updater(root: Path, served, reports: list, limits: Limits = Limits()) -> Updater:
    store, runtime = Store(root), Scheduler()
    active = store.active()
    if active:
        runtime.swap(LoadedModel.load(store.version_dir(active), active))
    return Updater(store=store, runtime=runtime, keyring=served[2], limits=limits, client=httpx.Client(),
                   report=lambda **kw: reports.append(kw))


@pytest.fixture(scope="module")
def golden(tmp_path_factory, served):
    """Data folders after installing v1 (g1) and then v2 (g2: active 2, previous 1, floor 2)."""
    root = tmp_path_factory.mktemp("golden")
    reports: list = []
    up = updater(root / "d", served, reports)
    assert up.handle(command(served, 1, "g1")) is U.ACTIVE
    shutil.copytree(root / "d", root / "g1")
    assert up.handle(command(served, 2, "g2")) is U.ACTIVE
    shutil.copytree(root / "d", root / "g2")
    return root


def terminal(reports: list, dep: str) -> list[dict]:
    return [r for r in reports if r["deployment_id"] == dep and r["state"].terminal]


def trusted(store: Store) -> dict:
    """The device's trusted state, for before/after comparisons."""
    return {"active": store.active(), "previous": store.previous(), "floor": store.floor("triage"),
            "installed": sorted(store.installed(), key=lambda r: r.version),
            "staging": sorted(p.name for p in store.staging_root.iterdir())}


# -- 1. disk faults at a precise point: the handler raises the real OSError before it writes ------------------------
def inject(up: Updater, state: State, err: int) -> None:
    def handler(rec):
        raise OSError(err, os.strerror(err), str(up.store.root / "x"))

    up.handlers[state] = handler


DISK = [
    # name, state that fails, errno, error code
    ("disk_full_in_download", State.DOWNLOAD, errno.ENOSPC, "disk_full"),
    ("disk_full_in_verify_unpack", State.VERIFY, errno.ENOSPC, "disk_full"),
    ("disk_full_in_install", State.INSTALL, errno.ENOSPC, "disk_full"),
    ("disk_full_in_commit", State.COMMIT, errno.ENOSPC, "disk_full"),
    ("read_only_in_download", State.DOWNLOAD, errno.EROFS, "read_only"),
    ("io_error_in_install", State.INSTALL, errno.EIO, "io_error"),
]


@pytest.mark.parametrize("name, state, err, code", DISK, ids=[d[0] for d in DISK])
def test_disk_fault_ends_failed_once_and_changes_nothing(tmp_path, served, golden, name, state, err, code):
    shutil.copytree(golden / "g1", tmp_path / "d")
    reports: list = []
    up = updater(tmp_path / "d", served, reports)
    before = trusted(up.store)
    inject(up, state, err)
    assert up.handle(command(served, 2, "d2")) is U.FAILED
    [end] = terminal(reports, "d2")
    assert end["state"] is U.FAILED and end["error_code"] == code and end["detail"]
    assert end["active_version"] == 1
    assert trusted(up.store) == before  # active 1, floor 1, only v1 installed, staging empty
    assert up.runtime.current.ref == T1
    assert up.journal.doc["current"] is None and up.journal.doc["history"][-1]["error_code"] == code
    # the fleet sends the command again (on every "online"): the same answer, nothing run again
    reports.clear()
    assert up.handle(command(served, 2, "d2")) is None
    assert [(r["state"], r["error_code"]) for r in reports] == [(U.FAILED, code)]
    assert trusted(up.store) == before


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_record_that_cannot_be_stored_is_kept_in_memory(tmp_path, served, golden, monkeypatch, err):
    shutil.copytree(golden / "g1", tmp_path / "d")
    reports: list = []
    up = updater(tmp_path / "d", served, reports)
    on_disk = (tmp_path / "d" / "state" / "update.json").read_text()

    def refuse(path, obj):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr("agent.journal.write_json_atomic", refuse)
    assert up.handle(command(served, 2, "d2")) is U.ACTIVE  # the update itself could write: it finishes
    assert len(terminal(reports, "d2")) == 1
    assert up.store.active() == T2 and up.store.floor("triage") == 2
    assert (tmp_path / "d" / "state" / "update.json").read_text() == on_disk
    reports.clear()
    assert up.handle(command(served, 2, "d2")) is None  # remembered in memory
    assert [r["state"] for r in reports] == [U.ACTIVE]


# -- 2. a real small disk: tmpfs a little above one bundle ----------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> None:
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_real_disk_full_while_unpacking(small_disk, served, golden):
    shutil.copytree(golden / "g1", small_disk / "d")
    reports: list = []
    up = updater(small_disk / "d", served, reports)
    before = trusted(up.store)
    assert up.handle(command(served, 2, "d2")) is U.FAILED  # v1 + bundle + unpacked v2 do not fit in 2 MiB
    [end] = terminal(reports, "d2")
    assert end["error_code"] == "disk_full" and end["active_version"] == 1
    assert [r["state"] for r in reports if r["deployment_id"] == "d2"] == [U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.FAILED]
    assert trusted(up.store) == before
    assert up.store.inspect(T1, hashes=True) is None


def test_real_full_disk_at_start_serves_and_fails_updates_once(small_disk, served, golden, broker):
    shutil.copytree(golden / "g1", small_disk / "d")
    fill(small_disk / "d")
    with running_agent(small_disk / "d", served, broker) as (agent, reports):
        assert agent.scheduler.current.ref == T1  # starts and serves on a full disk
        agent._command(command(served, 2, "d2"))
        end = wait_terminal(reports, "d2")
        assert end.state is U.FAILED and end.error_code == "disk_full"
        agent._command(command(served, 2, "d2"))  # redelivered: the same answer, not a rerun
        again = wait_terminal(reports, "d2")
        assert (again.state, again.error_code) == (U.FAILED, "disk_full")
        assert agent.store.active() == T1 and agent.store.floor("triage") == 1
        assert list(agent.store.staging_root.iterdir()) == []
        assert agent.seq.next() > 0


def test_real_read_only_disk_at_start_serves_and_fails_updates_once(small_disk, served, golden, broker):
    shutil.copytree(golden / "g1", small_disk / "d")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with running_agent(small_disk / "d", served, broker) as (agent, reports):
        assert agent.scheduler.current.ref == T1
        agent._command(command(served, 2, "d2"))
        end = wait_terminal(reports, "d2")
        assert end.state is U.FAILED and end.error_code == "read_only" and end.active_version == 1
        assert agent.seq.note and "clock" in agent.seq.note  # numbers from the clock, in memory
        agent._command(command(served, 2, "d2"))
        assert wait_terminal(reports, "d2").error_code == "read_only"
        assert no_more(reports)
        assert agent.store.active() == T1 and agent.store.installed() == [T1]


# -- 3. the agent: damaged state and damaged models at start --------------------------------------------------------
@pytest.fixture(scope="module")
def broker():
    b = embedded_broker().start()
    yield b
    b.stop()


class running_agent:
    """An Agent over `data`, started, with its status reports in a queue; stopped on exit."""

    def __init__(self, data: Path, served, broker, limits: Limits = Limits(), commands=()) -> None:
        self.data, self.served, self.broker, self.limits, self.commands = data, served, broker, limits, commands

    def __enter__(self):
        cfg = AgentConfig(device_id="dev-1", data_dir=self.data, broker_url=self.broker.url,
                          broker_username="dev-1", broker_password=device_password("dev-1"),
                          trust_root=self.served[0] / "root.json", bundle_origins=(self.served[1],), api_port=0,
                          telemetry_interval_s=3600,
                          limits=self.limits)
        self.reports: queue.Queue[StatusReport] = queue.Queue()
        self.agent = Agent(cfg, on_report=self.reports.put)
        for c in self.commands:  # waiting before the worker starts: it sees them all at once
            self.agent._command(c)
        self.agent.start()
        return self.agent, self.reports

    def __exit__(self, *exc) -> None:
        self.agent.stop()


def wait_terminal(reports: queue.Queue, dep: str, timeout: float = 60) -> StatusReport:
    deadline = time.monotonic() + timeout
    while True:
        r = reports.get(timeout=max(0.1, deadline - time.monotonic()))
        if r.deployment_id == dep and r.state.terminal:
            return r


def start_notes(reports: queue.Queue, timeout: float = 10) -> list[StatusReport]:
    """The start-up reports (deployment id agent-start-...), collected for a moment."""
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = reports.get(timeout=0.5)
        except queue.Empty:
            if got:
                break
            continue
        if r.deployment_id.startswith("agent-start-"):
            got.append(r)
    return got


def eventually(check, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def no_more(reports: queue.Queue, wait: float = 0.5) -> bool:
    try:
        reports.get(timeout=wait)
        return False
    except queue.Empty:
        return True


def damage_weights(folder: Path) -> None:
    f = folder / "model.onnx.data"
    f.write_bytes(os.urandom(f.stat().st_size))


def write(path: Path, text: str) -> None:
    path.write_text(text)


START = [
    # name, damage to g2, error code reported, active after start, floor after start, serving
    ("update_json_empty", lambda d: write(d / "state/update.json", ""), "state_damaged", T2, 2),
    ("update_json_invalid", lambda d: write(d / "state/update.json", '{"current": {"state": "nope"}'), "state_damaged", T2, 2),
    ("update_json_bad_record", lambda d: write(d / "state/update.json", '{"current": {"state": "install"}, "history": []}'),
     "state_damaged", T2, 2),
    ("active_json_empty", lambda d: write(d / "state/active.json", ""), "state_damaged", T2, 2),
    ("active_json_invalid", lambda d: write(d / "state/active.json", '{"active": "triage"}'), "state_damaged", T2, 2),
    ("active_json_and_floor_lost", lambda d: (write(d / "state/active.json", "[]"), (d / "state/floor.json").unlink()),
     "state_damaged", T2, 2),
    ("floor_json_invalid", lambda d: write(d / "state/floor.json", "{oops"), "state_damaged", T2, 2),
    ("seq_json_invalid", lambda d: write(d / "state/seq.json", "\x00\x00"), "state_damaged", T2, 2),
    ("active_folder_missing", lambda d: shutil.rmtree(d / "versions/triage/2"), "model_damaged", T1, 2),
    ("active_weights_damaged", lambda d: damage_weights(d / "versions/triage/2"), "model_damaged", T1, 2),
    ("active_folder_missing_and_active_json_empty",
     lambda d: (shutil.rmtree(d / "versions/triage/2"), write(d / "state/active.json", "")), "state_damaged", T1, 2),
]


@pytest.mark.parametrize("name, damage, code, active, floor", START, ids=[s[0] for s in START])
def test_damaged_state_at_start_is_recovered_reported_and_updates_go_on(tmp_path, served, golden, broker,
                                                                         name, damage, code, active, floor):
    shutil.copytree(golden / "g2", tmp_path / "d")
    (tmp_path / "d" / "staging" / "leftover").mkdir()
    damage(tmp_path / "d")
    with running_agent(tmp_path / "d", served, broker, Limits(check_hashes=True)) as (agent, reports):
        notes = start_notes(reports)
        assert code in [n.error_code for n in notes], [n.detail for n in notes]
        assert all(n.bundle_name == "triage" and n.active_version == active.version for n in notes)
        assert agent.scheduler.current.ref == active
        assert agent.store.active() == active and agent.store.floor("triage") == floor
        assert agent.store.inspect(active, hashes=True) is None
        # the version floor held: an older bundle (not the kept previous one) is still refused (the fallback rows
        # serve v1 itself)
        agent._command(command(served, 1, "old", file="t1-rebuilt.bundle" if active == T2 else None))
        end = wait_terminal(reports, "old")
        if active == T2:
            assert end.state is U.REJECTED and end.error_code == "bad_version"
        else:
            assert end.state is U.ACTIVE and end.detail == "already active"
        # updates are not stuck: a newer one runs to its end
        agent._command(command(served, 3, "new"))
        assert wait_terminal(reports, "new").state is U.ACTIVE
        assert agent.store.active() == T3 and agent.store.floor("triage") == 3
        assert agent.scheduler.current.ref == T3
        assert list(agent.store.staging_root.iterdir()) == []
        json.loads((tmp_path / "d" / "state" / "active.json").read_text())  # rewritten whole
        assert eventually(lambda: [h["deployment_id"] for h in json.loads(
            (tmp_path / "d" / "state" / "update.json").read_text())["history"]][-2:] == ["old", "new"])


def test_seq_numbers_from_a_damaged_seq_file_go_on_from_the_clock(tmp_path):
    (tmp_path / "seq.json").write_text("not json")
    seq = SeqCounter(tmp_path / "seq.json")
    first = seq.next()
    assert first > int(time.time() * 1000) - 60_000 and seq.note
    assert json.loads((tmp_path / "seq.json").read_text())["reserved"] > first  # reserved again from there
    assert SeqCounter(tmp_path / "seq.json").next() > first


def test_redeploy_of_the_damaged_active_version_repairs_it(tmp_path, served, golden, broker):
    shutil.copytree(golden / "g2", tmp_path / "d")
    with running_agent(tmp_path / "d", served, broker, Limits(check_hashes=True)) as (agent, reports):
        assert agent.scheduler.current.ref == T2
        damage_weights(tmp_path / "d" / "versions" / "triage" / "2")  # damaged while it serves
        agent._command(command(served, 2, "again"))
        end = wait_terminal(reports, "again")
        assert end.state is U.ACTIVE and end.detail != "already active"
        assert agent.store.inspect(T2, hashes=True) is None  # repaired in place
        assert agent.store.active() == T2 and agent.store.previous() == T1
        assert agent.store.floor("triage") == 2 and agent.store.installed() == [T1, T2]
        agent._command(command(served, 2, "once-more"))  # intact now: answered at once
        assert wait_terminal(reports, "once-more").detail == "already active"


def test_repair_killed_in_install_keeps_a_complete_serving_copy(tmp_path, served, golden):
    """Install exchanges the new copy with the active version's folder in one rename: it is never absent."""
    shutil.copytree(golden / "g2", tmp_path / "d")
    reports: list = []
    up = updater(tmp_path / "d", served, reports, Limits(check_hashes=True))
    damage_weights(tmp_path / "d" / "versions" / "triage" / "2")
    seen: list[bool] = []
    original = up.handlers[State.INSTALL]

    def install(rec):
        original(rec)
        seen.append(up.store.inspect(T2, hashes=True) is None)
        raise KeyboardInterrupt  # the power goes

    up.handlers[State.INSTALL] = install
    with pytest.raises(KeyboardInterrupt):
        up.handle(command(served, 2, "fix"))
    assert seen == [True]
    again = updater(tmp_path / "d", served, reports, Limits(check_hashes=True))
    again.resume()
    assert terminal(reports, "fix")[-1]["state"] is U.ROLLED_BACK
    assert again.store.active() == T2 and again.store.inspect(T2, hashes=True) is None  # the new, intact copy stays
    assert again.store.installed() == [T1, T2]


# -- 4. order of commands: redelivered, superseded, cancelled; slow servers ----------------------------------------
def test_redelivered_finished_command_gets_its_outcome_again(tmp_path, served, golden, broker):
    shutil.copytree(golden / "g1", tmp_path / "d")
    with running_agent(tmp_path / "d", served, broker) as (agent, reports):
        agent._command(command(served, 2, "d2"))
        first = wait_terminal(reports, "d2")
        before = trusted(agent.store)
        agent._command(command(served, 2, "d2"))
        again = wait_terminal(reports, "d2", timeout=10)
        assert (again.state, again.error_code, again.active_version) == (first.state, first.error_code, 2)
        assert no_more(reports) and trusted(agent.store) == before


def test_newer_deployment_supersedes_queued_older_ones(tmp_path, served, golden, broker):
    shutil.copytree(golden / "g1", tmp_path / "d")
    # a seq is above every earlier one (the command gate drops the others), so the newest also arrived last
    waiting = [command(served, 2, "a", seq=1), command(served, 2, "b", seq=2), command(served, 3, "c", seq=3)]
    with running_agent(tmp_path / "d", served, broker, commands=waiting) as (agent, reports):
        ends = {d: wait_terminal(reports, d) for d in ("a", "b", "c")}
        assert (ends["a"].state, ends["a"].error_code) == (U.FAILED, "superseded")
        assert (ends["b"].state, ends["b"].error_code) == (U.FAILED, "superseded")
        assert ends["c"].state is U.ACTIVE
        assert no_more(reports)
        assert agent.store.active() == T3 and agent.store.floor("triage") == 3
        agent._command(command(served, 2, "a"))  # the fleet sends the superseded deployment again: same answer
        assert wait_terminal(reports, "a").error_code == "superseded"


def test_cancel_of_a_queued_deployment(tmp_path, served, golden, broker):
    shutil.copytree(golden / "g1", tmp_path / "d")
    with running_agent(tmp_path / "d", served, broker) as (agent, reports):
        msg = served[3].sign(CancelCommand(deployment_id="q", device_id="dev-1", sent_at=NOW, seq=next(SEQ)))
        assert parse_message(msg.model_dump_json().encode()) == msg  # a message kind on the wire
        agent._command(msg)
        agent._command(command(served, 2, "q"))
        end = wait_terminal(reports, "q")
        assert (end.state, end.error_code, end.active_version) == (U.FAILED, "cancelled", 1)
        assert no_more(reports) and trusted(agent.store)["installed"] == [T1]


SLOW = [
    # name, limits, what ends it, error code
    ("cancel_during_download", Limits(download_min_rate_bps=0), "cancel", "cancelled"),
    ("server_under_the_minimum_rate", Limits(download_min_rate_bps=200_000, download_rate_window_s=0.5), None,
     "download_too_slow"),
    ("download_past_its_deadline", Limits(download_min_rate_bps=0, download_deadline_s=1.0), None, "download_deadline"),
]


@pytest.mark.parametrize("name, limits, end_by, code", SLOW, ids=[s[0] for s in SLOW])
def test_slow_or_cancelled_download_ends_fast_and_later_updates_run(tmp_path, served, golden, name, limits, end_by, code):
    shutil.copytree(golden / "g1", tmp_path / "d")
    reports: list = []
    up = updater(tmp_path / "d", served, reports, limits)
    before = trusted(up.store)
    started = time.monotonic()
    worker = threading.Thread(target=up.handle, args=(command(served, 2, "slow", slow=True),))
    worker.start()
    if end_by == "cancel":
        while not any(r["state"] is U.DOWNLOADING for r in reports):
            time.sleep(0.02)
        time.sleep(0.3)
        up.handle(CancelCommand(deployment_id="slow", device_id="dev-1", sent_at=NOW))  # from another thread
    worker.join(timeout=30)
    assert time.monotonic() - started < 5
    [end] = terminal(reports, "slow")
    assert (end["state"], end["error_code"], end["active_version"]) == (U.FAILED, code, 1)
    assert trusted(up.store) == before
    assert up.handle(command(served, 2, "fast")) is U.ACTIVE  # the next update is not held up
    assert up.store.active() == T2


def test_damaged_copy_model_is_caught_by_hash_check_only(tmp_path, tiny_int4, served, golden):
    """Weights replaced by bytes of the same size pass the size check; the sha256 check (Limits.check_hashes)
    catches them."""
    shutil.copytree(golden / "g2", tmp_path / "d")
    store = Store(tmp_path / "d")
    shutil.rmtree(store.version_dir(T2))
    damaged_copy(Path(tiny_int4), store.version_dir(T2))
    assert store.inspect(T2) is None
    assert "sha256" in store.inspect(T2, hashes=True)
