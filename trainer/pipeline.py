"""`slmops train pipeline CONFIG`: one declarative recipe (TOML or YAML) from a base model to a signed bundle.

Workflow of `run(config, pack=...)`:
1. `load_config(path)` parses the file into a `PipelineConfig` (every table checked, unknown keys refused, paths
   relative to the file's folder);
2. each step (`base`, then `distill` and/or `finetune` when present, `export`, `eval`) gets a key: the sha256 of
   its settings, the digests of its inputs (the step before it, data files by content) and the library versions.
   Its output is `WORK/<step>-<key>`; a folder that is already there is complete (every step writes into a
   temporary sibling and renames it into place), so a rerun, or a run after a crash, skips the steps that are
   done and redoes nothing whose inputs did not change;
3. `pack(model_dir, bundle, created)` (injected: the `slmops` command wires the fleet's bundle builder, since the
   trainer never imports the fleet) writes the signed bundle; `upload()` optionally POSTs it to a fleet's HTTP
   API with a bearer token from the environment;
4. `WORK/report.json` records every step (key, seconds, reused or not) and every metric.

Same inputs, same bytes: training is seeded on one CPU thread, the export and the bundle container are
deterministic, and the manifest's `created` comes from `bundle.created` or `SOURCE_DATE_EPOCH`. Measured speeds
(latency, tokens/s, memory) differ from run to run, so they stay in the report and out of the signed manifest
unless `eval.timings_in_manifest` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from protocol.errors import ConfigError, SlmopsError
from protocol.manifest import check_name, first_error

LIBRARIES = ("slmops", "torch", "transformers", "peft", "tokenizers", "onnxruntime-genai", "onnxruntime", "onnx")
TIMING_RE = re.compile(r".*(_ms|_ms_[a-z0-9]+|_per_s|_rss_mb)")  # metric names that are measured speeds or memory
MAX_CONFIG_BYTES = 1024 * 1024
URL_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]{1,255}(/[A-Za-z0-9._~/-]{0,255})?")
ENV_RE = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")


def _full(pattern: re.Pattern[str], what: str) -> AfterValidator:
    """A validator that matches the whole value (pydantic's `pattern` also accepts a match inside it)."""

    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{what} must match {pattern.pattern} in full")
        return value

    return AfterValidator(check)


MAX_PATH_CHARS = 4096


def _local_path(value: object) -> object:
    """A path from the recipe: text of at most MAX_PATH_CHARS, no NUL or other control characters."""
    if isinstance(value, str) and (len(value) > MAX_PATH_CHARS or any(ord(c) < 32 for c in value) or not value):
        raise ValueError(f"a path is 1 to {MAX_PATH_CHARS} characters without control characters")
    return value


LocalPath = Annotated[Path, BeforeValidator(_local_path)]


def _bundle_name(value: str) -> str:
    try:
        return check_name(value)
    except SlmopsError as exc:
        raise ValueError(str(exc)) from exc


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinySpec(_Spec):
    """Train the project's tiny reference model from scratch on the shipped task."""

    steps: int = Field(default=300, ge=1, le=100_000)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    shape: Literal["tiny", "teacher"] = "tiny"  # "teacher": the reference teacher, about 5.3x the parameters
    task: bool = True  # False: corpus only, never a labelled answer (the base a distilled student starts from)


class BaseSpec(_Spec):
    """Where the model starts: a local Hugging Face folder, or the tiny reference model trained here."""

    path: LocalPath | None = None
    tiny: TinySpec | None = None

    @model_validator(mode="after")
    def _one(self) -> BaseSpec:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("[base] takes exactly one of 'path' (a local Hugging Face folder) and 'tiny'")
        return self


class DataSpec(_Spec):
    """The task: JSONL files (none: the shipped triage task) and how rows are shown to the model."""

    train: LocalPath | None = None
    test: LocalPath | None = None
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1)
    template: str = "chat"
    label_regex: str | None = None


