"""Command line of the trainer: `tiny` builds the reference model, `finetune` adapts a base, `distill` trains a
student on a teacher's answers, `export` converts, `eval` scores.

Workflow: `tiny --out hf/` trains the tiny model, `finetune --base hf/ --data task.jsonl --out ft/`
fine-tunes a local model (LoRA, QLoRA or full) into `ft/adapter` and `ft/merged`, `distill` trains a student on a
teacher's answers, `export --model hf/ --out onnx/` writes an onnxruntime-genai folder, `eval --model onnx/` writes
`onnx/eval.json` and prints the metrics (`eval --model hf/ --model onnx/ --data task.jsonl` scores both side by side
on the held-out split of a user's task). This module stays light to import: torch, transformers and
onnxruntime-genai load inside the commands. A slmops error prints one red line and exits with code 2.
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.errors import ConfigError, SlmopsError
from trainer.export import (
    BLOCK_SIZES,
    DEFAULT_ACCURACY_LEVEL,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_KEEP_FLOAT,
    DEFAULT_KEEP_INT8,
    DEFAULT_MAX_LENGTH,
    KEEP_FLOAT,
    KEEP_INT8,
)
from trainer.tiny import DEFAULT_STEPS

if TYPE_CHECKING:
    from trainer.evaluate import EvalReport

app = typer.Typer(help="Build, export and evaluate small language models.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


class Precision(str, Enum):
    """Weight precision of an export."""

    int4 = "int4"
    int8 = "int8"
    fp16 = "fp16"
    fp32 = "fp32"


class Provider(str, Enum):
    """Execution provider an export targets."""

    cpu = "cpu"
    cuda = "cuda"


def _fail(exc: SlmopsError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {escape(str(exc).splitlines()[0])}", soft_wrap=True)
    return typer.Exit(code=2)


class Shape(str, Enum):
    """The reference model's size."""

    tiny = "tiny"
    teacher = "teacher"


@app.command()
def tiny(
    out: Annotated[Path, typer.Option(help="Folder to write the Hugging Face model into.")],
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = DEFAULT_STEPS,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    shape: Annotated[Shape, typer.Option(help="tiny (~1M parameters) or teacher (~5M, the reference teacher).")]
    = Shape.tiny,
    corpus_only: Annotated[bool, typer.Option(
        help="Train on the corpus only, never on a labelled answer (a base to distil a student into).")] = False,
) -> None:
    """Train the tiny reference model (Qwen2, ~1M parameters) on the shipped triage data, on CPU."""
    from trainer.tiny import build_tiny

    start = time.perf_counter()
    try:
        path = build_tiny(out, steps=steps, seed=seed, shape=shape.value, task=not corpus_only)
    except SlmopsError as exc:
        raise _fail(exc) from exc
    console.print(f"tiny model written to [bold]{path}[/bold] in {time.perf_counter() - start:.0f}s")


class Method(str, Enum):
    """How to fine-tune."""

    lora = "lora"
    qlora = "qlora"
    full = "full"


