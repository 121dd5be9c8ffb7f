"""Export variants side by side: decode speed, time to first token, bytes on disk and task accuracy.

`python -m bench.quant` (add `--quick` for a smoke run of four variants on the tiny model only).

Workflow:
1. take the two cached Hugging Face folders of `bench.models`: "tiny" (the tiny reference model, 300 steps) and
   "qwen05" (Qwen2.5-0.5B's shape, 24 x 896, vocabulary 151936, random weights, the tiny tokenizer padded with filler
   tokens to Qwen2.5's 151936 ids so the embedding and lm_head weigh what they weigh in the real model);
2. for each variant (`VARIANTS`: fp32, int8, int4 over block sizes x accuracy levels, int4 with the lm_head or
   embeddings kept in float or int8; fp16 only with `--provider cuda`, which the CPU cannot run) and each model it
   applies to, export with `trainer.export.export` into a scratch folder, pin onnxruntime's intra-op threads
   (`--threads`) in genai_config.json, then measure:
   - bytes on disk of the weights and graph (`trainer.export.weight_bytes`);
   - time to first token (prompt in, first token out) and decode tokens/s (the tokens after the first), greedy,
     `--tokens` new tokens per prompt with end-of-sequence held off by `min_length`, median over the prompts and
     `--repeats` rounds, after one warm-up generation;
   - on the tiny model only, label accuracy on the first `--rows` rows of the test split (`trainer.evaluate`);
     random weights have no accuracy, so on both models also the fidelity to the fp32 export (measured first): the
     relative L2 error of the next-token logits after `FIDELITY_ROWS` prompts and the share with fp32's next token;
   then delete the export (the Qwen-shaped fp32 one is 2 GB);
3. write `bench/results/quant-<stamp>.json` and `.png` (accuracy against tokens/s for the tiny model, tokens/s
   against bytes and logit error against tokens/s for the Qwen shape, bytes per variant against fp32) and print a
   table and `choose()`'s pick of the int4 defaults: among int4 variants at most `MAX_BYTES_SHARE` of fp32's bytes,
   within `ACCURACY_SLACK` of the best tiny accuracy and within `FIDELITY_SLACK` of the lowest Qwen-shaped logit
   error, the fastest Qwen-shaped decode (the tiny decode where the Qwen shape was not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import models

REPO = Path(__file__).resolve().parents[1]
ACCURACY_SLACK = 0.01  # share of rows: int4 variants this close to the best int4 accuracy count as equally right
FIDELITY_SLACK = 0.10  # int4 variants whose Qwen-shaped logit error is at most 10% above the lowest count as faithful
MAX_BYTES_SHARE = 0.30  # the target: an int4 export weighs at most 30% of the fp32 one
PROMPT_ROWS = 3  # test rows whose prompts time the decode
FIDELITY_ROWS = 32  # test rows whose next-token logits are compared with the fp32 export's


@dataclass(frozen=True)
class Variant:
    """One export setting; `models` names the bench models it runs on."""

    name: str
    precision: str
    block_size: int | None = None
    accuracy_level: int | None = None
    keep_float: tuple[str, ...] = ()
    keep_int8: tuple[str, ...] = ()
    models: tuple[str, ...] = ("tiny", "qwen05")

    def options(self) -> dict:
        opts: dict = {"precision": self.precision}
        if self.precision in ("int4", "int8"):
            opts |= {"block_size": self.block_size or 32, "accuracy_level": self.accuracy_level,
                     "keep_float": self.keep_float, "keep_int8": self.keep_int8}
        return opts


def _int4(bs: int, acc: int, models_: tuple[str, ...]) -> Variant:
    return Variant(f"int4-b{bs}-a{acc}", "int4", bs, acc, models=models_)


TINY = ("tiny",)
# The Qwen shape runs the block sizes at accuracy level 4 and the levels at block size 32 (each export takes a
# minute and 0.3-2 GB there); the tiny model runs the whole grid.
VARIANTS: tuple[Variant, ...] = (
    Variant("fp32", "fp32"),
    Variant("int8", "int8", 32, 4),
    *(_int4(bs, acc, ("tiny", "qwen05") if acc == 4 or bs == 32 else TINY)
      for bs in (16, 32, 64, 128) for acc in (0, 1, 4)),
    Variant("int4-float-lm_head", "int4", 32, 4, keep_float=("lm_head",)),
    Variant("int4-float-embeddings", "int4", 32, 4, keep_float=("embeddings",)),
    Variant("int4-float-both", "int4", 32, 4, keep_float=("embeddings", "lm_head"), models=TINY),
    Variant("int4-int8-lm_head", "int4", 32, 4, keep_int8=("lm_head",)),
    Variant("int4-int8-sensitive", "int4", 32, 4, keep_int8=("sensitive",), models=TINY),
)
QUICK = ("fp32", "int8", "int4-b32-a4", "int4-float-lm_head")
CUDA_ONLY = (Variant("fp16", "fp16"),)


@dataclass
class Measure:
    """What one variant measured on one model."""

    variant: str
    model: str
    bytes: int = 0
    export_s: float = 0.0
    ttft_ms: float | None = None
    decode_tps: float | None = None
    accuracy: float | None = None
    rows: int = 0
    logit_error: float | None = None  # median over the prompts of |logits - fp32 logits| / |fp32 logits| (last token)
    top1_agree: float | None = None  # share of the prompts whose next token is fp32's
    error: str | None = None
    options: dict = field(default_factory=dict)


def _pin_threads(folder: Path, threads: int) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    opts = config["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def time_decode(folder: Path, prompts: list[str], *, tokens: int, repeats: int) -> tuple[float, float]:
    """Median time to first token (ms) and decode rate (tokens/s after the first) over prompts x repeats."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    encoded = [list(tokenizer.encode(p)) for p in prompts]
    ttfts, rates = [], []
    for round_ in range(repeats + 1):  # round 0 warms up
        for ids in encoded:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + tokens, min_length=len(ids) + tokens, do_sample=False)
            generator = og.Generator(model, params)
            start = time.perf_counter()
            generator.append_tokens(ids)
            generator.generate_next_token()
            first = time.perf_counter()
            n = 1
            while not generator.is_done():
                generator.generate_next_token()
                n += 1
            end = time.perf_counter()
            if round_:
                ttfts.append(1000 * (first - start))
                rates.append((n - 1) / (end - first))
    return statistics.median(ttfts), statistics.median(rates)