class FinetuneSpec(_Spec):
    """`slmops train finetune` on the recipe's training rows (`trainer.finetune.FinetuneConfig`)."""

    method: Literal["lora", "qlora", "full"] = "lora"
    engine: Literal["peft", "olive"] = "peft"
    rank: int = Field(default=16, ge=1, le=1024)
    alpha: float = Field(default=32.0, gt=0, le=4096)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: str | tuple[str, ...] = "all-linear"
    steps: int | None = Field(default=None, ge=1, le=10_000_000)
    epochs: float = Field(default=1.0, gt=0, le=1000)
    batch_size: int = Field(default=8, ge=1, le=4096)
    grad_accum: int = Field(default=1, ge=1, le=4096)
    lr: float = Field(default=2e-4, gt=0, le=1)
    warmup: float = Field(default=0.05, ge=0, lt=1)
    eval_every: int = Field(default=50, ge=0)
    patience: int = Field(default=0, ge=0)
    max_tokens: int = Field(default=512, ge=8, le=1_048_576)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TeacherSpec(_Spec):
    """Who answers the prompts: a local Hugging Face folder, the tiny recipe trained here, or an OpenAI-compatible
    endpoint (an slmops agent's local API is one) with a model name."""

    path: LocalPath | None = None
    tiny: TinySpec | None = None
    url: Annotated[str, _full(URL_RE, "url")] | None = None
    model: str | None = Field(default=None, min_length=1, max_length=256)
    api_key_env: Annotated[str, _full(ENV_RE, "api_key_env")] = "SLMOPS_TEACHER_API_KEY"

    @model_validator(mode="after")
    def _one(self) -> TeacherSpec:
        if sum(x is not None for x in (self.path, self.tiny, self.url)) != 1:
            raise ValueError("[distill.teacher] takes exactly one of 'path', 'tiny' and 'url' (with 'model')")
        if self.url is not None and not self.model:
            raise ValueError("[distill.teacher] with a 'url' needs the 'model' name the endpoint serves")
        return self


class DistillSpec(_Spec):
    """`slmops train distill`: the teacher answers the prompts (stage 1), the model trains on the answers."""

    teacher: TeacherSpec
    prompts: LocalPath | None = None  # JSONL of prompts (answers ignored); none: the recipe's training rows, unanswered
    mode: Literal["text", "logits"] = "text"
    method: Literal["full", "lora"] = "full"
    kd_temperature: float = Field(default=2.0, gt=0, le=100)
    alpha: float = Field(default=0.5, ge=0, le=1)
    samples: int = Field(default=1, ge=1, le=64)
    temperature: float = Field(default=0.0, ge=0, le=10)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    rank: int = Field(default=16, ge=1, le=1024)
    steps: int | None = Field(default=None, ge=1, le=10_000_000)
    epochs: float = Field(default=1.0, gt=0, le=1000)
    batch_size: int = Field(default=8, ge=1, le=4096)
    lr: float = Field(default=1e-3, gt=0, le=1)
    eval_every: int = Field(default=0, ge=0)
    patience: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ExportSpec(_Spec):
    """`slmops train export`: precision, execution provider and the int4/int8 options (`trainer.export`)."""

    precision: Literal["int4", "int8", "fp16", "fp32"] = "int4"
    provider: Literal["cpu", "cuda"] = "cpu"
    block_size: Literal[16, 32, 64, 128, 256] = 32
    accuracy_level: int = Field(default=4, ge=0, le=4)
    keep_float: tuple[Literal["lm_head", "embeddings"], ...] = ()
    keep_int8: tuple[Literal["lm_head", "sensitive"], ...] = ()
    max_length: int = Field(default=2048, ge=16, le=1_048_576)


class EvalSpec(_Spec):
    limit: int | None = Field(default=None, ge=1)
    heldout_min_score: float | None = Field(default=None, ge=0, le=1)
    timings_in_manifest: bool = False


