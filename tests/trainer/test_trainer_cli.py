"""The trainer command line: light to import, typed errors as exit code 2, eval prints and writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from trainer.cli import app

runner = CliRunner()


def test_import_stays_light() -> None:
    code = (
        "import sys, trainer.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime_genai', 'tokenizers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_of_a_missing_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: model folder {tmp_path / 'nowhere'} does not exist"]


def test_eval_writes_eval_json_and_prints_a_table(tiny_int4: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_int4, model)
    (model / "eval.json").unlink()
    result = runner.invoke(app, ["eval", "--model", str(model), "--limit", "4"])
    assert result.exit_code == 0, result.output
    assert "label_accuracy" in result.output
    assert json.loads((model / "eval.json").read_text())["metrics"]["samples"] == 4
    assert json.loads((model / "eval.json").read_text())["heldout"]["min_score"] is None
    result = runner.invoke(app, ["eval", "--model", str(model), "--limit", "1", "--heldout-min-score", "0.6"])
    assert result.exit_code == 0, result.output
    assert json.loads((model / "eval.json").read_text())["heldout"]["min_score"] == 0.6


def test_tiny_builds_the_teacher_shape_and_a_corpus_only_base(tmp_path: Path) -> None:
    done = runner.invoke(app, ["tiny", "--out", str(tmp_path / "t"), "--steps", "1", "--shape", "teacher",
                               "--corpus-only"])
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (256, 6)
    done = runner.invoke(app, ["tiny", "--out", str(tmp_path / "x"), "--shape", "huge"])
    assert done.exit_code == 2 and not (tmp_path / "x").exists()
