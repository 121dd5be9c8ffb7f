"""Fine-tuning the tiny model: refusals leave nothing behind; LoRA and full runs learn, write, export and answer."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protocol.errors import ConfigError
from trainer.dataset import Row, reference_rows, write_rows
from trainer.finetune import RESULT_FILE, FinetuneConfig, finetune
from trainer.loop import TrainConfig

pytest_plugins = ["tests.fixtures_models"]

LABEL_ONLY = "{label}"  # a new answer format: the tiny base answers "<label>: <action>"


def _rows(n: int = 120) -> list[Row]:
    """Triage prompts answered in a new format: the label alone."""
    return [dataclasses.replace(r, answer=LABEL_ONLY.format(label=r.label)) for r in reference_rows("val")[:n]]


QUICK = TrainConfig(max_steps=16, batch_size=8, lr=3e-3, eval_every=8, seed=0)
LORA = FinetuneConfig(rank=4, alpha=8, train=QUICK)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "task.jsonl", _rows())


def _refusal_cases() -> dict[str, tuple]:
    return {
        "missing base": (lambda tiny, d, tmp: (tmp / "nowhere", d, LORA), "not a folder"),
        "base is a file": (lambda tiny, d, tmp: (d, d, LORA), "not a folder"),
        "base without config": (lambda tiny, d, tmp: (tmp, d, LORA), "not a Hugging Face model folder"),
        "qlora on cpu": (lambda tiny, d, tmp: (tiny, d, dataclasses.replace(
            LORA, method="qlora", train=dataclasses.replace(QUICK, device="cpu"))), "QLoRA needs a CUDA device"),
        "bad data line": (lambda tiny, d, tmp: (tiny, _bad_data(tmp), LORA), "line 2"),
        "template without prompt": (lambda tiny, d, tmp: (tiny, d, FinetuneConfig(template="Q: A:")), "{prompt}"),
        "unknown method": (lambda tiny, d, tmp: (tiny, d, FinetuneConfig(method="dora")), "method must be"),
        "bad target module": (lambda tiny, d, tmp: (tiny, d, FinetuneConfig(target_modules=("q_proj;rm",))),
                              "target modules"),
        "olive with early stopping": (lambda tiny, d, tmp: (tiny, d, FinetuneConfig(
            engine="olive", train=dataclasses.replace(QUICK, patience=2))), "olive"),
    }


def _bad_data(tmp: Path) -> Path:
    path = tmp / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n" + '{"prompt": 5}\n')
    return path


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_a_refused_run_writes_nothing(case: str, tiny_hf: Path, data: Path, tmp_path: Path) -> None:
    build, needle = _refusal_cases()[case]
    out = tmp_path / "runs" / "out"
    with pytest.raises(ConfigError) as err:
        base, rows, cfg = build(tiny_hf, data, tmp_path)
        finetune(base, rows, out, cfg, progress=False)
    assert needle in str(err.value), str(err.value)
    assert not (tmp_path / "runs").exists()  # neither out nor a temporary sibling was made


def test_a_non_empty_out_is_refused_and_left_as_it_was(tiny_hf: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        finetune(tiny_hf, data, out, LORA, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_lora_learns_writes_a_small_adapter_and_a_merged_model_that_exports_and_answers(
        tiny_hf: Path, data: Path, tmp_path: Path) -> None:
    from trainer.evaluate import chat_prompt, generate, load
    from trainer.export import export

    out = tmp_path / "ft"
    result = finetune(tiny_hf, data, out, LORA, progress=False)
    history = [h["val_loss"] for h in result.train.history]
    assert [h["step"] for h in result.train.history] == [0, 8, 16]
    assert result.train.val_loss < history[0] / 3  # the new format is learnt
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "finetune.json", "merged"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert 0 < result.adapter_bytes < 0.05 * result.base_bytes  # rank 4 on every linear layer
    assert result.adapter_bytes == (out / "adapter" / "adapter_model.safetensors").stat().st_size
    assert not (tmp_path / "ft.checkpoint").exists() and not list(tmp_path.glob(".ft.partial-*"))
    record = json.loads((out / RESULT_FILE).read_text())
    assert record["data"]["train_rows"] + record["data"]["val_rows"] == 120 and result.val_rows > 0
    assert record["result"]["val_loss"] == result.train.val_loss and len(record["data"]["sha256"]) == 64
    assert record["config"]["method"] == "lora" and record["params"]["trainable"] == result.trainable_params

    onnx = export(out / "merged", tmp_path / "int4", precision="int4")
    model, tokenizer = load(onnx)
    rows = _rows()[:8]
    answers = [generate(model, tokenizer, chat_prompt(tokenizer, r.prompt), max_new_tokens=8).text for r in rows]
    assert all(a in ("ok", "warning", "fault") for a in answers), answers  # the label alone, then the end
    assert sum(a == r.label for a, r in zip(answers, rows, strict=True)) >= 6, answers


def test_full_fine_tune_writes_a_merged_model_only(tiny_hf: Path, data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = FinetuneConfig(method="full", train=dataclasses.replace(QUICK, lr=5e-4, max_steps=8, eval_every=0))
    result = finetune(tiny_hf, data, tmp_path / "full", cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["finetune.json", "merged"]
    assert result.adapter is None and result.trainable_params == result.total_params
    assert result.train.val_loss < result.train.history[0]["val_loss"]
    before, after = load_file(tiny_hf / "model.safetensors"), load_file(tmp_path / "full" / "merged" /
                                                                         "model.safetensors")
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before)


def test_a_leftover_checkpoint_needs_resume_and_resume_needs_a_checkpoint(
        tiny_hf: Path, data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(ConfigError, match="no checkpoint"):
        finetune(tiny_hf, data, tmp_path / "a", LORA, checkpoint_dir=ckpt, resume=True, progress=False)
    cfg = dataclasses.replace(LORA, train=dataclasses.replace(QUICK, max_steps=4, eval_every=2))
    finetune(tiny_hf, data, tmp_path / "a", cfg, checkpoint_dir=ckpt, progress=False)
    assert (ckpt / "state.pt").is_file()  # a checkpoint folder the caller named is kept
    with pytest.raises(ConfigError, match="left a checkpoint"):
        finetune(tiny_hf, data, tmp_path / "b", cfg, checkpoint_dir=ckpt, progress=False)
    assert not (tmp_path / "b").exists()
    resumed = finetune(tiny_hf, data, tmp_path / "b", cfg, checkpoint_dir=ckpt, resume=True, progress=False)
    first = json.loads((tmp_path / "a" / RESULT_FILE).read_text())["result"]
    assert resumed.train.val_loss == first["val_loss"] and resumed.train.steps == 4
    a = (tmp_path / "a" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes() == a


def test_the_cli_fine_tunes_and_prints_a_table(tiny_hf: Path, data: Path, tmp_path: Path) -> None:
    from trainer.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["finetune", "--base", str(tiny_hf), "--data", str(data), "--out", str(out), "--rank", "4",
            "--alpha", "8", "--steps", "4", "--batch-size", "8", "--lr", "3e-3", "--eval-every", "2", "--no-merge",
            "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "val_loss" in result.output and "adapter" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "finetune.json"]
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and again.output.strip().splitlines() == [
        f"error: output folder {out} already exists and is not empty; remove it or pick another"]
    qlora = runner.invoke(app, [*args[:6], str(tmp_path / "q"), "--method", "qlora", "--device", "cpu"])
    assert qlora.exit_code == 2 and "QLoRA needs a CUDA device" in qlora.output
    assert not (tmp_path / "q").exists()


@pytest.mark.skipif(importlib.util.find_spec("olive") is None, reason="olive-ai is not installed (extra 'olive')")
def test_the_olive_engine_trains_an_adapter_read_back_into_the_same_layout(
        tiny_hf: Path, data: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(LORA, engine="olive", train=dataclasses.replace(QUICK, max_steps=8))
    result = finetune(tiny_hf, data, tmp_path / "olive", cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "olive").iterdir()) == ["adapter", "finetune.json", "merged"]
    config = json.loads((tmp_path / "olive" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and "down_proj" in config["target_modules"]
    assert result.train.val_loss is not None and result.train.steps == 8
    shutil.rmtree(tmp_path / "olive")
