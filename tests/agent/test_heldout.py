"""The device scores its bundle's held-out set, and answers a repeated command with its terminal report.

Real parts: signed bundles of the tiny int4 model (each carrying the trainer's held-out set, `eval/heldout.jsonl`)
served over HTTP, the real onnxruntime-genai health check, an embedded MQTT broker for the running agent. The
expected score is measured independently on the host with the trainer's own greedy decoder and the set's rule; every
refusal row checks the terminal report AND the device's trusted state afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import itertools
import json
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from agent import health
from agent.config import Limits
from agent.store import ModelRef
from agent.update import Updater
from fleet.bundles import build_bundle
from protocol.errors import EvalSetError
from protocol.evalset import is_right, parse_items
from protocol.manifest import Manifest
from protocol.messages import BundleRef, DeployCommand, EvalScore, UpdateState
from protocol.trust import Keyring
from tests.agent.test_faults import no_more, running_agent, terminal, trusted, wait_terminal
from tests.net import embedded_broker
from tests.trustkit import TrustKit

pytest.importorskip("onnxruntime_genai")

U = UpdateState
NOW = datetime.now(timezone.utc)
BUNDLES = "api/v1/bundles"
SEQ = itertools.count(5000)
T1, T2 = ModelRef("triage", 1), ModelRef("triage", 2)
BELOW = "eval_below_minimum"


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    gets: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        CountingHandler.gets.append(self.path)
        super().do_GET()


def model_with(src: Path, dest: Path, *, min_score: float | None = None, heldout: bytes | None = None) -> Path:
    """A copy of the tiny model folder whose eval.json asks `min_score` of the held-out set (and whose set file is
    replaced by `heldout` when given)."""
    shutil.copytree(src, dest)
    doc = json.loads((dest / "eval.json").read_text())
    doc["heldout"]["min_score"] = min_score
    (dest / "eval.json").write_text(json.dumps(doc))
    if heldout is not None:
        (dest / doc["heldout"]["file"]).write_bytes(heldout)
    return dest


BAD_SETS = [
    # name, file content, reason in the report
    ("not_json_lines", b"prompt=p expected=ok\n", "line 1 is not JSON"),
    ("no_items", b"\n", "no items"),
    ("item_without_expected", b'{"prompt": "p"}\n', "expected"),
    ("too_many_items", b'{"prompt": "p", "expected": "ok"}\n' * 201, "more than 200 items"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_int4):
    """(www, base URL, bundle keyring, trust kit): v1 reports its score only, v2 asks at least 0.5, v3 asks 1.0,
    and bad-<name>.bundle (v2) carry a malformed set, signed as a builder that skipped the fleet's check would."""
    www, models = tmp_path_factory.mktemp("www"), tmp_path_factory.mktemp("models")
    kit = TrustKit()
    key = kit.bundle_keys[0]
    (www / BUNDLES).mkdir(parents=True)
    for v, min_score in ((1, None), (2, 0.5), (3, 1.0)):
        build_bundle(model_with(Path(tiny_int4), models / f"v{v}", min_score=min_score),
                     www / BUNDLES / f"t{v}.bundle", name="triage", version=v, signers=[key], now=NOW)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fleet.bundles.parse_items", lambda data: ())
        for name, data, _ in BAD_SETS:
            build_bundle(model_with(Path(tiny_int4), models / name, min_score=0.5, heldout=data),
                         www / BUNDLES / f"bad-{name}.bundle", name="triage", version=2, signers=[key], now=NOW)
    kit.write_root(www / "root.json")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}", Keyring((key.public,)), kit
    server.shutdown()


@pytest.fixture(scope="module")
def host_score(tiny_int4) -> EvalScore:
    """The held-out score measured on the host with the trainer's greedy decoder and the set's own rule."""
    from trainer.evaluate import chat_prompt, generate, load

    spec = json.loads((Path(tiny_int4) / "eval.json").read_text())["heldout"]
    m = Manifest.from_signed({"name": "triage", "version": 1, "created": "2026-01-01T00:00:00Z",
                              "files": [{"path": spec["file"], "size": 1, "sha256": "0" * 64}],
                              "eval": {"heldout": spec}})
    items = parse_items((Path(tiny_int4) / spec["file"]).read_bytes())
    model, tokenizer = load(tiny_int4)
    rights = [is_right(generate(model, tokenizer, chat_prompt(tokenizer, i.prompt), spec["max_new_tokens"]).text,
                       i.expected, i.match or m.eval.heldout.match) for i in items]
    return EvalScore(metric=spec["metric"], score=sum(rights) / len(rights), n=len(rights))


