"""Evaluation with onnxruntime-genai and the eval.json the bundle builder reads."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from protocol.errors import ConfigError
from protocol.evalset import parse_items
from protocol.manifest import EvalMetrics, HeldoutSet, SmokePrompt
from trainer.evaluate import EVAL_FILE, HELDOUT_FILE, HELDOUT_PER_LABEL, evaluate, heldout_items, write_eval
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
