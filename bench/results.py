"""`python -m bench.results` (`make results`): rebuild `docs/results.md`, the reference task measured end to end.

Workflow:
1. run the reference recipes (`recipes/reference/*.toml`: the teacher, the distilled student, a LoRA fine-tune of
   a base) through `trainer.pipeline`, plus the student recipe with `mode = "logits"`; their work folder is
   `.cache/recipes`, so a rerun reuses every step whose inputs did not change (`--fresh` starts over);
2. export the teacher and the student to fp32 as well (cached the same way), beside the recipes' int4;
3. score every model side by side in one run on the whole test split (`trainer.evaluate.compare`: each model in a
   fresh process): label accuracy, perplexity, time to first token, decode tokens/s, peak memory, bytes on disk;
4. write `bench/results/results-<time>.json`, the plot `docs/img/results.png` and `docs/results.md`, with each of
   the issue's targets checked against the figures of this run.
`--quick` runs the same story with a handful of steps and rows (a smoke run; it writes under bench/results only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "reference"
CACHE = REPO / ".cache" / "recipes"
LABEL_RE = "^(ok|warning|fault): "
console = Console()


@dataclass
class Entry:
    """One row of the table: a model folder and what it is."""

    key: str
    label: str
    folder: Path
    precision: str
    params: int
    extra: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def params_of(hf_dir: Path) -> int:
    """Parameters stored in a Hugging Face folder's safetensors files (tied embeddings count once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def _config(name: str, work: Path, quick: bool, **changes):
    from trainer.pipeline import load_config

    cfg = load_config(RECIPES / f"{name}.toml")
    update: dict = {"work_dir": work}
    if quick:
        base = cfg.base
        if base.tiny is not None:
            update["base"] = base.model_copy(update={"tiny": base.tiny.model_copy(update={"steps": 3})})
        if cfg.distill is not None:
            t = cfg.distill.teacher
            teacher = t.model_copy(update={"tiny": t.tiny.model_copy(update={"steps": 3})}) if t.tiny else t
            from trainer.dataset import reference_rows, write_rows

            work.mkdir(parents=True, exist_ok=True)
            prompts = write_rows(work / "quick-prompts.jsonl", reference_rows("train")[:24])
            update["distill"] = cfg.distill.model_copy(update={"steps": 3, "teacher": teacher, "prompts": prompts})
        if cfg.finetune is not None:
            update["finetune"] = cfg.finetune.model_copy(update={"steps": 3, "eval_every": 0, "patience": 0})
        update["eval"] = cfg.eval.model_copy(update={"limit": 6})
    if "mode" in changes and cfg.distill is not None:
        update["distill"] = update.get("distill", cfg.distill).model_copy(update={"mode": changes["mode"]})
    if "bundle" in changes:
        update["bundle"] = cfg.bundle.model_copy(update=changes["bundle"])
    update["bundle"] = update.get("bundle", cfg.bundle).model_copy(
        update={"out": work / "dist" / update.get("bundle", cfg.bundle).out.name})
    return cfg.model_copy(update=update)


def build(work: Path, quick: bool) -> dict[str, object]:
    """Run the recipes; return their PipelineResults by name."""
    from slmops.pipeline import packer
    from trainer.pipeline import run

    pack = packer([])  # unsigned: these bundles are measured, not deployed
    runs = {
        "teacher": _config("teacher", work, quick),
        "student-text": _config("student-distilled", work, quick),
        "student-logits": _config("student-distilled", work, quick, mode="logits",
                                  bundle={"name": "triage-student-logits"}),
        "lora": _config("lora", work, quick),
    }
    results = {}
    for name, cfg in runs.items():
        console.rule(f"[bold]recipe {name}")
        results[name] = run(cfg, pack=pack, progress=True, log=lambda line: console.print(f"  {line}"))
    return results


def _step(result, name: str) -> Path:
    return next(s.output for s in result.steps if s.name == name)


