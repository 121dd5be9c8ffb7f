"""Agent against raw onnxruntime-genai, interleaved round by round on one model.

Workflow of `compare(...)`: load the raw runner and start the agent with the same thread settings, warm both up,
then for each round run every scenario on both sides back to back, alternating which side goes first, so drift
on a noisy machine hits both alike. Scenarios: streaming and non-streaming, 1 and 4 concurrent clients. Four
agent clients send at the same instant; the raw side runs the four requests one after another on its one model,
as a single-worker server does, each timed from the same start (so waiting counts, as it does in the agent's
queue). Per scenario it keeps every round's figures and the agent/raw ratio of each round, oriented so that
higher is better for the agent (rates: agent/raw; times: raw/agent); the reported ratio is their median.
Noise: before each pair it waits (bench.noise) until other processes leave the CPUs alone and measures the CPU
they took during each side; a disturbed pair (foreign load over QUIET_CORES on either side) runs again, up to
`rounds` extra pairs per model. The medians leave out rounds still disturbed, unless fewer than half the rounds
are clean (then they use all, and a warning says so).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .agentproc import AgentProcess, Workspace
from .client import chat, new_client
from .noise import METER, QUIET_CORES
from .raw import RawRunner
from .sample import Sample, median, ratio, summarize

SCENARIOS = (("stream", 1), ("json", 1), ("stream", 4), ("json", 4))
# figure -> True when higher is better (the ratio is agent/raw), False when lower is (raw/agent)
FIGURES = {"decode_tps": True, "aggregate_tps": True, "ttft_s": False, "latency_s": False}
# Every scenario is judged by tokens/s end to end: all tokens over the scenario's wall time, so TTFT, waiting and
# delivery count. The decode rate seen by a client is reported too, but for a model faster than HTTP delivery (the
# tiny one) the answer arrives in bursts and that rate says more about buffering than about speed.
HEADLINE = "aggregate_tps"


def key(mode: str, clients: int) -> str:
    return f"{mode}-{clients}"


def _agent_run(clients, url: str, messages: list[dict], max_tokens: int, stream: bool) -> tuple[list[Sample], float]:
    n = len(clients)
    if n == 1:
        s = chat(clients[0], url, messages, max_tokens, stream=stream)
        return [s], s.total_s
    results: list[Sample | BaseException | None] = [None] * n
    gate = threading.Barrier(n + 1)
    t0: list[float] = []

    def work(i: int) -> None:
        gate.wait()
        try:
            results[i] = chat(clients[i], url, messages, max_tokens, stream=stream, t0=t0[0])
        except BaseException as exc:  # re-raised in the caller
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0.append(time.perf_counter())
    gate.wait()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    samples = [r for r in results if isinstance(r, Sample)]
    return samples, max(s.total_s for s in samples)


def _raw_run(raw: RawRunner, n: int, messages: list[dict], max_tokens: int) -> tuple[list[Sample], float]:
    t0 = time.perf_counter()
    samples = [raw.generate(messages, max_tokens, t0=t0) for _ in range(n)]
    return samples, samples[-1].total_s


def _measured(run: Callable[..., tuple[list[Sample], float]], *args) -> dict:
    """`run(*args)` for one side of a pair: its summary plus the CPU other processes took meanwhile (bench.noise)."""
    snap = METER.snapshot()
    samples, wall = run(*args)
    got = summarize(samples, wall)
    foreign = METER.foreign_cores(snap)
    got["foreign_cores"] = None if foreign is None else round(foreign, 3)
    return got


def _round_ratios(agent: dict, raw: dict) -> dict:
    return {f: ratio(agent[f], raw[f]) if up else ratio(raw[f], agent[f]) for f, up in FIGURES.items()}


def compare(ws: Workspace, name: str, folder, messages: list[dict], *, max_tokens: int, rounds: int, threads: int,
            spin: bool, step: Callable[[str], None], warnings: list[str]) -> dict:
    """Interleaved agent/raw rounds on one model; `step(label)` is called after each side of each scenario."""
    raw = RawRunner(folder, threads, spin)
    prompt_tokens = raw.prompt_tokens(messages)
    agent = AgentProcess(ws.data_dir(name, folder), ws.trust_root, threads=threads, spin=spin)
    try:
        startup_s = agent.start()
        rss_idle = agent.rss_mb()
        clients = [new_client() for _ in range(max(c for _, c in SCENARIOS))]
        for _ in range(2):  # warm-up: first runs allocate buffers and fill caches on both sides
            chat(clients[0], agent.url, messages, max_tokens, stream=True)
            raw.generate(messages, max_tokens)
        per: dict[str, list[dict]] = {key(m, c): [] for m, c in SCENARIOS}
        retries_left = rounds  # disturbed pairs run again, at most this many times per model
        for r in range(rounds):
            for i, (mode, n) in enumerate(SCENARIOS):
                order = ("agent", "raw") if (r + i) % 2 == 0 else ("raw", "agent")
                tries = 0
                while True:
                    tries += 1
                    _, waited = METER.wait_quiet()
                    got = {}
                    for side in order:
                        if side == "agent":
                            got[side] = _measured(_agent_run, clients[:n], agent.url, messages, max_tokens,
                                                  mode == "stream")
                        else:
                            got[side] = _measured(_raw_run, raw, n, messages, max_tokens)
                            if mode == "json":  # the agent's JSON answer has neither, so neither is compared
                                got[side]["ttft_s"] = got[side]["decode_tps"] = None
                        step(f"{name} {key(mode, n)} {side}")
                    clean = all((got[side]["foreign_cores"] or 0.0) < QUIET_CORES for side in got)
                    if clean or retries_left == 0:
                        break
                    retries_left -= 1
                counts = set(got["agent"]["tokens"]) | set(got["raw"]["tokens"])
                if counts != {max_tokens}:
                    warnings.append(f"{name} {key(mode, n)} round {r + 1}: token counts {sorted(counts)}, "
                                    f"asked for {max_tokens}")
                chars = set(got["agent"]["text_chars"]) | set(got["raw"]["text_chars"])
                if len(chars) > 1:  # greedy decoding of the same prompt: both sides should write the same text
                    warnings.append(f"{name} {key(mode, n)} round {r + 1}: answer lengths differ {sorted(chars)}")
                per[key(mode, n)].append({"first": order[0], "clean": clean, "tries": tries,
                                          "waited_for_quiet_s": round(waited, 2), **got,
                                          "ratios": _round_ratios(got["agent"], got["raw"])})
        rss_after = agent.rss_mb()
        agent_threads = agent.os_threads()
        for c in clients:
            c.close()
    finally:
        agent.stop()
        del raw
    scenarios = {}
    for k, rows in per.items():
        used = [row for row in rows if row["clean"]]
        if len(used) * 2 < len(rows):
            warnings.append(f"{name} {k}: only {len(used)} of {len(rows)} rounds ran undisturbed by other "
                            "processes; the medians use all rounds")
            used = rows
        scenarios[k] = {
            "agent": {f: median([row["agent"][f] for row in used]) for f in FIGURES},
            "raw": {f: median([row["raw"][f] for row in used]) for f in FIGURES},
            "ratios": {f: median([row["ratios"][f] for row in used]) for f in FIGURES},
            "rounds_used": len(used),
            "rounds": rows,
        }
    return {
        "max_tokens": max_tokens,
        "prompt_tokens": prompt_tokens,
        "rounds": rounds,
        "agent_startup_s": round(startup_s, 3),
        "agent_rss_idle_mb": rss_idle,
        "agent_rss_after_mb": rss_after,
        "agent_os_threads": agent_threads,
        "scenarios": scenarios,
    }
