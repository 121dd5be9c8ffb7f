"""Long fuzz run of every parser of outside input: `python -m bench.fuzz [--examples 100000] [--parser NAME]`.

Workflow: for each parser in `PARSERS` (strategy, check), gathered from `tests/fuzz/`: test_parsers (messages,
envelope, manifest, bundle, root, chat), test_bodies (the fleet's request bodies and bundle upload, mosquitto's
dynamic-security answers, the agent's enrolment answer and identity file) and test_gate (the command gate's stored
state, and refused commands that must leave it byte-identical) and test_trainer_inputs (a task file's lines and a
pipeline recipe), hypothesis generates `--examples`
inputs (generate phase only: no shrinking, no example database, a fresh seed unless `--seed`); each input runs its
check under a `--limit-s` alarm of CPU time (so a busy machine does not turn slow inputs into hangs) and a wall-clock
alarm ten times longer (an input that blocks); the garbage collector is paused while a check runs (a full collection
of the fuzzer's own heap took seconds and was charged to whichever input it fell in). A check that raises anything (an exception type the parser may not
raise, or a broken sink invariant) counts as a crash, keyed by exception type and the line that raised it, with the
smallest input seen for it; an input that outlives an alarm counts as a hang, also when the alarm went off inside code that ignores
exceptions (a gc callback) (an alarm interrupts Python code only, not a single long C call). Prints a summary per parser and writes `bench/results/fuzz-<time>.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.fuzz import test_bodies, test_gate, test_parsers, test_trainer_inputs  # noqa: E402

PARSERS = {**test_parsers.PARSERS, **test_bodies.PARSERS, **test_gate.PARSERS, **test_trainer_inputs.PARSERS}

EXAMPLE_CHARS = 4000  # characters of an input's repr kept in the results
WALL_FACTOR = 10  # an input also counts as a hang after this many times --limit-s of wall-clock time


class Hang(BaseException):
    """An input ran past the per-input limit (a BaseException, so no `except Exception` in a parser swallows it)."""


_fired = False  # set by the alarm: an alarm raised where Python ignores exceptions (a gc callback) still counts


def _alarm(signum: int, frame: object) -> None:
    global _fired
    _fired = True
    raise Hang()


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(REPO) in f.filename and "/.venv/" not in f.filename] or frames
    f = ours[-1]
    return f"{Path(f.filename).relative_to(REPO) if str(REPO) in f.filename else f.filename}:{f.lineno}"


def _record(into: dict, key: str, x: object, exc: BaseException | None, elapsed: float) -> None:
    text = repr(x)
    entry = into.setdefault(key, {"count": 0})
    entry["count"] += 1
    if "input_chars" not in entry or len(text) < entry["input_chars"]:
        entry.update(input_chars=len(text), input=text[:EXAMPLE_CHARS], seconds=round(elapsed, 3),
                     message=str(exc)[:500] if exc else None,
                     traceback="".join(traceback.format_exception(exc)[-6:])[-3000:] if exc else None)


def fuzz(name: str, n: int, limit_s: float, seed_: int | None, advance) -> dict:
    strategy, check = PARSERS[name]
    out: dict = {"inputs": 0, "crashes": {}, "hangs": {}, "slowest_s": 0.0}

    def prop(x: object) -> None:
        global _fired
        out["inputs"] += 1
        _fired = False
        started = time.perf_counter()
        gc.disable()  # a full collection of hypothesis' large heap would be charged to the parser: collect between inputs
        signal.setitimer(signal.ITIMER_PROF, limit_s)  # CPU time: a busy machine does not make an input a hang
        signal.setitimer(signal.ITIMER_REAL, limit_s * WALL_FACTOR)  # wall clock: catches an input that blocks
        try:
            check(x)
            if _fired:  # the alarm went off inside something that ignores exceptions; the input still ran too long
                _record(out["hangs"], "hang", x, Hang("alarm swallowed"), time.perf_counter() - started)
        except Hang as exc:
            _record(out["hangs"], "hang", x, exc, time.perf_counter() - started)
        except Exception as exc:  # the check lets only the parser's typed errors through
            _record(out["crashes"], f"{type(exc).__name__} at {_where(exc)}", x, exc, time.perf_counter() - started)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.setitimer(signal.ITIMER_REAL, 0)
            gc.enable()
            out["slowest_s"] = max(out["slowest_s"], round(time.perf_counter() - started, 3))
            advance()

    test = settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], derandomize=False,
                    suppress_health_check=list(HealthCheck))(given(strategy)(prop))
    if seed_ is not None:
        test = seed(seed_)(test)
    started = time.perf_counter()
    test()
    out["duration_s"] = round(time.perf_counter() - started, 1)
    out["inputs_per_s"] = round(out["inputs"] / max(time.perf_counter() - started, 1e-9), 1)
    out["crash_count"] = sum(c["count"] for c in out["crashes"].values())
    out["hang_count"] = sum(h["count"] for h in out["hangs"].values())
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=100_000, help="inputs per parser")
    p.add_argument("--parser", choices=sorted(PARSERS), action="append", help="only this parser (repeatable)")
    p.add_argument("--limit-s", type=float, default=2.0, help="CPU seconds one input may take before it counts as a hang (wall clock: 10x)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed, to repeat a run")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where results go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = args.parser or list(PARSERS)
    console = Console()
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGPROF, _alarm)
    results = {"meta": {"started": datetime.now(timezone.utc).isoformat(), "examples": args.examples,
                        "limit_s": args.limit_s, "seed": args.seed, "python": sys.version.split()[0]},
               "parsers": {}}
    with Progress(TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[bad]}"), console=console) as progress:
        tasks = {n: progress.add_task(n, total=args.examples, bad="") for n in names}
        for name in names:
            task = tasks[name]
            res = results["parsers"].setdefault(name, {})
            res.update(fuzz(name, args.examples, args.limit_s, args.seed, lambda t=task: progress.advance(t)))
            progress.update(task, completed=res["inputs"], bad=f"crashes {res['crash_count']}, hangs {res['hang_count']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fuzz-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    table = Table(title=f"fuzz: up to {args.examples} inputs per parser, {args.limit_s} s per input")
    for col in ("parser", "inputs", "crashes", "hangs", "slowest s", "time s", "inputs/s", "first crash kinds"):
        table.add_column(col, no_wrap=col != "first crash kinds")
    for name, r in results["parsers"].items():
        table.add_row(name, str(r["inputs"]), str(r["crash_count"]), str(r["hang_count"]), str(r["slowest_s"]),
                      str(r["duration_s"]), f"{r['inputs_per_s']:.0f}", "; ".join(list(r["crashes"])[:3]))
    console.print(table)
    console.print(f"results: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 1 if any(r["crash_count"] or r["hang_count"] for r in results["parsers"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