class BundleSpec(_Spec):
    name: Annotated[str, AfterValidator(_bundle_name)]
    version: int = Field(ge=1, le=2**63 - 1)
    out: LocalPath
    keys: tuple[LocalPath, ...] = ()
    created: datetime | None = None
    expires_days: int = Field(default=90, ge=1, le=3650)
    base_model: str = Field(default="", max_length=256)
    description: str = Field(default="", max_length=1024)


class UploadSpec(_Spec):
    url: Annotated[str, _full(URL_RE, "url")]
    token_env: Annotated[str, _full(ENV_RE, "token_env")] = "SLMOPS_TOKEN"


class PipelineConfig(_Spec):
    work_dir: LocalPath = Path(".slmops-work")
    base: BaseSpec
    data: DataSpec = DataSpec()
    distill: DistillSpec | None = None
    finetune: FinetuneSpec | None = None
    export: ExportSpec = ExportSpec()
    eval: EvalSpec = EvalSpec()
    bundle: BundleSpec
    upload: UploadSpec | None = None


def _absolute(config: PipelineConfig, root: Path) -> PipelineConfig:
    """Every relative path in the config, taken from the config file's folder."""

    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (root / p)).resolve()

    data = config.data.model_copy(update={"train": fix(config.data.train), "test": fix(config.data.test)})
    distill = config.distill
    if distill is not None:
        teacher = distill.teacher.model_copy(update={"path": fix(distill.teacher.path)})
        distill = distill.model_copy(update={"prompts": fix(distill.prompts), "teacher": teacher})
    base = config.base.model_copy(update={"path": fix(config.base.path)})
    bundle = config.bundle.model_copy(update={"out": fix(config.bundle.out),
                                              "keys": tuple(fix(k) for k in config.bundle.keys)})
    return config.model_copy(update={"work_dir": fix(config.work_dir), "data": data, "base": base, "bundle": bundle,
                                     "distill": distill})


def parse_config(text: str, *, suffix: str, root: Path) -> PipelineConfig:
    """A recipe from TOML (`.toml`) or YAML (`.yaml`, `.yml`) text; relative paths from `root`."""
    try:
        if suffix == ".toml":
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raise ConfigError(f"a pipeline file ends in .toml, .yaml or .yml, not {suffix!r}")
    except RecursionError as exc:
        raise ConfigError("the pipeline file nests its values too deeply") from exc
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"the pipeline file is not valid {suffix[1:].upper()}: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # yaml.YAMLError and friends
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"the pipeline file is not valid YAML: {str(exc).splitlines()[0]}") from exc
        raise
    if not isinstance(raw, dict):
        raise ConfigError("the pipeline file must hold a table (mapping) at its top level")
    try:
        return _absolute(PipelineConfig.model_validate(raw), root)
    except ValidationError as exc:
        raise ConfigError(f"the pipeline file is not valid: {first_error(exc)}") from exc


def load_config(path: Path | str) -> PipelineConfig:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the pipeline file {path}: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the pipeline file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    return parse_config(data.decode("utf-8", errors="strict"), suffix=path.suffix.lower(), root=path.parent.resolve())


# ---- the run --------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    name: str
    key: str
    output: Path
    reused: bool
    seconds: float


@dataclass
class PipelineResult:
    bundle: Path
    sha256: str
    manifest_metrics: dict[str, float]
    metrics: dict[str, float]
    steps: list[StepRecord] = field(default_factory=list)
    uploaded: dict[str, Any] | None = None
    reproducible: bool = True


Packer = Callable[[Path, BundleSpec, datetime], Path]  # (model folder with eval.json, spec, created) -> bundle
Uploader = Callable[[Path, UploadSpec], dict[str, Any]]


