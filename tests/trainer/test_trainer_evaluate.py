"""Evaluation with onnxruntime-genai and the eval.json the bundle builder reads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from protocol.errors import ConfigError
from protocol.manifest import EvalMetrics, SmokePrompt
from trainer.evaluate import EVAL_FILE, evaluate, write_eval
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
