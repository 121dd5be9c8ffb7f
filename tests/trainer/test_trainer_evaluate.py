"""Evaluation of the reference task and of a user's own task, on exported and on PyTorch folders, and the eval.json
and held-out set the bundle builder reads."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet.bundles import build_bundle, verify_bundle
from protocol.errors import ConfigError
from protocol.evalset import parse_items
from protocol.manifest import EvalMetrics, HeldoutSet, RegexMatch, SmokePrompt
from protocol.trust import Keyring, generate_keypair
from trainer.cli import app
from trainer.dataset import DataError, Row, Template, load_rows, reference_rows, split_rows
from trainer.evaluate import (
    EVAL_FILE, HELDOUT_FILE, HELDOUT_PER_LABEL, HELDOUT_UNLABELLED, LOOSE_EXPECT, Scorer, bytes_on_disk, compare,
    evaluate, evaluate_task, heldout_items, load_task, write_eval,
)
from trainer.task import load_split

pytest.importorskip("onnxruntime_genai")


def test_eval_json_has_sane_metrics_and_smoke_prompts(tiny_int4: Path) -> None:
    result = json.loads((tiny_int4 / EVAL_FILE).read_text())
    assert result["dataset"] == "slmops-triage-v1/test"
    metrics = EvalMetrics(dataset=result["dataset"], metrics=result["metrics"]).metrics
    for key in ("label_accuracy", "format_rate", "exact_match"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["samples"] == 300
    assert metrics["format_rate"] >= 0.95
    assert metrics["label_accuracy"] >= 0.6  # majority class alone gives 0.4
    assert metrics["exact_match"] <= metrics["label_accuracy"]
    assert metrics["latency_ms_mean"] > 0 and metrics["tokens_per_s"] > 0

    test_prompts = {row["prompt"] for row in load_split("test")}
    assert len(result["smoke"]) == 2
    for smoke in result["smoke"]:
        checked = SmokePrompt(**smoke)
        assert checked.prompt in test_prompts
        assert re.search(checked.expect, "fault: stop pump-1") and not re.search(checked.expect, "stop pump-1")


def test_heldout_set_is_a_small_balanced_slice_of_the_test_split_named_in_eval_json(tiny_int4: Path) -> None:
    result = json.loads((tiny_int4 / EVAL_FILE).read_text())
    spec = HeldoutSet(**result["heldout"])
    assert spec.file == HELDOUT_FILE and spec.metric in result["metrics"]  # the trainer's measure of the same name
    assert spec.min_score is None  # by default the devices only report the score
    data = (tiny_int4 / spec.file).read_bytes()
    assert len(data) < 8 * 1024
    items = parse_items(data)
    test = {row["prompt"]: row["label"] for row in load_split("test")}
    train = {row["prompt"] for row in load_split("train")}
    assert Counter(i.expected for i in items) == {label: HELDOUT_PER_LABEL for label in ("ok", "warning", "fault")}
    for item in items:
        assert test[item.prompt] == item.expected and item.prompt not in train and item.match is None


def test_heldout_set_never_comes_from_the_training_split() -> None:
    with pytest.raises(ConfigError, match="training split"):
        heldout_items("train")
    val = load_split("val")
    picked = heldout_items("val", per_label=2)
    first_two = [r for r in val if sum(q["label"] == r["label"] for q in val[: val.index(r) + 1]) <= 2]
    assert picked == [{"prompt": r["prompt"], "expected": r["label"]} for r in first_two] and len(picked) == 6


def test_heldout_min_score_is_written_when_asked(tiny_int4: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_int4, copy)
    shutil.rmtree(copy / "eval")
    written = write_eval(copy, limit=2, heldout_min_score=0.7)
    assert written["heldout"]["min_score"] == 0.7 and (copy / HELDOUT_FILE).is_file()
    assert json.loads((copy / EVAL_FILE).read_text())["heldout"] == written["heldout"]


def test_limit_and_split(tiny_int4: Path, tmp_path: Path) -> None:
    metrics = evaluate(tiny_int4, split="val", limit=7)
    assert metrics["samples"] == 7
    copy = tmp_path / "model"
    shutil.copytree(tiny_int4, copy)
    written = write_eval(copy, limit=3)
    assert json.loads((copy / EVAL_FILE).read_text()) == written
    assert written["metrics"]["samples"] == 3


def test_folder_without_genai_config_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="genai_config.json"):
        evaluate(tmp_path)


# ---- a user's own task: any JSONL, scored on its held-out split, on an exported and on a PyTorch folder ----------

USER_REGEX = r"^(\w+):"  # the user's rule: the word before the first colon is the label
CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"  # a text template instead of the chat one
TEST_SHARE = 0.5
COST_METRICS = ("perplexity", "ttft_ms_mean", "ttft_ms_p50", "tokens_per_s", "decode_tokens_per_s", "latency_ms_mean",
                "peak_rss_mb", "bytes_on_disk")


def _user_rows(labelled: bool = True) -> list[Row]:
    """80 rows of a task file that is not the shipped one: validation lines of the triage task (never the tiny model's
    training rows), every other one written as a chat conversation, labels optional."""
    rows = reference_rows("val")[:80]
    return [Row(r.messages, r.answer, r.label if labelled else None) for r in rows]


def _write_task(path: Path, rows: list[Row], system: str | None = None) -> Path:
    """Rows as a task file, every other one in the chat form (with a system message first when `system` is given)."""
    lines = []
    for i, row in enumerate(rows):
        doc = row.to_json()
        if i % 2:  # the chat form: the answer is the assistant's last message
            head = [{"role": "system", "content": system}] if system else []
            doc = {"messages": [*head, {"role": "user", "content": row.prompt},
                                {"role": "assistant", "content": row.answer}],
                   **({"label": row.label} if row.label else {})}
        lines.append(json.dumps(doc))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_task(tmp_path_factory.mktemp("task") / "pump logs v2.jsonl", _user_rows())


def _finite(metrics: dict[str, float]) -> bool:
    return all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in metrics.values())


def test_user_task_scores_the_held_out_split_of_the_file(task_file: Path, tiny_hf: Path) -> None:
    task = load_task(task_file, test=TEST_SHARE, label_regex=USER_REGEX)
    held = split_rows(load_rows(task_file), val=0.1, test=TEST_SHARE)
    assert task.dataset == "pump-logs-v2/test" and list(task.rows) == held["test"] and task.rows
    assert not {r.key() for r in task.rows} & {r.key() for r in held["train"]}
    assert task.scorer == Scorer(RegexMatch(regex=USER_REGEX)) and not task.reference
    assert load_task(task_file, whole_file=True, label_regex=USER_REGEX).rows == tuple(load_rows(task_file))
    default = load_task()
    assert (default.dataset, default.reference, len(default.rows)) == ("slmops-triage-v1/test", True, 300)
    # the text template renders what the model's chat template renders, so the scores below are the model's own
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    assert all(Template(CHATML).render(tokenizer, r) == Template().render(tokenizer, r) for r in task.rows[:4])


def test_user_task_on_int4_and_pytorch_side_by_side(task_file: Path, tiny_int4: Path, tiny_hf: Path,
                                                    tmp_path: Path) -> None:
    model = tmp_path / "int4"
    shutil.copytree(tiny_int4, model)
    shutil.rmtree(model / "eval")
    (model / EVAL_FILE).unlink()
    out = tmp_path / "figures.json"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(model), "--model", str(tiny_hf), "--data", str(task_file), "--test-fraction",
        str(TEST_SHARE), "--label-regex", USER_REGEX, "--template", CHATML, "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "int4 (onnx)" in result.output and "hf (hf)" in result.output and "perplexity" in result.output
    doc = json.loads(out.read_text())
    task = load_task(task_file, test=TEST_SHARE, label_regex=USER_REGEX)
    assert doc["dataset"] == task.dataset
    onnx, hf = (m["metrics"] for m in doc["models"])
    assert [m["backend"] for m in doc["models"]] == ["onnx", "hf"]
    for metrics in (onnx, hf):
        assert _finite(metrics) and metrics["samples"] == len(task.rows)
        for name in ("label_accuracy", "format_rate", "exact_match", *COST_METRICS):
            assert name in metrics and metrics[name] >= 0, name
        assert metrics["label_accuracy"] >= 0.6  # majority class alone gives about 0.4
        assert metrics["exact_match"] <= metrics["label_accuracy"] <= metrics["format_rate"]
        assert 1.0 < metrics["perplexity"] < 3.0  # the answers are what the model was trained to say
        assert metrics["decode_tokens_per_s"] > 0 and metrics["ttft_ms_p50"] > 0 and metrics["peak_rss_mb"] > 20
    # the same model in two precisions: the same answers nearly always, the same perplexity within a few percent
    assert abs(onnx["label_accuracy"] - hf["label_accuracy"]) <= 0.15
    assert abs(onnx["perplexity"] / hf["perplexity"] - 1) < 0.05
    assert onnx["bytes_on_disk"] == bytes_on_disk(model) < hf["bytes_on_disk"] == bytes_on_disk(tiny_hf)
    assert hf["peak_rss_mb"] > onnx["peak_rss_mb"]  # torch weighs more than onnxruntime-genai, in their own process
    # eval.json went into the exported folder only, with the very figures the table showed
    written = json.loads((model / EVAL_FILE).read_text())
    assert written["metrics"] == onnx and written["dataset"] == task.dataset
    assert not (tiny_hf / EVAL_FILE).exists()


def test_a_model_that_answers_wrongly_scores_lower(tiny_int4: Path) -> None:
    rows = [r for r in load_task(split="val").rows][:30]
    swap = {"ok": "fault", "fault": "ok", "warning": "warning"}
    wrong = [Row(r.messages, swap[r.label] + r.answer[len(r.label):], swap[r.label]) for r in rows]
    scorer = Scorer(RegexMatch(regex=USER_REGEX))
    right = evaluate_task(tiny_int4, rows, scorer=scorer, perplexity_rows=10, isolate=False, progress=False).metrics
    swapped = evaluate_task(tiny_int4, wrong, scorer=scorer, perplexity_rows=10, isolate=False, progress=False).metrics
    unchanged = sum(r.label == "warning" for r in rows) / len(rows)
    assert right["label_accuracy"] >= 0.6
    assert swapped["label_accuracy"] <= unchanged + 0.1 < right["label_accuracy"]
    assert swapped["exact_match"] <= swapped["label_accuracy"] and swapped["perplexity"] > 2 * right["perplexity"]
    assert "peak_rss_mb" not in right  # measured only in a process of its own


@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "no_labels"])
def test_user_held_out_set_round_trips_through_the_bundle_builder(tiny_int4: Path, tmp_path: Path,
                                                                  labelled: bool) -> None:
    data = _write_task(tmp_path / "task.jsonl", _user_rows(labelled), system="You triage device logs.")
    task = load_task(data, test=TEST_SHARE, label_regex=USER_REGEX if labelled else None)
    model = tmp_path / "int4"
    shutil.copytree(tiny_int4, model)
    written = write_eval(model, task=task, limit=4, perplexity_rows=2, heldout_min_score=0.5)
    key = generate_keypair()
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    built = build_bundle(model, tmp_path / "b.bundle", name="user-task", version=1, signers=[key], now=now)
    manifest = verify_bundle(tmp_path / "b.bundle", Keyring(keys=(key.public,)), now=now)
    assert manifest == built and manifest.eval.dataset == task.dataset == "task/test"
    assert manifest.eval.metrics == written["metrics"] and manifest.eval.metrics["samples"] == 4
    with tarfile.open(tmp_path / "b.bundle") as tar:
        items = parse_items(tar.extractfile("model/" + HELDOUT_FILE).read())
    train = {r.prompt for r in split_rows(load_rows(data), val=0.1, test=TEST_SHARE)["train"]}
    held = {r.prompt: r for r in task.rows}
    assert items and not {i.chat()[-1]["content"] for i in items} & train
    spec = manifest.eval.heldout
    assert spec is not None and spec.min_score == 0.5
    for item in items:
        row = held[item.chat()[-1]["content"]]
        assert item.expected == (row.label if labelled else row.answer)
    if labelled:
        assert (spec.metric, spec.match) == ("label_accuracy", RegexMatch(regex=USER_REGEX))
        assert max(Counter(i.expected for i in items).values()) <= HELDOUT_PER_LABEL
        assert len({i.expected for i in items}) == 3 and "label_accuracy" in written["metrics"]
        assert [p.expect for p in manifest.health.prompts] == [USER_REGEX, USER_REGEX]
        assert len({held[p.prompt].label for p in manifest.health.prompts}) == 2  # two different labels
    else:
        assert (spec.metric, spec.match) == ("exact_match", "exact") and spec.metric in written["metrics"]
        assert len(items) == min(HELDOUT_UNLABELLED, len(task.rows))
        assert "label_accuracy" not in written["metrics"] and "format_rate" not in written["metrics"]
        assert [p.prompt for p in manifest.health.prompts] == [r.prompt for r in task.rows[:2]]
        assert {p.expect for p in manifest.health.prompts} == {LOOSE_EXPECT}
    # conversations stay conversations on the device, with their system message
    assert any(i.messages is not None and i.chat()[0]["role"] == "system" for i in items)
    assert any(i.prompt is not None for i in items)


def test_reference_default_keeps_its_metrics_and_adds_the_cost_figures(tiny_int4: Path) -> None:
    metrics = json.loads((tiny_int4 / EVAL_FILE).read_text())["metrics"]
    assert {"label_accuracy", "format_rate", "exact_match", "latency_ms_mean", "tokens_per_s", "samples"} <= set(metrics)
    assert set(COST_METRICS) <= set(metrics) and _finite(metrics)
    assert metrics["perplexity_rows"] == 50 and metrics["perplexity"] > 1


def _bad_line(tmp: Path) -> Path:
    path = _write_task(tmp / "task.jsonl", _user_rows()[:10])
    path.write_text(path.read_text() + '{"prompt": "x", "answer": "ok: y", "label": "not/a label!"}\n')
    return path


def _neither(tmp: Path) -> Path:
    (tmp / "notamodel").mkdir()
    (tmp / "notamodel" / "weights.bin").write_bytes(b"\0" * 16)
    return tmp / "notamodel"


# (id, model folder from (tmp, exported copy, PyTorch folder), task from (tmp), write_eval options, error, message)
REFUSALS = [
    ("missing_model", lambda tmp, m, hf: tmp / "nowhere", lambda tmp: load_task(split="val"), {}, ConfigError,
     "does not exist"),
    ("neither_kind_of_folder", lambda tmp, m, hf: _neither(tmp), lambda tmp: load_task(split="val"), {}, ConfigError,
     "neither an onnxruntime-genai folder"),
    ("pytorch_folder_gets_no_eval_json", lambda tmp, m, hf: hf, lambda tmp: load_task(split="val"), {},
     ConfigError, "is an hf model folder, not onnx"),
    ("data_file_with_a_bad_line", lambda tmp, m, hf: m, lambda tmp: load_task(_bad_line(tmp)), {}, DataError,
     "line 11: .*label"),
    ("label_regex_does_not_compile", lambda tmp, m, hf: m, lambda tmp: load_task(label_regex="^(ok|warning"), {},
     ConfigError, "does not compile"),
    ("label_regex_catastrophic_repeat", lambda tmp, m, hf: m, lambda tmp: load_task(label_regex="(a{4294967296})"), {},
     ConfigError, "does not compile"),
    ("label_regex_too_long", lambda tmp, m, hf: m, lambda tmp: load_task(label_regex="(" + "a" * 300 + ")"), {},
     ConfigError, "at most 256 chars"),
    ("label_rule_misreads_the_answers", lambda tmp, m, hf: m, lambda tmp: load_task(exact=True), {}, ConfigError,
     "reads the label out of 0 of 300"),
    ("limit_zero", lambda tmp, m, hf: m, lambda tmp: load_task(split="val"), {"limit": 0}, ConfigError,
     "at least 1 row"),
    ("training_split", lambda tmp, m, hf: m, lambda tmp: load_task(split="train"), {}, ConfigError, "never on training"),
    ("held_out_score_out_of_range", lambda tmp, m, hf: m, lambda tmp: load_task(split="val"),
     {"heldout_min_score": 1.5}, ConfigError, "0 to 1"),
]


@pytest.mark.parametrize("folder, make_task, options, error, reason", [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refusals_leave_eval_json_as_it_was(tiny_int4: Path, tiny_hf: Path, tmp_path: Path, folder, make_task,
                                            options, error, reason) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_int4, model)
    target = folder(tmp_path, model, tiny_hf)
    before = {p: p.read_bytes() for p in [target / EVAL_FILE, target / HELDOUT_FILE] if p.is_file()}
    listing = sorted(target.rglob("*")) if target.is_dir() else None
    with pytest.raises(error, match=reason):
        write_eval(target, task=make_task(tmp_path), **options)
    assert {p: p.read_bytes() for p in [target / EVAL_FILE, target / HELDOUT_FILE] if p.is_file()} == before
    assert (sorted(target.rglob("*")) if target.is_dir() else None) == listing


def test_cli_refusal_is_one_red_line_and_exit_2(tiny_int4: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_int4, model)
    before = (model / EVAL_FILE).read_bytes()
    out = tmp_path / "x.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--label-regex", "(", "--json", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: label regex '(' is not usable")
    assert (model / EVAL_FILE).read_bytes() == before and not out.exists()


def test_compare_refuses_a_bad_folder_before_evaluating_any(tiny_int4: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither an onnxruntime-genai folder"):
        compare([tiny_int4, _neither(tmp_path)], load_task().rows, limit=1)
    with pytest.raises(ConfigError, match="at least one model"):
        compare([], load_task().rows)
