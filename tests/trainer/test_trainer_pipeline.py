"""`slmops train pipeline`: the recipe file (refusals one row per case), step reuse and the same bytes again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet.bundles import verify_bundle
from protocol.errors import ConfigError
from protocol.trust import Keyring, PrivateKey, generate_keypair
from slmops.pipeline import run_file
from trainer.pipeline import TIMING_RE, load_config

GOOD = """
work_dir = "work"
[base]
tiny = {steps = 4}
[eval]
limit = 6
[bundle]
name = "triage"
version = 3
out = "dist/triage.bundle"
keys = ["k.pem"]
created = 2026-11-01T00:00:00Z
"""

REFUSED = {
    "unknown table": (GOOD + "[extra]\nx = 1\n", ".toml", "extra"),
    "unknown key": (GOOD.replace("limit = 6", "limit = 6\nlimt = 7"), ".toml", "limt"),
    "two bases": (GOOD.replace("tiny = {steps = 4}", 'tiny = {steps = 4}\npath = "/x"'), ".toml", "exactly one"),
    "no base": (GOOD.replace("[base]\ntiny = {steps = 4}\n", ""), ".toml", "base"),
    "bad bundle name": (GOOD.replace('name = "triage"', 'name = "../etc"'), ".toml", "name"),
    "version zero": (GOOD.replace("version = 3", "version = 0"), ".toml", "version"),
    "negative steps": (GOOD.replace("steps = 4", "steps = -1"), ".toml", "steps"),
    "unknown precision": (GOOD + '[export]\nprecision = "int3"\n', ".toml", "precision"),
    "upload to a non-http url": (GOOD + '[upload]\nurl = "file:///etc/passwd"\n', ".toml", "url"),
    "token env with a space": (GOOD + '[upload]\nurl = "http://f:1"\ntoken_env = "A B"\n', ".toml", "token_env"),
    "a path with a NUL": (GOOD.replace('out = "dist/triage.bundle"', 'out = "dist/\\u0000.bundle"'), ".toml",
                          "control characters"),
    "nested past the parser's depth": ("x = " + "[" * 5000 + "]" * 5000 + "\n", ".toml", "too deeply"),
    "broken toml": ("[base\n", ".toml", "not valid TOML"),
    "broken yaml": ("base: [\n", ".yaml", "not valid YAML"),
    "yaml list at the top": ("- 1\n", ".yaml", "top level"),
    "unknown suffix": (GOOD, ".ini", ".toml, .yaml or .yml"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_recipe_is_refused_and_nothing_is_built(tmp_path: Path, case: str) -> None:
    text, suffix, needle = REFUSED[case]
    path = tmp_path / f"recipe{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        run_file(path, progress=False)
    assert needle.lower() in str(err.value).lower(), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no work folder, no bundle


def test_yaml_and_toml_say_the_same_and_paths_are_taken_from_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    toml = tmp_path / "sub" / "r.toml"
    toml.write_text(GOOD)
    yaml = tmp_path / "sub" / "r.yml"
    yaml.write_text("work_dir: work\nbase: {tiny: {steps: 4}}\neval: {limit: 6}\n"
                    "bundle: {name: triage, version: 3, out: dist/triage.bundle, keys: [k.pem], "
                    "created: 2026-11-01T00:00:00Z}\n")
    a, b = load_config(toml), load_config(yaml)
    assert a == b
    assert a.work_dir == tmp_path / "sub" / "work" and a.bundle.keys == (tmp_path / "sub" / "k.pem",)


def _recipe(folder: Path, key: PrivateKey) -> Path:
    folder.mkdir(parents=True)
    (folder / "k.pem").write_bytes(key.to_pem())
    (folder / "recipe.toml").write_text(GOOD)
    return folder / "recipe.toml"


@pytest.mark.slow
def test_a_recipe_ends_in_a_signed_bundle_and_the_same_inputs_give_the_same_bytes(tmp_path: Path) -> None:
    key = generate_keypair()
    first = run_file(_recipe(tmp_path / "a", key), progress=False)
    assert [s.name for s in first.steps] == ["base", "export", "eval", "packed"]
    assert not any(s.reused for s in first.steps)
    ring = Keyring((key.public,), threshold=1)
    manifest = verify_bundle(first.bundle, ring, now=first_created())
    assert manifest.name == "triage" and manifest.version == 3
    assert set(manifest.eval.metrics) == set(first.manifest_metrics)
    assert "label_accuracy" in manifest.eval.metrics and "tokens_per_s" in first.metrics
    assert not any(TIMING_RE.fullmatch(m) for m in manifest.eval.metrics)  # measured speeds stay in the report
    assert manifest.eval.heldout is not None
    report = json.loads((tmp_path / "a" / "work" / "report.json").read_text())
    assert report["sha256"] == first.sha256 and report["reproducible"] is True

    again = run_file(tmp_path / "a" / "recipe.toml", progress=False)  # everything reused, same file
    assert all(s.reused for s in again.steps) and again.sha256 == first.sha256

    elsewhere = run_file(_recipe(tmp_path / "b", key), progress=False)  # a fresh work folder: built again
    assert not any(s.reused for s in elsewhere.steps)
    assert elsewhere.sha256 == first.sha256
    assert (tmp_path / "b" / "dist" / "triage.bundle").read_bytes() == first.bundle.read_bytes()


def first_created():
    from datetime import datetime, timezone

    return datetime(2026, 11, 2, tzinfo=timezone.utc)


def _over(tmp_path: Path, tiny_hf: Path, extra: str = "", *, signed: bool = True) -> tuple[Path, PrivateKey]:
    """A recipe in tmp_path/r over the cached tiny model (no training step), signed by a fresh key unless not."""
    key = generate_keypair()
    folder = tmp_path / "r"
    folder.mkdir()
    text = GOOD.replace("tiny = {steps = 4}", f'path = "{tiny_hf}"')
    if signed:
        (folder / "k.pem").write_bytes(key.to_pem())
    else:
        text = text.replace('keys = ["k.pem"]\n', "")
    (folder / "recipe.toml").write_text(text + extra)
    return folder / "recipe.toml", key


def test_a_changed_setting_rebuilds_only_the_steps_after_it(tmp_path: Path, tiny_hf: Path) -> None:
    recipe, _ = _over(tmp_path, tiny_hf)
    first = run_file(recipe, progress=False)
    assert [s.name for s in first.steps] == ["export", "eval", "packed"]
    recipe.write_text(recipe.read_text().replace("limit = 6", "limit = 8"))
    second = run_file(recipe, progress=False)
    assert [s.reused for s in second.steps] == [True, False, False]
    assert second.metrics["samples"] == 8.0 and first.metrics["samples"] == 6.0
    recipe.write_text(recipe.read_text().replace("version = 3", "version = 4"))
    third = run_file(recipe, progress=False)  # only the bundle changes
    assert all(s.reused for s in third.steps) and third.sha256 != second.sha256


def test_without_a_creation_time_the_run_says_it_is_not_reproducible(tmp_path: Path, tiny_hf: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    recipe, _ = _over(tmp_path, tiny_hf, signed=False)
    recipe.write_text(recipe.read_text().replace("created = 2026-11-01T00:00:00Z\n", ""))
    assert run_file(recipe, progress=False).reproducible is False
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1790000000")
    result = run_file(recipe, progress=False)
    assert result.reproducible is True


def test_the_cli_runs_a_recipe_and_fails_with_one_line(tmp_path: Path, tiny_hf: Path) -> None:
    from slmops.cli import build_app

    recipe, _ = _over(tmp_path, tiny_hf)
    folder = recipe.parent
    args = ["train", "pipeline", str(recipe)]
    done = CliRunner().invoke(build_app(args), args)
    assert done.exit_code == 0, done.output
    assert "triage.bundle" in done.output and (folder / "dist" / "triage.bundle").is_file()
    recipe.write_text("[base\n")
    done = CliRunner().invoke(build_app(args), args)
    assert done.exit_code == 2 and "not valid TOML" in done.output
    assert os.path.exists(folder / "dist" / "triage.bundle")  # the earlier bundle is untouched


@pytest.mark.slow
def test_a_recipe_with_a_lora_step_on_the_users_own_rows(tmp_path: Path, tiny_hf: Path) -> None:
    from trainer.dataset import reference_rows, write_rows

    recipe, _ = _over(tmp_path, tiny_hf, '[data]\ntrain = "task.jsonl"\nlabel_regex = "^(ok|warning|fault): "\n'
                      '[finetune]\nmethod = "lora"\nrank = 4\nsteps = 3\nbatch_size = 4\neval_every = 0\n',
                      signed=False)
    folder = recipe.parent
    write_rows(folder / "task.jsonl", reference_rows("train")[:120])
    result = run_file(recipe, progress=False)
    assert [s.name for s in result.steps] == ["finetune", "export", "eval", "packed"]
    done = json.loads((result.steps[0].output / "finetune.json").read_text())
    assert done["data"]["train_rows"] + done["data"]["val_rows"] < 120  # the recipe's test share never reaches training
    assert (result.steps[0].output / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(folder.joinpath("work").glob("*.checkpoint"))
    report = json.loads((result.steps[2].output / "eval.json").read_text())
    assert report["dataset"] == "task/test" and 0 < report["metrics"]["samples"] < 120
    assert report["heldout"]["match"] == {"regex": "^(ok|warning|fault): "}
    again = run_file(recipe, progress=False)
    assert all(s.reused for s in again.steps) and again.sha256 == result.sha256


@pytest.mark.slow
def test_a_recipe_distils_a_teacher_it_trains_into_a_student_that_never_saw_a_label(tmp_path: Path) -> None:
    from trainer.dataset import reference_rows, write_rows

    folder = tmp_path / "r"
    folder.mkdir()
    write_rows(folder / "prompts.jsonl", reference_rows("train")[:24])
    recipe = folder / "recipe.toml"
    recipe.write_text(GOOD.replace("tiny = {steps = 4}", "tiny = {steps = 2, task = false}").replace(
        'keys = ["k.pem"]\n', "") + """
