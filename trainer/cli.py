"""Command line of the trainer: `tiny` builds the reference model, `export` converts, `eval` scores.

Workflow: `tiny --out hf/` trains the tiny model, `export --model hf/ --out onnx/` writes an onnxruntime-genai
folder, `eval --model onnx/` writes `onnx/eval.json` and prints the metrics. This module stays light to import:
torch, transformers and onnxruntime-genai load inside the commands. A slmops error prints one red line and exits
with code 2.
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.errors import SlmopsError
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