class Device(str, Enum):
    """Where a model trains, or where a Hugging Face model runs during evaluation."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def finetune(
    base: Annotated[Path, typer.Option(help="Local Hugging Face model folder to start from.")],
    data: Annotated[Path, typer.Option(help="Task JSONL (prompt/answer or messages rows).")],
    out: Annotated[Path, typer.Option(help="Folder to write adapter/, merged/ and finetune.json into.")],
    val: Annotated[Path | None, typer.Option(help="Validation JSONL (default: a hash split of --data).")] = None,
    method: Annotated[Method, typer.Option(help="lora, qlora (CUDA only) or full.")] = Method.lora,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 32.0,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: --epochs decide).")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the training rows when --steps is not given.")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    eval_every: Annotated[int, typer.Option(min=0, help="Steps between evaluations (0: at the end).")] = 50,
    patience: Annotated[int, typer.Option(min=0, help="Evaluations without improvement before stopping.")] = 0,
    template: Annotated[str, typer.Option(help="'chat' or a text template holding {prompt}.")] = "chat",
    max_tokens: Annotated[int, typer.Option(min=2, help="Tokens a row is cut to.")] = 512,
    device: Annotated[Device, typer.Option(help="auto (cuda when present), cpu or cuda.")] = Device.auto,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    engine: Annotated[str, typer.Option(help="peft, or olive (olive finetune in a subprocess).")] = "peft",
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="Checkpoint folder (default: <out>.checkpoint, removed after success).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in the checkpoint.")] = False,
    merge: Annotated[bool, typer.Option(help="Also write merged/ (the base with the adapter merged in).")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Fine-tune a local model on a task JSONL with LoRA, QLoRA or every weight; prints what the run did."""
    from trainer.finetune import FinetuneConfig
    from trainer.finetune import finetune as run_finetune
    from trainer.loop import TrainConfig

    try:
        train = TrainConfig(max_steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                            max_tokens=max_tokens, eval_every=eval_every, patience=patience, seed=seed,
                            device=device.value)
        cfg = FinetuneConfig(method=method.value, rank=rank, alpha=alpha, template=template, train=train,
                             merge=merge, engine=engine)
        result = run_finetune(base, data, out, cfg, val_data=val, checkpoint_dir=checkpoint_dir, resume=resume,
                              progress=progress)
    except SlmopsError as exc:
        raise _fail(exc) from exc
    r = result.train
    table = Table(title=f"{method.value} fine-tune of {base.name}")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("steps", f"{r.steps}"), ("epochs", f"{r.epochs:.2f}"), ("train_loss", f"{r.train_loss:.4f}"),
        ("val_loss", "-" if r.val_loss is None else f"{r.val_loss:.4f}"), ("best_step", f"{r.best_step}"),
        ("stopped_early", f"{r.stopped_early}"), ("seconds", f"{r.seconds:.1f}"),
        ("tokens_per_s", f"{r.tokens_per_s:.0f}"), ("rows (train/val)", f"{result.train_rows}/{result.val_rows}"),
        ("trainable params", f"{result.trainable_params:,} of {result.total_params:,}"),
        ("adapter", f"{result.adapter} ({result.adapter_bytes:,} bytes)" if result.adapter else "-"),
        ("merged", f"{result.merged}" if result.merged else "-"),
    ]
    for name, value in rows:
        table.add_row(name, escape(value))
    console.print(table)


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Hugging Face model folder.")],
    out: Annotated[Path, typer.Option(help="Folder to write the onnxruntime-genai model into.")],
    precision: Annotated[Precision, typer.Option(
        help="Weight precision (fp16 needs --provider cuda).")] = Precision.int4,
    provider: Annotated[Provider, typer.Option(help="Execution provider the export targets.")] = Provider.cpu,
    block_size: Annotated[int | None, typer.Option(
        help=f"int4/int8 quantization block size, one of {BLOCK_SIZES} (default {DEFAULT_BLOCK_SIZE}).")] = None,
    accuracy_level: Annotated[int | None, typer.Option(help=(
        "MatMulNBits compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        f"(default {DEFAULT_ACCURACY_LEVEL} on cpu, 0 on cuda)."))] = None,
    keep_float: Annotated[list[str] | None, typer.Option(help=(
        f"Layer an int4/int8 export keeps in float: {', '.join(KEEP_FLOAT)} (repeatable) "
        f"(int4 default: {', '.join(DEFAULT_KEEP_FLOAT) or 'none'})."))] = None,
    keep_int8: Annotated[list[str] | None, typer.Option(help=(
        f"Layer an int4 export quantizes to int8 instead: {', '.join(KEEP_INT8)} (repeatable) "
        f"(default: {', '.join(DEFAULT_KEEP_INT8) or 'none'})."))] = None,
    adapter: Annotated[Path | None, typer.Option(
        help="PEFT LoRA folder: export the base with adapter inputs and write <name>.onnx_adapter beside it.")] = None,
    adapter_name: Annotated[str | None, typer.Option(
        help="Stem of the .onnx_adapter file (default: the adapter folder's name).")] = None,
    max_length: Annotated[int, typer.Option(help="search.max_length in genai_config.json.")] = DEFAULT_MAX_LENGTH,
) -> None:
    """Export a Hugging Face model folder to onnxruntime-genai (int4, int8, fp16 or fp32; cpu or cuda)."""
    from trainer.export import EXPORT_FILE
    from trainer.export import export as run_export

    start = time.perf_counter()
    try:
        path = run_export(
            model,
            out,
            precision=precision.value,
            execution_provider=provider.value,
            block_size=block_size,
            accuracy_level=accuracy_level,
            keep_float=keep_float,
            keep_int8=keep_int8,
            adapter=adapter,
            adapter_name=adapter_name,
            max_length=max_length,
        )
    except SlmopsError as exc:
        raise _fail(exc) from exc
    record = json.loads((path / EXPORT_FILE).read_text(encoding="utf-8"))
    size = f"{record['weight_bytes'] / 2**20:,.1f} MB"
    console.print(f"{precision.value} {provider.value} export ({size}) written to [bold]{escape(str(path))}[/bold] "
                  f"in {time.perf_counter() - start:.0f}s")
    if "adapter" in record:
        console.print(f"adapter: [bold]{escape(record['adapter']['file'])}[/bold] "
                      f"({record['adapter']['bytes'] / 2**10:,.1f} kB, rank {record['adapter']['rank']})")


class Split(str, Enum):
    """Which held-out part of a task file is scored."""

    test = "test"
    val = "val"


@app.command("eval")
def eval_(
    model: Annotated[list[Path], typer.Option(
        help="Model folder: onnxruntime-genai (genai_config.json) or Hugging Face; repeat to compare models.")],
    data: Annotated[Path | None, typer.Option(
        help="Task JSONL; its held-out split is scored (the split training used). Default: the triage task.")] = None,
    test_file: Annotated[Path | None, typer.Option(help="Task JSONL held out as a whole; every row is scored.")] = None,
    split: Annotated[Split, typer.Option(help="Which held-out part of --data (or of the triage task).")] = Split.test,
    val_fraction: Annotated[float, typer.Option(help="Share of --data held out for validation in training.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Share of --data held out for testing in training.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split seed training used.")] = 0,
    label_regex: Annotated[str | None, typer.Option(
        help="Regex matched at the start of an answer; its first group is the answer's label.")] = None,
    exact_label: Annotated[bool, typer.Option(
        "--exact-label", help="The whole answer is the label (the default for a task file without --label-regex).")
    ] = False,
    template: Annotated[str, typer.Option(help="'chat' (the tokenizer's chat template) or a text with {prompt}.")
                        ] = "chat",
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N rows.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Tokens an answer may take.")] = 32,
    perplexity_rows: Annotated[int, typer.Option(min=0, help="Rows the perplexity is measured on (0: none).")] = 50,
    device: Annotated[Device, typer.Option(help="Device of a Hugging Face model.")] = Device.auto,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads of a Hugging Face model.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
    write: Annotated[bool, typer.Option(help="Write eval.json and the held-out set into each exported folder.")
                     ] = True,
    heldout_min_score: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Devices fail the health check when they score the held-out set below this.")] = None,
) -> None:
    """Score models on a task's held-out rows side by side; write eval.json (and the held-out set) into each
    exported folder."""
    from trainer.dataset import Template
    from trainer.evaluate import EVAL_FILE, compare, load_task, write_eval

    try:
        if data is not None and test_file is not None:
            raise ConfigError("give --data (its held-out split is scored) or --test-file (scored whole), not both")
        task = load_task(data or test_file, whole_file=test_file is not None, split=split.value, val=val_fraction,
                         test=test_fraction, seed=seed, label_regex=label_regex, exact=exact_label)
        reports = compare(model, task.rows, template=Template(template), scorer=task.scorer, limit=limit,
                          max_new_tokens=max_new_tokens, perplexity_rows=perplexity_rows, device=device.value,
                          threads=threads, progress=True)
        written = []
        for report in reports if write else []:
            if report.backend == "onnx":  # eval.json goes into the bundle, which is built from an exported folder
                write_eval(report.model, task=task, report=report, heldout_min_score=heldout_min_score,
                           max_new_tokens=max_new_tokens)
                written.append(Path(report.model) / EVAL_FILE)
        if json_out is not None:
            _write_json(json_out, {"dataset": task.dataset, "models": [r.to_json() for r in reports]})
    except SlmopsError as exc:
        raise _fail(exc) from exc
    console.print(_table(task.dataset, reports))
    for path in [*written, *([json_out] if json_out else [])]:
        console.print(f"written to [bold]{escape(str(path))}[/bold]")


def _table(title: str, reports: list[EvalReport]) -> Table:
    """One row per metric, one column per model."""
    names = [Path(r.model).name or r.model for r in reports]
    if len(set(names)) < len(names):
        names = [r.model for r in reports]
    table = Table(title=escape(title))
    table.add_column("metric")
    for name, report in zip(names, reports):
        table.add_column(f"{escape(name)} ({report.backend})", justify="right")
    metrics = list(dict.fromkeys(k for r in reports for k in r.metrics))
    for metric in metrics:
        cells = [r.metrics.get(metric) for r in reports]
        table.add_row(metric, *["-" if v is None else f"{v:,.0f}" if metric in _COUNTS else f"{v:.4g}" for v in cells])
    return table


_COUNTS = {"samples", "bytes_on_disk", "perplexity_rows"}


def _write_json(path: Path, doc: dict) -> None:
    """`doc` as JSON at `path`, written to a sibling and renamed into place."""
    import json

    if not path.parent.is_dir():
        raise ConfigError(f"folder {path.parent} for the JSON output does not exist")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


class DistillMode(str, Enum):
    """What the student learns from: the teacher's text, or its logits too (shared tokenizer only)."""

    text = "text"
    logits = "logits"


class DistillMethod(str, Enum):
    """How the student's weights change."""

    lora = "lora"
    full = "full"


@app.command()
def distill(
    student: Annotated[Path, typer.Option(help="Student Hugging Face model folder.")],
    prompts: Annotated[Path, typer.Option(help="JSONL of prompts ('prompt' or 'messages'; answers are ignored).")],
    out: Annotated[Path, typer.Option(help="Folder to write the student into (merged/, distill.json).")],
    teacher: Annotated[Path | None, typer.Option(help="Teacher Hugging Face model folder.")] = None,
    teacher_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible base URL of the teacher, e.g. http://127.0.0.1:8080/v1.")] = None,
    teacher_model: Annotated[str | None, typer.Option(help="Model name the teacher URL serves.")] = None,
    teacher_api_key: Annotated[str | None, typer.Option(
        envvar="SLMOPS_TEACHER_API_KEY", help="API key of the teacher URL.")] = None,
    cache: Annotated[Path | None, typer.Option(
        help="Teacher answer cache (JSONL; an interrupted run continues from it). Default: <out>.teacher.jsonl.")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, max=64, help="Teacher answers per prompt.")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="Teacher sampling temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Teacher top-p (HF teacher).")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Teacher answer budget in tokens.")] = 128,
    label_regex: Annotated[str | None, typer.Option(help="Reads a label from each answer, e.g. '(ok|fault):'.")
                           ] = None,
    template: Annotated[str, typer.Option(help="'chat' or a text holding {prompt}.")] = "chat",
    mode: Annotated[DistillMode, typer.Option(help="text, or logits (teacher and student share a tokenizer).")
                    ] = DistillMode.text,
    method: Annotated[DistillMethod, typer.Option(help="Train a LoRA adapter (merged at the end) or all weights.")
                      ] = DistillMethod.lora,
    kd_temperature: Annotated[float, typer.Option(min=0.01, help="Soft-label temperature T (logits mode).")] = 2.0,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight of the KL term (logits mode).")] = 0.5,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps (default: --epochs decide).")] = None,
    epochs: Annotated[float, typer.Option(min=0.01, help="Training epochs when --steps is not given.")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per step.")] = 8,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = 2e-4,
    val: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of prompts held out for validation.")] = 0.1,
    eval_every: Annotated[int, typer.Option(min=0, help="Steps between evaluations (0: at the end).")] = 50,
    patience: Annotated[int, typer.Option(min=0, help="Evaluations without improvement before stopping.")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Distil a teacher into a student: the teacher answers the prompts (cached), the student trains on them."""
    from trainer.distill import DistillConfig, run_distill
    from trainer.loop import TrainConfig

    start = time.perf_counter()
    try:
        if (teacher is None) == (teacher_url is None) or (teacher_url is not None and not teacher_model):
            raise ConfigError("pass either --teacher DIR or --teacher-url URL with --teacher-model NAME")
        train = TrainConfig(max_steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, eval_every=eval_every,
                            patience=patience, seed=seed, device=device)
        cfg = DistillConfig(mode=mode.value, method=method.value, kd_temperature=kd_temperature, alpha=alpha,
                            samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                            label_regex=label_regex, template=template, val=val, rank=rank, lora_alpha=2 * rank,
                            train=train)
        result = run_distill(student, prompts, out, cfg, teacher=teacher, teacher_url=teacher_url,
                             teacher_model=teacher_model, api_key=teacher_api_key, top_p=top_p, device=device,
                             cache=cache)
    except SlmopsError as exc:
        raise _fail(exc) from exc
    val_loss = f", val loss {result.train.val_loss:.4f}" if result.train.val_loss is not None else ""
    console.print(f"teacher answers: {result.cached} from the cache, {result.answered} new; "
                  f"{result.train.steps} steps, train loss {result.train.train_loss:.4f}{val_loss}")
    console.print(f"student written to [bold]{result.merged}[/bold] in {time.perf_counter() - start:.0f}s")