def _fp32(hf: Path, work: Path) -> Path:
    from trainer.export import export

    out = work / f"fp32-{hf.parent.name if hf.name == 'merged' else hf.name}"
    if not (out / "genai_config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        export(hf, out, precision="fp32")
    return out


def entries(results: dict, work: Path) -> list[Entry]:
    teacher_hf = _step(results["teacher"], "base")
    student_hf = _step(results["student-text"], "distill") / "merged"
    logits_hf = _step(results["student-logits"], "distill") / "merged"
    lora_out = _step(results["lora"], "finetune")
    base_hf = _step(results["lora"], "base")
    int4 = {name: _step(r, "export") for name, r in results.items()}
    adapter = lora_out / "adapter" / "adapter_model.safetensors"
    tp, sp = params_of(teacher_hf), params_of(student_hf)
    return [
        Entry("teacher-pt", "teacher, PyTorch fp32", teacher_hf, "fp32 (PyTorch)", tp),
        Entry("teacher-fp32", "teacher, onnxruntime-genai fp32", _fp32(teacher_hf, work), "fp32", tp),
        Entry("teacher-int4", "teacher, int4", int4["teacher"], "int4", tp),
        Entry("student-pt", "student distilled on text, PyTorch fp32", student_hf, "fp32 (PyTorch)", sp),
        Entry("student-fp32", "student distilled on text, fp32", _fp32(student_hf, work), "fp32", sp),
        Entry("student-int4", "student distilled on text, int4", int4["student-text"], "int4", sp),
        Entry("logits-int4", "student distilled on logits, int4", int4["student-logits"], "int4", params_of(logits_hf)),
        Entry("lora-int4", "LoRA r8 on a corpus-only base of the teacher's shape, merged, int4", int4["lora"], "int4",
              params_of(base_hf),
              {"adapter_bytes": adapter.stat().st_size,
               "base_bytes": sum(p.stat().st_size for p in base_hf.glob("*.safetensors"))}),
    ]


def measure(rows: list, table: list[Entry], limit: int | None) -> None:
    from trainer.evaluate import Scorer, compare

    reports = compare([e.folder for e in table], rows, scorer=Scorer.of(LABEL_RE), limit=limit, threads=1,
                      progress=True)
    for entry, report in zip(table, reports):
        entry.metrics = report.metrics


def targets(table: list[Entry]) -> list[tuple[str, bool, str]]:
    by = {e.key: e for e in table}
    teacher_acc = by["teacher-pt"].metrics["label_accuracy"]
    student_acc = by["student-int4"].metrics["label_accuracy"]
    keep = student_acc / teacher_acc if teacher_acc else 0.0
    share = by["student-int4"].params / by["teacher-pt"].params
    ratios = {k: by[f"{k}-int4"].metrics["bytes_on_disk"] / by[f"{k}-fp32"].metrics["bytes_on_disk"]
              for k in ("teacher", "student")}
    lora = by["lora-int4"].extra
    adapter = lora["adapter_bytes"] / lora["base_bytes"]
    return [
        ("the distilled int4 student keeps at least 92% of the teacher's accuracy", keep >= 0.92,
         f"{student_acc:.1%} against {teacher_acc:.1%}: {keep:.1%}"),
        ("with at most a quarter of its parameters", share <= 0.25,
         f"{by['student-int4'].params:,} against {by['teacher-pt'].params:,}: {share:.1%}"),
        ("int4 bytes at most 30% of fp32 bytes", max(ratios.values()) <= 0.30,
         ", ".join(f"{k} {v:.1%}" for k, v in ratios.items())),
        ("a LoRA adapter file at most 5% of its base model's bytes", adapter <= 0.05,
         f"{lora['adapter_bytes']:,} against {lora['base_bytes']:,} bytes: {adapter:.1%}"),
    ]


COLUMNS = (("label_accuracy", "label accuracy", "{:.1%}"), ("perplexity", "perplexity", "{:.3f}"),
           ("decode_tokens_per_s", "decode tokens/s", "{:,.0f}"), ("ttft_ms_mean", "TTFT ms", "{:.1f}"),
           ("peak_rss_mb", "peak RSS MB", "{:,.0f}"), ("bytes_on_disk", "bytes on disk", "{:,.0f}"))


def _cell(entry: Entry, metric: str, fmt: str) -> str:
    value = entry.metrics.get(metric)
    return "-" if value is None else fmt.format(value)


def plot(table: list[Entry], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"teacher": "#1f77b4", "student": "#2ca02c", "logits": "#17becf", "lora": "#ff7f0e"}
    for e in table:
        color = colors[e.key.split("-")[0]]
        marker = "s" if "int4" in e.key else "o" if "fp32" in e.key else "^"
        left.scatter(e.metrics["bytes_on_disk"] / 1e6, 100 * e.metrics["label_accuracy"], color=color, marker=marker,
                     s=60)
        left.annotate(e.key, (e.metrics["bytes_on_disk"] / 1e6, 100 * e.metrics["label_accuracy"]), fontsize=7,
                      xytext=(4, 3), textcoords="offset points")
    left.set_xscale("log")
    left.set_xlabel("bytes on disk (MB, log)")
    left.set_ylabel("label accuracy on the test split (%)")
    left.set_title("accuracy against size (square: int4, circle: fp32, triangle: PyTorch)")
    left.grid(alpha=0.3)
    keys = [e.key for e in table]
    right.barh(keys, [e.metrics.get("decode_tokens_per_s", 0) for e in table],
               color=[colors[k.split("-")[0]] for k in keys])
    right.invert_yaxis()
    right.set_xlabel("decode tokens/s (one CPU thread for PyTorch)")
    right.set_title("decode speed")
    right.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(table: list[Entry], checks: list[tuple[str, bool, str]], meta: dict) -> str:
    lines = [
        "# Results: the reference task, end to end",
        "",
        "Rebuilt by `make results` (`python -m bench.results`), which runs the recipes in `recipes/reference/` "
        "through `slmops train pipeline` and scores every model side by side in one run. "
        f"This run: {meta['date']}, {meta['minutes']:.0f} minutes on {meta['host']} ({meta['cores']} cores)"
        + (f", {meta['steps_built']} recipe steps built and {meta['steps_reused']} reused from earlier runs"
           if "steps_built" in meta else "")
        + f"; {meta['rows']} rows of the test split of `slmops-triage-v1`. From nothing, the recipes train for about "
        "20 minutes on 2 cores (the teacher alone about 9).",
        "",
        "- **teacher**: the tiny recipe at 6 layers x 256 (`recipes/reference/teacher.toml`), trained on the "
        "labelled train split.",
        "- **student**: the tiny shape (4 layers x 128), pretrained on the corpus only, then trained only on the "
        "teacher's greedy answers to 6,000 unlabelled log lines (`trainer/data/triage_unlabelled.jsonl`, none of "
        "them in a split): it never reads a label "
        "(`recipes/reference/student-distilled.toml`; `mode = \"text\"`, and `\"logits\"` for soft labels).",
        "- **LoRA**: a rank-8 adapter on every linear layer of a corpus-only base of the teacher's shape (it never "
        "read a labelled answer), trained on the labelled train split "
        "(`recipes/reference/lora.toml`), merged for export.",
        "",
        "![accuracy against size, and decode speed](img/results.png)",
        "",
        "| model | parameters | precision | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|---:|---|" + "---:|" * len(COLUMNS),
    ]
    for e in table:
        cells = [_cell(e, m, f) for m, _, f in COLUMNS]
        lines.append(f"| {e.label} | {e.params:,} | {e.precision} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    for text, ok, figures in checks:
        lines.append(f"- {'met' if ok else '**missed**'}: {text}: {figures}.")
    by = {e.key: e for e in table}
    text_acc, logit_acc = by["student-int4"].metrics["label_accuracy"], by["logits-int4"].metrics["label_accuracy"]
    text_ppl, logit_ppl = by["student-int4"].metrics.get("perplexity"), by["logits-int4"].metrics.get("perplexity")
    verdict = "beat" if logit_acc > text_acc else "tie with" if logit_acc == text_acc else "do not beat"
    lines += [
        "",
        "## Logits or text",
        "",
        f"Teacher and student share a tokenizer, so the student can learn the teacher's whole next-token "
        f"distribution (KL at T = 2, mixed half and half with the text loss) instead of only its greedy text. "
        f"In this run, soft labels {verdict} the teacher's text: {logit_acc:.1%} against {text_acc:.1%} label "
        f"accuracy (int4), perplexity {logit_ppl:.3f} against {text_ppl:.3f}, with the same steps and data.",
        "",
        "## LoRA",
        "",
        f"The adapter holds {by['lora-int4'].extra['adapter_bytes']:,} bytes against "
        f"{by['lora-int4'].extra['base_bytes']:,} of base weights and brings a base that never read a labelled answer "
        f"to {by['lora-int4'].metrics['label_accuracy']:.1%}. The 5% size target bounds the rank: on a model of a few "
        "million parameters rank 8 is near the limit, while on Qwen2.5-0.5B a rank-16 adapter on every linear layer "
        "is under 2% of the base (the same recipe takes `path = \"/models/...\"` in `[base]`).",
        "",
        "## How it was measured",
        "",
        "- Accuracy: greedy answers, the label read by `^(ok|warning|fault): ` (the rule the devices score the "
        "held-out set with). Perplexity: of the reference answers, on the first 50 rows.",
        "- Speed and memory: each model runs alone in a fresh process (`trainer.evaluate.compare`); PyTorch on one "
        "thread. TTFT and decode tokens/s are means over the rows; the box is shared and noisy, so compare the rows "
        "of one run, not runs.",
        f"- Libraries: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps and rows; docs untouched")
    parser.add_argument("--fresh", action="store_true", help="rebuild every step")
    parser.add_argument("--limit", type=int, default=None, help="rows of the test split (default: all)")
    parser.add_argument("--render", type=Path, help="only rewrite docs/results.md from a results JSON of a full run")
    args = parser.parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text(encoding="utf-8"))
        table = [Entry(m["key"], m["label"], Path(m["folder"]), m["precision"], m["params"], m["extra"], m["metrics"])
                 for m in doc["models"]]
        (REPO / "docs" / "results.md").write_text(markdown(table, targets(table), doc["meta"]), encoding="utf-8")
        return 0
    for var in ("ORT_DISABLE_TELEMETRY", "OLIVE_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")
    from trainer.dataset import reference_rows
    from trainer.pipeline import _versions

    start = time.monotonic()
    work = CACHE / ("quick" if args.quick else "full")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    results = build(work, args.quick)
    table = entries(results, work)
    rows = reference_rows("test")
    limit = 10 if args.quick else args.limit
    console.rule("[bold]scoring every model side by side")
    measure(rows, table, limit)
    checks = targets(table)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "minutes": (time.monotonic() - start) / 60,
            "host": platform.node() or "this machine", "cores": os.cpu_count(), "rows": min(limit or len(rows),
                                                                                             len(rows)),
            "versions": _versions(), "quick": args.quick,
            "steps_built": sum(not s.reused for r in results.values() for s in r.steps),
            "steps_reused": sum(s.reused for r in results.values() for s in r.steps)}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "targets": [{"target": t, "met": ok, "figures": f} for t, ok, f in checks],
           "models": [{"key": e.key, "label": e.label, "folder": str(e.folder), "precision": e.precision,
                       "params": e.params, "extra": e.extra, "metrics": e.metrics} for e in table]}
    (out / f"results-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    png = out / f"results-{stamp}.png" if args.quick else REPO / "docs" / "img" / "results.png"
    plot(table, png)
    if not args.quick:
        (REPO / "docs" / "results.md").write_text(markdown(table, checks, meta), encoding="utf-8")
    summary = Table(title="results")
    for col in ("model", "params", *(c[1] for c in COLUMNS)):
        summary.add_column(col)
    for e in table:
        summary.add_row(e.key, f"{e.params:,}", *(_cell(e, m, f) for m, _, f in COLUMNS))
    console.print(summary)
    for text, ok, figures in checks:
        console.print(f"{'[green]met' if ok else '[red]missed'}[/]: {text}: {figures}")
    console.print(f"written: bench/results/results-{stamp}.json, {png.relative_to(REPO)}"
                  + ("" if args.quick else ", docs/results.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