def _versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(path: Path) -> str:
    """sha256 over every file's relative path and content, in path order."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + file_digest(p).encode())
    return h.hexdigest()


def step_key(name: str, settings: Any, inputs: list[str]) -> str:
    doc = {"step": name, "settings": settings, "inputs": inputs, "versions": _versions()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Runner:
    def __init__(self, work: Path, log: Callable[[str], None]) -> None:
        self.work, self.log = work, log
        self.records: list[StepRecord] = []
        self.key = ""  # the key of the step being built

    def checkpoint(self, name: str) -> Path:
        """Where the step being built keeps resumable state: a rerun after a crash continues from it."""
        return self.work / f"{name}-{self.key}.checkpoint"

    def step(self, name: str, settings: Any, inputs: list[str], build: Callable[[Path], None], *,
             kind: str | None = None) -> StepRecord:
        """Build step `name` unless its output exists. `kind` (default: the name) is what the key and the folder
        are named by, so two steps that make the same thing (the tiny recipe as a base and as a teacher) share it."""
        kind = kind or name
        key = step_key(kind, settings, inputs)
        final = self.work / f"{kind}-{key}"
        start = time.perf_counter()
        if final.is_dir():
            self.log(f"{name}: reusing {final.name}")
            record = StepRecord(name, key, final, True, 0.0)
        else:
            self.log(f"{name}: building {final.name}")
            self.key = key
            self.work.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.work))
            try:
                build(tmp / "out")
                os.replace(tmp / "out", final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            record = StepRecord(name, key, final, False, time.perf_counter() - start)
        self.records.append(record)
        return record


def _created(spec: BundleSpec) -> tuple[datetime, bool]:
    if spec.created is not None:
        created = spec.created if spec.created.tzinfo else spec.created.replace(tzinfo=timezone.utc)
        return created.astimezone(timezone.utc), True
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    if re.fullmatch(r"[0-9]{1,12}", epoch):
        return datetime.fromtimestamp(int(epoch), timezone.utc), True
    return datetime.now(timezone.utc).replace(microsecond=0), False


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=shutil.copy2)


def run(
    config: PipelineConfig,
    *,
    pack: Packer,
    upload: Uploader | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _line: None,
) -> PipelineResult:
    """Run every step of `config` (reusing finished ones) and write the bundle; return what was made."""
    from trainer.dataset import Template
    from trainer.evaluate import write_eval
    from trainer.export import export

    runner = _Runner(config.work_dir, log)

    # base: a Hugging Face folder
    if config.base.path is not None:
        from trainer.export import check_model_dir

        check_model_dir(config.base.path)
        base_out = config.base.path
        base_digest = folder_digest(config.base.path)
    else:
        tiny = config.base.tiny
        assert tiny is not None
        base_out, base_digest = _tiny_step(runner, "base", tiny, progress)
    model_dir, model_digest = base_out, base_digest

    if config.distill is not None:
        model_dir, model_digest = _distill_step(runner, config, model_dir, model_digest, progress)

    if config.finetune is not None:
        model_dir, model_digest = _finetune_step(runner, config, model_dir, model_digest, progress)

    exp = config.export
    rec = runner.step("export", exp.model_dump(), [model_digest],
                      lambda out: export(model_dir, out, precision=exp.precision, execution_provider=exp.provider,
                                         block_size=exp.block_size, accuracy_level=exp.accuracy_level,
                                         keep_float=exp.keep_float, keep_int8=exp.keep_int8,
                                         max_length=exp.max_length))
    onnx_dir = rec.output

    ev = config.eval
    task = _eval_task(config.data)
    template = Template(config.data.template)

    def evaluate(out: Path) -> None:
        _copy_tree(onnx_dir, out)
        write_eval(out, task=task, template=template, limit=ev.limit, heldout_min_score=ev.heldout_min_score,
                   progress=progress)

    eval_settings = {**ev.model_dump(exclude={"timings_in_manifest"}), "dataset": task.dataset,
                     "template": config.data.template, "label_regex": config.data.label_regex}
    rec = runner.step("eval", eval_settings, [rec.key, _rows_digest(list(task.rows))], evaluate)
    evaluated = rec.output
    full = json.loads((evaluated / "eval.json").read_text(encoding="utf-8"))
    metrics = {k: float(v) for k, v in full.get("metrics", {}).items()}

    # the folder that is packed: eval.json without measured speeds unless asked for
    kept = metrics if ev.timings_in_manifest else {k: v for k, v in metrics.items() if not TIMING_RE.fullmatch(k)}
    packed_settings = {"timings_in_manifest": ev.timings_in_manifest}

    def packed(out: Path) -> None:
        _copy_tree(evaluated, out)
        doc = {**full, "metrics": kept}
        (out / "eval.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    rec = runner.step("packed", packed_settings, [rec.key], packed)
    created, reproducible = _created(config.bundle)
    bundle = pack(rec.output, config.bundle, created)
    result = PipelineResult(bundle=bundle, sha256=file_digest(bundle), manifest_metrics=kept, metrics=metrics,
                            steps=runner.records, reproducible=reproducible)
    if config.upload is not None:
        if upload is None:
            raise ConfigError("[upload] is set but this command cannot upload")
        result.uploaded = upload(bundle, config.upload)
    _write_report(config, result)
    return result


def _train_rows(data: DataSpec) -> list:
    """The rows a training step learns from: the task file without its test share, or the shipped train split."""
    from trainer.dataset import load_rows, reference_rows, split_rows

    if data.train is None:
        return reference_rows("train")
    rows = load_rows(data.train)
    if data.test is not None:
        return rows
    parts = split_rows(rows, val=0.0, test=data.test_fraction)
    return parts["train"]


def _tiny_step(runner: _Runner, name: str, tiny: TinySpec, progress: bool) -> tuple[Path, str]:
    from trainer.tiny import build_tiny

    rec = runner.step(name, {"tiny": tiny.model_dump()}, [],
                      lambda out: build_tiny(out, steps=tiny.steps, seed=tiny.seed, progress=progress,
                                             shape=tiny.shape, task=tiny.task), kind="tiny")
    return rec.output, rec.key


def _distill_step(runner: _Runner, config: PipelineConfig, model_dir: Path, model_digest: str,
                  progress: bool) -> tuple[Path, str]:
    from trainer.dataset import Row, load_rows
    from trainer.distill import DistillConfig, distill, make_teacher
    from trainer.loop import TrainConfig

    spec = config.distill
    assert spec is not None
    who = spec.teacher
    if who.tiny is not None:
        teacher_dir, teacher_id = _tiny_step(runner, "teacher", who.tiny, progress)
    elif who.path is not None:
        teacher_dir, teacher_id = who.path, folder_digest(who.path)
    else:
        teacher_dir, teacher_id = None, f"{who.url} {who.model}"
    source = load_rows(spec.prompts, need_answer=False) if spec.prompts else _train_rows(config.data)
    prompts = [Row(r.messages, None, None) for r in source]  # the teacher's answers are all the student sees
    train = TrainConfig(max_steps=spec.steps, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                        eval_every=spec.eval_every, patience=spec.patience, seed=spec.seed, device=spec.device)
    cfg = DistillConfig(mode=spec.mode, method=spec.method, kd_temperature=spec.kd_temperature, alpha=spec.alpha,
                        samples=spec.samples, temperature=spec.temperature, max_new_tokens=spec.max_new_tokens,
                        label_regex=config.data.label_regex, template=config.data.template, rank=spec.rank,
                        train=train)
    cfg.check()
    settings = {**spec.model_dump(exclude={"teacher", "prompts"}), "template": config.data.template,
                "label_regex": config.data.label_regex}

    # Stage 1's answers depend on the teacher, the prompts and the sampling only: one file for every distil step
    # that asks the same (text and logits, full and LoRA), kept so a rerun after a crash asks only for the rest.
    stage1 = {"teacher": teacher_id, "prompts": _rows_digest(prompts), "samples": spec.samples,
              "temperature": spec.temperature, "max_new_tokens": spec.max_new_tokens,
              "template": config.data.template, "label_regex": config.data.label_regex}
    cache = runner.work / f"answers-{step_key('answers', stage1, [])}.jsonl"

    def build(out: Path) -> None:
        teacher = make_teacher(path=teacher_dir, url=who.url, model=who.model,
                               api_key=os.environ.get(who.api_key_env) or None, template=config.data.template,
                               device=spec.device)
        distill(model_dir, teacher, prompts, out, cfg, cache=cache, progress=progress)

    rec = runner.step("distill", settings, [model_digest, teacher_id, _rows_digest(prompts)], build)
    return rec.output / "merged", rec.key


def _eval_task(data: DataSpec) -> Any:
    """The rows the eval step scores: the test file, the recipe's test share of its rows (the same hash split the
    training steps left out), or the shipped task's test split."""
    from trainer.evaluate import load_task

    if data.test is not None:
        return load_task(data.test, whole_file=True, label_regex=data.label_regex)
    if data.train is not None:
        return load_task(data.train, val=0.0, test=data.test_fraction, label_regex=data.label_regex)
    return load_task(label_regex=data.label_regex)