def command(served, file: str, version: int, dep: str) -> DeployCommand:
    www, base, _, kit = served
    data = (www / BUNDLES / file).read_bytes()
    ref = BundleRef(name="triage", version=version, url=f"{base}/{BUNDLES}/{file}",
                    sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    return kit.sign(DeployCommand(deployment_id=dep, device_id="dev-1", bundle=ref, sent_at=NOW, seq=next(SEQ)))


def updater(root: Path, served, reports: list) -> Updater:
    from agent.runtime import LoadedModel
    from agent.scheduler import Scheduler
    from agent.store import Store

    store, runtime = Store(root), Scheduler()
    active = store.active()
    if active:
        runtime.swap(LoadedModel.load(store.version_dir(active), active))
    return Updater(store=store, runtime=runtime, keyring=served[2], limits=Limits(), client=httpx.Client(),
                   report=lambda **kw: reports.append(kw))


@pytest.fixture(scope="module")
def golden(tmp_path_factory, served):
    """A data folder with v1 installed and active."""
    root = tmp_path_factory.mktemp("golden")
    up = updater(root / "g1", served, [])
    assert up.handle(command(served, "t1.bundle", 1, "g1")) is U.ACTIVE
    return root / "g1"


@pytest.fixture(scope="module")
def broker():
    b = embedded_broker().start()
    yield b
    b.stop()


# -- the health check itself -----------------------------------------------------------------------------------------
def test_health_check_scores_the_set_as_the_host_does(tiny_int4, host_score):
    folder = Path(tiny_int4)
    m = build_bundle(folder, folder.parent / "hc.bundle.tmp", name="triage", version=1, signers=[], now=NOW)
    try:
        passed = health.check(folder, m)
    finally:
        (folder.parent / "hc.bundle.tmp").unlink(missing_ok=True)
    assert passed.model.ref == T1
    assert passed.score == host_score
    assert passed.score.metric == "label_accuracy" and passed.score.n == 30
    assert 0.6 <= passed.score.score < 1.0  # the tiny model: better than the majority class, not perfect


def test_health_check_without_a_set_reports_no_score(tiny_int4, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_int4, folder)
    doc = json.loads((folder / "eval.json").read_text())
    del doc["heldout"]
    (folder / "eval.json").write_text(json.dumps(doc))
    shutil.rmtree(folder / "eval")
    m = build_bundle(folder, tmp_path / "b.bundle", name="triage", version=1, signers=[], now=NOW)
    assert m.eval.heldout is None
    assert health.check(folder, m).score is None


# -- through the update lifecycle ------------------------------------------------------------------------------------
def test_score_at_or_above_the_minimum_commits_and_rides_on_the_active_report(tmp_path, served, golden, host_score):
    shutil.copytree(golden, tmp_path / "d")
    reports: list = []
    up = updater(tmp_path / "d", served, reports)
    assert up.handle(command(served, "t2.bundle", 2, "ok")) is U.ACTIVE
    [end] = terminal(reports, "ok")
    assert end["eval"] == host_score and end["error_code"] is None and end["active_version"] == 2
    assert all(r.get("eval") is None for r in reports if not r["state"].terminal)  # progress reports carry none
    assert up.store.active() == T2 and up.runtime.current.ref == T2
    assert up.journal.finished("ok")["eval"] == host_score.model_dump()


def test_score_below_the_minimum_rolls_back_with_the_score_and_the_reason(tmp_path, served, golden, host_score):
    assert host_score.score < 1.0  # v3 asks 1.0 of the set: the tiny model must miss it for this test to mean it
    shutil.copytree(golden, tmp_path / "d")
    reports: list = []
    up = updater(tmp_path / "d", served, reports)
    before = trusted(up.store)
    assert up.handle(command(served, "t3.bundle", 3, "strict")) is U.ROLLED_BACK
    [end] = terminal(reports, "strict")
    assert end["state"] is U.ROLLED_BACK and end["error_code"] == BELOW
    assert f"label_accuracy {host_score.score:.3f}" in end["detail"] and "minimum 1" in end["detail"]
    assert end["eval"] == host_score and end["active_version"] == 1
    assert [r["state"] for r in reports if r["deployment_id"] == "strict"] == [
        U.RECEIVED, U.DOWNLOADING, U.VERIFYING, U.INSTALLING, U.HEALTH_CHECK, U.ROLLED_BACK]
    assert trusted(up.store) == before  # v1 active, floor 1, v3 removed, staging empty
    assert up.runtime.current.ref == T1


@pytest.mark.parametrize("name, data, reason", BAD_SETS, ids=[b[0] for b in BAD_SETS])
def test_malformed_set_is_rejected_before_install(tmp_path, served, golden, name, data, reason):
    shutil.copytree(golden, tmp_path / "d")
    reports: list = []
    up = updater(tmp_path / "d", served, reports)
    before = trusted(up.store)
    assert up.handle(command(served, f"bad-{name}.bundle", 2, f"bad-{name}")) is U.REJECTED
    [end] = terminal(reports, f"bad-{name}")
    assert end["error_code"] == EvalSetError.code and reason in end["detail"] and end["eval"] is None
    assert U.INSTALLING not in [r["state"] for r in reports]
    assert trusted(up.store) == before and up.runtime.current.ref == T1
    assert not up.store.version_dir(T2).exists()


def test_repeated_command_is_answered_from_the_journal_also_after_a_restart(tmp_path, served, golden, host_score):
    shutil.copytree(golden, tmp_path / "d")
    reports: list = []
    up = updater(tmp_path / "d", served, reports)
    up.handle(command(served, "t2.bundle", 2, "ok"))
    up.handle(command(served, "t3.bundle", 3, "strict"))
    firsts = {d: terminal(reports, d)[0] for d in ("ok", "strict")}
    before, gets = trusted(up.store), len(CountingHandler.gets)
    for again in (up, updater(tmp_path / "d", served, [])):  # the same updater, then one built anew from disk
        got: list = []
        again.report = lambda **kw: got.append(kw)
        for dep, file, v in (("ok", "t2.bundle", 2), ("strict", "t3.bundle", 3)):
            assert again.handle(command(served, file, v, dep)) is None  # a new seq: the gate let it through
        assert got == [firsts["ok"], firsts["strict"]]  # only the terminal reports, with the same content
        assert got[0]["eval"] == host_score and got[1]["eval"] == host_score and got[1]["error_code"] == BELOW
        assert trusted(again.store) == before and len(CountingHandler.gets) == gets  # nothing fetched again


def test_already_active_answer_carries_the_score_measured_at_install(tmp_path, served, golden, host_score):
    shutil.copytree(golden, tmp_path / "d")
    reports: list = []
    up = updater(tmp_path / "d", served, reports)
    up.handle(command(served, "t2.bundle", 2, "first"))
    gets = len(CountingHandler.gets)
    assert up.handle(command(served, "t2.bundle", 2, "second")) is U.ACTIVE  # a new deployment of what serves
    [end] = terminal(reports, "second")
    assert end["detail"] == "already active" and end["eval"] == host_score
    assert len(CountingHandler.gets) == gets


# -- the running agent: reports over MQTT, a fresh message id and seq, and a restart in between ----------------------
def test_agent_answers_a_repeated_command_with_its_terminal_report(tmp_path, served, golden, broker, host_score):
    shutil.copytree(golden, tmp_path / "d")
    with running_agent(tmp_path / "d", served, broker) as (agent, reports):
        agent._command(command(served, "t3.bundle", 3, "strict"))
        first = wait_terminal(reports, "strict")
        assert (first.state, first.error_code, first.eval) == (U.ROLLED_BACK, BELOW, host_score)
        gets = len(CountingHandler.gets)
        agent._command(command(served, "t3.bundle", 3, "strict"))  # the fleet asks again, with a new seq
        again = wait_terminal(reports, "strict", timeout=10)
        assert no_more(reports)
    with running_agent(tmp_path / "d", served, broker) as (agent, reports):
        agent._command(command(served, "t3.bundle", 3, "strict"))
        after_restart = wait_terminal(reports, "strict", timeout=10)
        assert agent.store.active() == T1
    same = ("deployment_id", "bundle_name", "bundle_version", "state", "active_version", "error_code", "detail", "eval")
    for answer in (again, after_restart):
        assert answer.model_dump(include=set(same)) == first.model_dump(include=set(same))
        assert answer.message_id != first.message_id and answer.seq > first.seq
    assert after_restart.seq > again.seq and after_restart.message_id != again.message_id
    assert len(CountingHandler.gets) == gets  # neither answer fetched the bundle again


def test_manifest_stored_by_an_older_agent_still_compares_equal():
    """A manifest an older release stored (no eval.heldout key) is the same signed manifest as this release's parse
    of it: a redeploy of that version is not mistaken for a reused version with other content."""
    from agent.update import _normalized

    old = {"name": "triage", "version": 1, "created": "2026-01-01T00:00:00Z", "eval": {"dataset": "d", "metrics": {}},
           "files": [{"path": "model.onnx", "size": 1, "sha256": "0" * 64}]}
    new = Manifest.from_signed(old).to_signed()
    assert new["eval"]["heldout"] is None and "heldout" not in old["eval"]
    assert _normalized(old) == new and _normalized(None) is None
    assert _normalized({"not": "a manifest"}) == {"not": "a manifest"}  # unparseable: left as it is, so it differs
