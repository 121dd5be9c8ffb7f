"""Command line of the trainer: `tiny` builds the reference model, `export` converts, `eval` scores.

Workflow: `tiny --out hf/` trains the tiny model, `export --model hf/ --out onnx/` writes an onnxruntime-genai
folder, `eval --model onnx/` writes `onnx/eval.json` and prints the metrics (`eval --model hf/ --model onnx/
--data task.jsonl` scores both side by side on the held-out split of a user's task). This module stays light to import:
torch, transformers and onnxruntime-genai load inside the commands. A slmops error prints one red line and exits
with code 2.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.errors import ConfigError, SlmopsError
from trainer.export import DEFAULT_MAX_LENGTH
from trainer.tiny import DEFAULT_STEPS

if TYPE_CHECKING:
    from trainer.evaluate import EvalReport

app = typer.Typer(help="Build, export and evaluate small language models.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


class Precision(str, Enum):
    """Weight precision of an export."""

    int4 = "int4"
    fp32 = "fp32"


def _fail(exc: SlmopsError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {escape(str(exc).splitlines()[0])}", soft_wrap=True)
    return typer.Exit(code=2)


@app.command()
def tiny(
    out: Annotated[Path, typer.Option(help="Folder to write the Hugging Face model into.")],
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = DEFAULT_STEPS,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the tiny reference model (Qwen2, ~1M parameters) on the shipped triage data, on CPU."""
    from trainer.tiny import build_tiny

    start = time.perf_counter()
    try:
        path = build_tiny(out, steps=steps, seed=seed)
    except SlmopsError as exc:
        raise _fail(exc) from exc
    console.print(f"tiny model written to [bold]{path}[/bold] in {time.perf_counter() - start:.0f}s")


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Hugging Face model folder.")],
    out: Annotated[Path, typer.Option(help="Folder to write the onnxruntime-genai model into.")],
    precision: Annotated[Precision, typer.Option(help="Weight precision.")] = Precision.int4,
    block_size: Annotated[int, typer.Option(help="int4 quantization block size.")] = 32,
    accuracy_level: Annotated[int, typer.Option(help="MatMulNBits accuracy level (4: int8 compute).")] = 4,
    max_length: Annotated[int, typer.Option(help="search.max_length in genai_config.json.")] = DEFAULT_MAX_LENGTH,
) -> None:
    """Export a Hugging Face model folder to onnxruntime-genai for the CPU."""
    from trainer.export import export as run_export

    start = time.perf_counter()
    try:
        path = run_export(
            model,
            out,
            precision=precision.value,
            block_size=block_size,
            accuracy_level=accuracy_level,
            max_length=max_length,
        )
    except SlmopsError as exc:
        raise _fail(exc) from exc
    console.print(f"{precision.value} export written to [bold]{path}[/bold] in {time.perf_counter() - start:.0f}s")


class Device(str, Enum):
    """Where a Hugging Face model runs during evaluation."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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
