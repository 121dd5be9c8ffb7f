"""Agent inference benchmark: `python -m bench.agent [--quick]` (or `make bench`).

Workflow:
1. build or reuse the models under `.cache/bench/` (bench.models): the tiny model, and in a full run a
   Qwen2.5-0.5B-shaped model with random weights, both exported to int4 with end-of-sequence unreachable;
2. footprint (bench.footprint): agent start-up time to /health and idle RSS, with no model and with each model;
3. for each model, agent and raw onnxruntime-genai interleaved round by round (bench.scenarios): streaming and
   non-streaming, 1 and 4 clients, with the thread settings given here (default: the agent's, 0 threads = one
   per core, no spinning), reported as agent/raw ratios against the 0.95 target;
4. thread sweep (bench.sweep): threads {1, 2} x spinning {on, off}, idle and with CPU 0 busy, on both sides;
5. write `bench/results/agent-<time>.json` and `.png` (bench.report) and print a summary.
The agent runs as a real subprocess (`slmops agent run`), driven only through its command line and HTTP API.
`--quick`: tiny model only, 6 rounds, a short sweep: about a minute once the tiny model is cached.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

for _var in ("ORT_DISABLE_TELEMETRY", "OLIVE_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from . import models  # noqa: E402
from .agentproc import AgentStartError, Workspace  # noqa: E402
from .client import AgentError  # noqa: E402
from .footprint import footprint  # noqa: E402
from .report import summary, write  # noqa: E402
from .scenarios import SCENARIOS, compare  # noqa: E402
from .sweep import LOADS, SETTINGS, sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = (
    "You triage device logs for a field engineer. Read these lines and answer with the status (ok, warning or "
    "fault) and the action to take.\n"
    "2026-03-12T05:22:25Z gw-59 uplink=wifi rssi=-73dBm loss=0.5% link=up\n"
    "2026-03-29T07:57:14Z bat-117 battery=5% voltage=3.03V\n"
    "2026-04-23T21:16:06Z pump-32 temp=61.7C vibration=0.2g status=RUNNING"
)
MESSAGES = [{"role": "user", "content": PROMPT}]
# Per model: interleaved rounds (tiny requests take tens of milliseconds and are noisy, so they get more) and tokens
# per request; the sweep runs on one model with a fixed token count in every cell.
FULL = {
    "models": ("tiny", "qwen05"),
    "rounds": {"tiny": 12, "qwen05": 6},
    "max_tokens": {"tiny": 256, "qwen05": 96},
    "sweep_model": "qwen05",
    "sweep_rounds": 3,
    "sweep_tokens": {"tiny": 128, "qwen05": 48},
    "footprint_repeats": 3,
}
QUICK = {
    "models": ("tiny",),
    "rounds": {"tiny": 6, "qwen05": 2},
    "max_tokens": {"tiny": 256, "qwen05": 64},
    "sweep_model": "tiny",
    "sweep_rounds": 2,
    "sweep_tokens": {"tiny": 128, "qwen05": 32},
    "footprint_repeats": 1,
}


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _meta(args, plan: dict) -> dict:
    return {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, "-m", "bench.agent", *sys.argv[1:]]),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "agent_uncommitted_changes": bool(_git("status", "--porcelain", "--", "agent")),
        "host": {"cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(), "python": platform.python_version()},
        "versions": {lib: version(lib) for lib in ("onnxruntime-genai", "onnxruntime", "fastapi", "uvicorn", "httpx")},
        "settings": {"threads": args.threads, "spin": args.spin, "workers": 1},
        "plan": {k: v for k, v in plan.items() if k != "models"} | {"models": list(plan["models"])},
        "prompt": PROMPT,
        "notes": [
            "ratios are oriented so that higher is better for the agent: rates agent/raw, times raw/agent",
            "raw with 4 clients runs the 4 requests one after another on one model (a single-worker server); "
            "every request is timed from the common start, so waiting counts on both sides",
            "TTFT: request start to the first non-empty text; decode tok/s: (tokens - 1) / (end - first text)",
            "end-of-sequence is unreachable in the bench models, so every request generates exactly max_tokens",
        ],
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only, few rounds (about a minute when cached)")
    p.add_argument("--models", help="comma-separated subset of: tiny, qwen05")
    p.add_argument("--rounds", type=int, help="interleaved rounds per model")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for the comparison (0: one per core)")
    p.add_argument("--spin", action=argparse.BooleanOptionalAction, default=False, help="spinning for the comparison")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the thread sweep")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where results go")
    return p.parse_args(argv)


def _measure(ws: Workspace, plan: dict, args: argparse.Namespace, folders: dict[str, Path], results: dict,
             console: Console) -> None:
    """Steps 2-4 of the workflow, with a progress bar per step; fills `results`."""
    columns = (TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        def stepper(task):
            return lambda what: bar.update(task, advance=1, description=what[:44])

        task = bar.add_task("footprint", total=(1 + len(folders)) * plan["footprint_repeats"])
        results["footprint"] = footprint(ws, folders, threads=args.threads, spin=args.spin,
                                         repeats=plan["footprint_repeats"], settle_s=2.0, step=stepper(task))
        results["comparison"] = {}
        for name, folder in folders.items():
            rounds = plan["rounds"][name]
            task = bar.add_task(f"{name}: agent vs raw", total=rounds * len(SCENARIOS) * 2)
            results["comparison"][name] = compare(
                ws, name, folder, MESSAGES, max_tokens=plan["max_tokens"][name], rounds=rounds,
                threads=args.threads, spin=args.spin, step=stepper(task), warnings=results["warnings"])
        if args.sweep:
            name = plan["sweep_model"]
            task = bar.add_task(f"sweep on {name}", total=len(LOADS) * len(SETTINGS) * plan["sweep_rounds"] * 2)
            results["sweep"] = sweep(ws, name, folders[name], MESSAGES, rounds=plan["sweep_rounds"],
                                     tokens=plan["sweep_tokens"][name], step=stepper(task))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.models:
        plan["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
        unknown = set(plan["models"]) - set(models.LABELS)
        if unknown:
            sys.exit(f"unknown model(s): {', '.join(sorted(unknown))}; choose from {', '.join(models.LABELS)}")
        if plan["sweep_model"] not in plan["models"]:
            plan["sweep_model"] = plan["models"][-1]
    if args.rounds:
        plan["rounds"] = {name: args.rounds for name in plan["models"]}
    console = Console()
    results: dict = {"meta": _meta(args, plan), "models": {}, "warnings": []}
    started = time.perf_counter()

    folders = {}
    for name in plan["models"]:
        with console.status(f"building or loading {models.LABELS[name]} (cached under {models.CACHE})"):
            t = time.perf_counter()
            folders[name] = models.ensure(name)
        results["models"][name] = models.meta(folders[name]) | {"ready_s_this_run": round(time.perf_counter() - t, 1)}
        console.log(f"model {name}: {folders[name]} ({results['models'][name]['ready_s_this_run']} s)")

    ws = Workspace(Path(tempfile.mkdtemp(prefix="run-", dir=models.CACHE)))
    try:
        _measure(ws, plan, args, folders, results, console)
    except (AgentStartError, AgentError) as exc:
        console.print(f"[red]the agent failed:[/] {exc}")
        console.print("If agent/ is being edited right now, run the benchmark again in a few minutes.")
        return 1
    finally:
        ws.close()
    results["meta"]["duration_s"] = round(time.perf_counter() - started, 1)
    json_path, png_path = write(results, args.out)
    for table in summary(results):
        console.print(table)
    for w in results["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"results: {json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path}")
    console.print(f"plot:    {png_path.relative_to(REPO) if png_path.is_relative_to(REPO) else png_path}")
    console.print(f"took {results['meta']['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
