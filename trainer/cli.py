"""Command line of the trainer: `tiny` builds the reference model, `export` converts, `eval` scores.

Workflow: `tiny --out hf/` trains the tiny model, `export --model hf/ --out onnx/` writes an onnxruntime-genai
folder, `eval --model onnx/` writes `onnx/eval.json` and prints the metrics. This module stays light to import:
torch, transformers and onnxruntime-genai load inside the commands. A slmops error prints one red line and exits
with code 2.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.errors import SlmopsError
from trainer.export import DEFAULT_MAX_LENGTH
from trainer.tiny import DEFAULT_STEPS

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


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Option(help="onnxruntime-genai model folder.")],
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N test rows.")] = None,
    heldout_min_score: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Devices fail the health check when they score the held-out set below this.")] = None,
) -> None:
    """Score an exported model on the test split and write eval.json (and the held-out set) into its folder."""
    from trainer.evaluate import EVAL_FILE, write_eval

    try:
        result = write_eval(model, limit=limit, heldout_min_score=heldout_min_score)
    except SlmopsError as exc:
        raise _fail(exc) from exc
    table = Table(title=result["dataset"])
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.4g}")
    console.print(table)
    console.print(f"written to [bold]{Path(model) / EVAL_FILE}[/bold]")
