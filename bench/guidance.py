"""What constrained decoding costs: `python -m bench.guidance [--rounds N] [--model qwen05]`.

Workflow: load each model folder (bench.models builds and caches them) with the agent's own loader, then run the
same prompts round by round, interleaved: free text, `response_format` `json_object`, a JSON schema, and a regex,
each through `agent.openai.guidance` (exactly what the API hands the decoder) and `LoadedModel.steps`. Reports
decode tokens/s, time to first token and the ratio to free text measured in the same round, and writes
`bench/results/guidance-<time>.json`. The token budget is fixed per round so every mode decodes the same count
where its constraint allows (a regex or schema may end earlier; tokens/s is per token produced).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from agent import openai as oa  # noqa: E402
from agent.runtime import LoadedModel, Sampling  # noqa: E402
from agent.store import ModelRef  # noqa: E402

from . import models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = [{"role": "user", "content": "2026-03-02T10:14:07Z pump-17 temp=97.1C vibration=1.4g status=OVERHEAT"}]
SCHEMA = {"type": "object", "properties": {
    "severity": {"enum": ["ok", "warning", "fault"]},
    "device": {"type": "string", "maxLength": 24},
    "readings": {"type": "array", "items": {"type": "number"}, "maxItems": 8},
    "action": {"type": "string"}},
    "required": ["severity", "device", "readings", "action"], "additionalProperties": False}
MODES = {
    "free": None,
    "json_object": oa.ResponseFormat(type="json_object"),
    "json_schema": oa.ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}),
    "regex": oa.ResponseFormat(type="regex", regex="(ok|warning|fault): [a-z0-9 .-]{1,400}"),
}


def run_once(model: LoadedModel, ids: list[int], mode: str, budget: int) -> tuple[int, float, float]:
    """Tokens produced, seconds to the first token, seconds for the rest."""
    sampling = Sampling(max_tokens=budget, guidance=oa.guidance(MODES[mode]))
    started = time.perf_counter()
    first = None
    n = 0
    for _ in model.steps(ids, sampling):
        n += 1
        if first is None:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return n, first or total, total - (first or total)


def bench(name: str, rounds: int, budget: int, progress: Progress) -> dict:
    folder = models.ensure(name)
    model = LoadedModel.load(folder, ModelRef(name, 1))
    ids = model.prompt_ids(PROMPT)
    for mode in MODES:  # warm-up: compiles each grammar once
        run_once(model, ids, mode, 8)
    per: dict[str, dict[str, list[float]]] = {m: {"tps": [], "ttft": [], "ratio": [], "tokens": []} for m in MODES}
    task = progress.add_task(f"{name}: constrained decoding", total=rounds)
    for _ in range(rounds):
        free_tps = None
        for mode in MODES:
            n, ttft, rest = run_once(model, ids, mode, budget)
            tps = (n - 1) / rest if n > 1 and rest > 0 else 0.0
            free_tps = tps if mode == "free" else free_tps
            per[mode]["tps"].append(tps)
            per[mode]["ttft"].append(ttft)
            per[mode]["tokens"].append(n)
            per[mode]["ratio"].append(tps / free_tps if free_tps else 0.0)
        progress.advance(task)
    return {mode: {k: statistics.median(v) for k, v in d.items()} for mode, d in per.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=128, help="tokens per answer")
    parser.add_argument("--model", action="append", choices=["tiny", "qwen05"], help="default: tiny")
    args = parser.parse_args()
    console = Console()
    results = {}
    with Progress(console=console) as progress:
        for name in args.model or ["tiny"]:
            results[name] = bench(name, args.rounds, args.budget, progress)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = RESULTS / f"guidance-{stamp}.json"
    out.write_text(json.dumps({"rounds": args.rounds, "budget": args.budget, "cpus": len(os.sched_getaffinity(0)),
                               "results": results}, indent=2))
    table = Table(title="constrained decoding (medians; ratio to free text in the same round)")
    for col in ("model", "mode", "tokens", "tokens/s", "ratio", "TTFT ms"):
        table.add_column(col, justify="right" if col not in ("model", "mode") else "left")
    for name, res in results.items():
        for mode, r in res.items():
            table.add_row(name, mode, f"{r['tokens']:.0f}", f"{r['tps']:.0f}", f"{r['ratio']:.2f}", f"{r['ttft'] * 1000:.1f}")
    console.print(table)
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