[distill]
teacher = {tiny = {steps = 2, shape = "teacher"}}
prompts = "prompts.jsonl"
max_new_tokens = 12
steps = 2
batch_size = 4
""")
    result = run_file(recipe, progress=False)
    assert [s.name for s in result.steps] == ["base", "teacher", "distill", "export", "eval", "packed"]
    synthetic = (result.steps[2].output / "synthetic.jsonl").read_text().splitlines()
    truth = {r.prompt: r.answer for r in reference_rows("train")[:24]}
    rows = [json.loads(line) for line in synthetic]
    assert len(rows) == 24 and all(r["prompt"] in truth for r in rows)
    assert sum(r["answer"] == truth[r["prompt"]] for r in rows) < 24  # the teacher's words, not the labels
    assert len(list((folder / "work").glob("answers-*.jsonl"))) == 1  # stage 1, kept for the next distil step
    assert all(s.reused for s in run_file(recipe, progress=False).steps)
    logits = folder / "logits.toml"  # another mode asks the teacher nothing new
    logits.write_text(recipe.read_text().replace('prompts = "prompts.jsonl"', 'prompts = "prompts.jsonl"\nmode = "logits"'))
    steps = run_file(logits, progress=False).steps
    assert [s.reused for s in steps][:3] == [True, True, False]
    assert len(list((folder / "work").glob("answers-*.jsonl"))) == 1
    assert (steps[2].output / "synthetic.jsonl").read_bytes() == (result.steps[2].output / "synthetic.jsonl").read_bytes()
    teacher = folder / "teacher.toml"  # the same tiny settings as a base: the teacher already trained is reused
    teacher.write_text(GOOD.replace("tiny = {steps = 4}", 'tiny = {steps = 2, shape = "teacher"}').replace(
        'keys = ["k.pem"]\n', "").replace("triage.bundle", "teacher.bundle"))
    base = run_file(teacher, progress=False).steps[0]
    assert base.reused and base.output == result.steps[1].output


def test_the_manifest_names_the_precision_the_recipe_exported(tmp_path: Path, tiny_hf: Path) -> None:
    recipe, key = _over(tmp_path, tiny_hf, '[export]\nprecision = "int8"\n')
    result = run_file(recipe, progress=False)
    manifest = verify_bundle(result.bundle, Keyring((key.public,)), now=first_created())
    assert (manifest.target.precision, manifest.target.execution_provider) == ("int8", "cpu")


@pytest.mark.parametrize("name", ["teacher", "student-distilled", "lora"])
def test_the_shipped_reference_recipes_parse_and_name_files_that_exist(name: str) -> None:
    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "recipes" / "reference" / f"{name}.toml")
    assert config.work_dir == root / ".cache" / "recipes"
    if config.distill is not None and config.distill.prompts is not None:
        assert config.distill.prompts.is_file()