def _rows_digest(rows: list) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row.to_json(), sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


def _finetune_step(runner: _Runner, config: PipelineConfig, model_dir: Path, model_digest: str,
                   progress: bool) -> tuple[Path, str]:
    from trainer.finetune import FinetuneConfig, finetune
    from trainer.loop import CHECKPOINT_FILE, TrainConfig

    ft = config.finetune
    assert ft is not None
    rows = _train_rows(config.data)
    train = TrainConfig(max_steps=ft.steps, epochs=ft.epochs, batch_size=ft.batch_size, grad_accum=ft.grad_accum,
                        lr=ft.lr, warmup=ft.warmup, eval_every=ft.eval_every, patience=ft.patience,
                        max_tokens=ft.max_tokens, seed=ft.seed, device=ft.device)
    cfg = FinetuneConfig(method=ft.method, engine=ft.engine, rank=ft.rank, alpha=ft.alpha, dropout=ft.dropout,
                         target_modules=ft.target_modules, template=config.data.template,
                         val_fraction=config.data.val_fraction, train=train, merge=True)
    settings = {**ft.model_dump(), "template": config.data.template, "val_fraction": cfg.val_fraction}

    def build(out: Path) -> None:
        checkpoint = runner.checkpoint("finetune")
        finetune(model_dir, rows, out, cfg, checkpoint_dir=checkpoint,
                 resume=(checkpoint / CHECKPOINT_FILE).is_file(), progress=progress)
        shutil.rmtree(checkpoint, ignore_errors=True)

    rec = runner.step("finetune", settings, [model_digest, _rows_digest(rows)], build)
    return rec.output / "merged", rec.key