def last_logits(folder: Path, prompts: list[str]) -> list:
    """The next-token logits after each prompt."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    out = []
    for prompt in prompts:
        ids = list(tokenizer.encode(prompt))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        out.append(np.asarray(generator.get_logits(), dtype=np.float64).reshape(-1))
    return out


def fidelity(logits: list, reference: list) -> tuple[float, float]:
    """Median relative L2 error of `logits` against `reference`, and the share with the same arg-max."""
    import numpy as np

    errors = [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(logits, reference, strict=True)]
    agree = [int(np.argmax(a) == np.argmax(b)) for a, b in zip(logits, reference, strict=True)]
    return statistics.median(errors), sum(agree) / len(agree)


def _prompts(rows: int = PROMPT_ROWS) -> list[str]:
    from trainer.task import load_split
    from trainer.tiny import chatml_prompt

    return [chatml_prompt(row["prompt"]) for row in load_split("test")[:rows]]


def measure(variant: Variant, model: str, hf: Path, scratch: Path, args: argparse.Namespace,
            reference: dict[str, list]) -> Measure:
    """Export `variant` of `model`, measure it and delete the export. `reference`: fp32 logits per model, filled by
    the fp32 variant (measured first) and compared against by the others."""
    from protocol.errors import ConfigError
    from trainer.evaluate import evaluate
    from trainer.export import export, weight_bytes

    result = Measure(variant.name, model, options=variant.options())
    out = scratch / f"{model}-{variant.name}"
    try:
        started = time.perf_counter()
        export(hf, out, execution_provider=args.provider, cache_dir=scratch / "cache", **variant.options())
        result.export_s = round(time.perf_counter() - started, 1)
        result.bytes = weight_bytes(out)
        _pin_threads(out, args.threads)
        result.ttft_ms, result.decode_tps = time_decode(out, _prompts(), tokens=args.tokens, repeats=args.repeats)
        logits = last_logits(out, _prompts() + _prompts(FIDELITY_ROWS)[PROMPT_ROWS:])
        if variant.name == "fp32":
            reference[model] = logits
        elif model in reference:
            result.logit_error, result.top1_agree = fidelity(logits, reference[model])
        if model == "tiny":
            metrics = evaluate(out, "test", args.rows)
            result.accuracy, result.rows = metrics["label_accuracy"], int(metrics["samples"])
    except ConfigError as exc:
        result.error = str(exc).splitlines()[0]
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(scratch / "cache", ignore_errors=True)
    return result


def choose(results: list[Measure]) -> dict:
    """The int4 defaults by measured accuracy, fidelity, size and decode speed together (see the module docstring)."""
    ok = [r for r in results if r.error is None and r.options.get("precision") == "int4"]
    tiny = {r.variant: r for r in ok if r.model == "tiny" and r.accuracy is not None}
    qwen = {r.variant: r for r in ok if r.model == "qwen05"}
    fp32 = {r.model: r.bytes for r in results if r.variant == "fp32" and r.bytes}
    if not tiny:
        return {}
    best = max(r.accuracy for r in tiny.values())
    errors = [r.logit_error for r in qwen.values() if r.logit_error is not None]
    least = min(errors) if errors else None

    def fits(v: str) -> bool:
        if tiny[v].accuracy < best - ACCURACY_SLACK:
            return False
        if any(r.variant == v and r.model in fp32 and r.bytes > MAX_BYTES_SHARE * fp32[r.model] for r in ok):
            return False
        error = qwen[v].logit_error if v in qwen else None
        return least is None or error is None or error <= (1 + FIDELITY_SLACK) * least

    def speed(v: str) -> tuple[float, float]:
        return (qwen[v].decode_tps if v in qwen else 0.0, tiny[v].decode_tps or 0.0)

    right = sorted(v for v in tiny if fits(v))
    if not right:
        return {}
    pick = max(right, key=speed)
    return {"variant": pick, "options": tiny[pick].options, "best_int4_accuracy": best,
            "accuracy": tiny[pick].accuracy, "candidates": right,
            "rule": f"int4 variants at most {MAX_BYTES_SHARE:.0%} of fp32's bytes, within {ACCURACY_SLACK:.0%} of the "
                    f"best tiny label accuracy and within {FIDELITY_SLACK:.0%} of the lowest Qwen-shaped logit error; "
                    "of those the fastest Qwen-shaped decode, then the fastest tiny decode"}


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def summary(results: list[Measure]) -> Table:
    fp32 = {r.model: r.bytes for r in results if r.variant == "fp32" and r.bytes}
    table = Table(title="export variants (median TTFT, median decode tokens/s)")
    for col in ("model", "variant", "MB", "of fp32", "TTFT ms", "tok/s", "accuracy", "logit err", "top-1", "export s"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for r in results:
        if r.error:
            table.add_row(r.model, r.variant, f"[red]{r.error}[/red]", *[""] * 7)
            continue
        share = f"{r.bytes / fp32[r.model]:.0%}" if r.model in fp32 else "-"
        acc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
        err = "-" if r.logit_error is None else f"{r.logit_error:.3f}"
        top1 = "-" if r.top1_agree is None else f"{r.top1_agree:.2f}"
        table.add_row(r.model, r.variant, _mb(r.bytes), share, f"{r.ttft_ms:.1f}", f"{r.decode_tps:.1f}", acc, err,
                      top1, f"{r.export_s:.0f}")
    return table


def plot(results: list[Measure], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.error is None]
    fig, grid = plt.subplots(2, 2, figsize=(15, 10))
    axes = grid.reshape(-1)
    tiny = [r for r in ok if r.model == "tiny" and r.accuracy is not None]
    ax = axes[0]
    for r in tiny:
        ax.scatter(r.decode_tps, r.accuracy, color="C1" if r.variant.startswith("int4") else "C0")
        ax.annotate(r.variant, (r.decode_tps, r.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(title="tiny model: label accuracy vs decode speed", xlabel="decode tokens/s", ylabel="label accuracy")
    qwen = [r for r in ok if r.model == "qwen05"]
    ax = axes[1]
    for r in qwen:
        ax.scatter(r.bytes / 2**20, r.decode_tps, color="C1" if r.variant.startswith("int4") else "C0")
        ax.annotate(r.variant, (r.bytes / 2**20, r.decode_tps), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(title="Qwen2.5-0.5B shape: decode speed vs size", xlabel="MB on disk", ylabel="decode tokens/s")
    ax = axes[2]
    names = list(dict.fromkeys(r.variant for r in ok))
    for i, model in enumerate(("tiny", "qwen05")):
        base = next((r.bytes for r in ok if r.model == model and r.variant == "fp32"), None)
        if not base:
            continue
        rows = {r.variant: r.bytes / base for r in ok if r.model == model}
        xs = [j + 0.4 * i for j, n in enumerate(names) if n in rows]
        ax.bar(xs, [rows[n] for n in names if n in rows], width=0.4, label=model)
    ax.axhline(0.30, color="red", linestyle="--", linewidth=1, label="target: int4 <= 30% of fp32")
    ax.set_xticks([j + 0.2 for j in range(len(names))], names, rotation=70, fontsize=7)
    ax.set(title="bytes on disk, share of fp32", ylabel="bytes / fp32 bytes")
    ax.legend(fontsize=8)
    ax = axes[3]
    for r in (r for r in qwen if r.logit_error is not None):
        ax.scatter(r.decode_tps, r.logit_error, color="C1" if r.variant.startswith("int4") else "C0")
        ax.annotate(r.variant, (r.decode_tps, r.logit_error), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(title="Qwen2.5-0.5B shape: next-token logit error against fp32", xlabel="decode tokens/s",
           ylabel="|logits - fp32| / |fp32| (median of prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quant", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"smoke run: {', '.join(QUICK)} on the tiny model only")
    p.add_argument("--skip-qwen", action="store_true", help="measure the tiny model only")
    p.add_argument("--only", default="", help="comma-separated variant names to run (fp32 always runs first)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="execution provider (cuda adds fp16)")
    p.add_argument("--rows", type=int, default=300, help="test rows scored for accuracy (tiny model)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per timed generation")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds over the prompts (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where results go")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[Variant, str]]:
    """The (variant, model) pairs this run measures, tiny first."""
    variants = list(VARIANTS) + (list(CUDA_ONLY) if args.provider == "cuda" else [])
    if args.quick:
        return [(v, "tiny") for v in variants if v.name in QUICK]
    if args.only:
        chosen = {"fp32", *args.only.split(",")}
        unknown = chosen - {v.name for v in variants}
        if unknown:
            raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))}")
        variants = [v for v in variants if v.name in chosen]
    names = ("tiny",) if args.skip_qwen else ("tiny", "qwen05")
    return [(v, m) for m in names for v in variants if m in v.models]


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    console = Console()
    pairs = plan(args)
    started = time.perf_counter()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folders = {m: models.ensure_hf(m) for m in dict.fromkeys(m for _, m in pairs)}
    results: list[Measure] = []
    reference: dict[str, list] = {}
    scratch = Path(tempfile.mkdtemp(prefix="quant-", dir=models.CACHE))
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("export and measure", total=len(pairs))
            for variant, model in pairs:
                bar.update(task, description=f"{model} {variant.name}")
                results.append(measure(variant, model, folders[model], scratch, args, reference))
                bar.advance(task)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record = {
        "meta": {"stamp": stamp, "argv": vars(args) | {"out": str(args.out)}, "host": platform.node(),
                 "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                 "duration_s": round(time.perf_counter() - started),
                 "qwen05_vocab": models.QWEN05_SHAPE["vocab_size"]},
        "results": [asdict(r) for r in results],
        "choice": choose(results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"quant-{stamp}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    plot(results, json_path.with_suffix(".png"))
    console.print(summary(results))
    console.print(f"int4 defaults by this run: {record['choice'] or 'none (no int4 accuracy measured)'}")
    console.print(f"results: {json_path} and {json_path.with_suffix('.png').name}")
    return record


if __name__ == "__main__":
    main()