def _write_report(config: PipelineConfig, result: PipelineResult) -> None:
    doc = {
        "bundle": str(result.bundle),
        "sha256": result.sha256,
        "reproducible": result.reproducible,
        "metrics": result.metrics,
        "manifest_metrics": result.manifest_metrics,
        "steps": [{"name": s.name, "key": s.key, "output": str(s.output), "reused": s.reused,
                   "seconds": round(s.seconds, 3)} for s in result.steps],
        "uploaded": result.uploaded,
        "versions": _versions(),
    }
    path = config.work_dir / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("report.json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def http_upload(bundle: Path, spec: UploadSpec, *, client: Any = None) -> dict[str, Any]:
    """POST the bundle to `spec.url`/api/v1/bundles with the bearer token in the environment variable it names."""
    import httpx

    token = os.environ.get(spec.token_env, "")
    if not token:
        raise ConfigError(f"set {spec.token_env} to an operator token of the fleet to upload the bundle")
    http = client or httpx.Client(base_url=spec.url.rstrip("/"), timeout=120.0)
    try:
        with bundle.open("rb") as f:
            r = http.post("/api/v1/bundles", content=f, headers={"content-type": "application/octet-stream",
                                                                  "authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot upload to {spec.url}: {exc}") from exc
    finally:
        if client is None:
            http.close()
    if r.status_code >= 400:
        raise ConfigError(f"the fleet at {spec.url} refused the bundle: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


def expires_for(spec: BundleSpec, created: datetime) -> datetime:
    return created + timedelta(days=spec.expires_days)
