"""Thread settings chosen by measurement: intra-op threads {1, 2} x spinning {on, off}, idle and with a busy core.

Workflow of `sweep(...)`: for each load ("idle"; "busy": another process spinning on CPU 0, see bench.hog) and each
setting, load the raw runner and start the agent with that setting (`--threads N --spin/--no-spin`), warm both up,
then run `rounds` pairs of single-client streaming requests of `tokens` tokens (the same in every cell), alternating
which side goes first; a pair disturbed by another process (bench.noise) runs once more. Each cell records, per
side, the median end-to-end tokens/s (tokens / request time: settings are ranked by it), decode tokens/s and TTFT;
the agent's OS thread count (evidence of whether it applied the setting); and the most CPU other processes took
during one of its pairs. `choose(cells)` names the best setting per side and load, and the robust one: the setting
whose worse load keeps the largest share of that load's best rate.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

from .agentproc import AgentProcess, Workspace
from .client import chat, new_client
from .hog import busy_core
from .noise import METER, QUIET_CORES
from .raw import RawRunner
from .sample import Sample, median

SETTINGS = ((1, False), (1, True), (2, False), (2, True))  # (intra-op threads, spinning)
LOADS = ("idle", "busy")
FIGURE = "e2e_tps"  # settings are ranked by tokens / request time (prompt, decode and delivery together)


def label(threads: int, spin: bool) -> str:
    return f"{threads}t {'spin' if spin else 'no-spin'}"


def _pair(raw: RawRunner, client, url: str, messages, tokens: int, order: tuple[str, str],
          step: Callable[[str], None]) -> tuple[dict[str, Sample], float]:
    """One request per side in `order`; the samples and the most CPU other processes took during one of them."""
    got, foreign = {}, 0.0
    for side in order:
        snap = METER.snapshot()
        if side == "raw":
            got[side] = raw.generate(messages, tokens)
        else:
            got[side] = chat(client, url, messages, tokens, stream=True)
        foreign = max(foreign, METER.foreign_cores(snap) or 0.0)
        step(side)
    return got, foreign


def _cell(ws: Workspace, name: str, folder, messages, *, threads: int, spin: bool, rounds: int, tokens: int,
          step: Callable[[str], None]) -> dict:
    raw = RawRunner(folder, threads, spin)
    try:
        with AgentProcess(ws.data_dir(name, folder), ws.trust_root, threads=threads, spin=spin) as agent:
            agent.start()
            client = new_client()
            raw.generate(messages, tokens)  # warm-up on both sides
            chat(client, agent.url, messages, tokens, stream=True)
            got: dict[str, list[Sample]] = {"raw": [], "agent": []}
            foreign, retried = [], 0
            for r in range(rounds):
                order = ("agent", "raw") if r % 2 == 0 else ("raw", "agent")
                METER.wait_quiet()
                pair, load = _pair(raw, client, agent.url, messages, tokens, order, step)
                if load >= QUIET_CORES:  # disturbed by another process: one more try
                    retried += 1
                    METER.wait_quiet()
                    pair, load = _pair(raw, client, agent.url, messages, tokens, order, step)
                foreign.append(load)
                for side, sample in pair.items():
                    got[side].append(sample)
            os_threads = agent.os_threads()
            client.close()
    finally:
        del raw
    cell = {"threads": threads, "spin": spin, "label": label(threads, spin), "tokens": tokens,
            "agent_os_threads": os_threads, "foreign_cores_max": round(max(foreign), 3), "retried_pairs": retried,
            "disturbed": max(foreign) >= QUIET_CORES}
    for side, samples in got.items():
        cell[side] = {
            "e2e_tps": median([s.tokens / s.total_s for s in samples]),
            "decode_tps": median([s.decode_tps for s in samples]),
            "ttft_s": median([s.ttft_s for s in samples]),
            "token_counts": [s.tokens for s in samples],
        }
    return cell


def sweep(ws: Workspace, name: str, folder, messages, *, rounds: int, tokens: int,
          step: Callable[[str], None]) -> dict:
    results: dict[str, list[dict]] = {}
    for load in LOADS:
        with busy_core(0) if load == "busy" else nullcontext():
            results[load] = [
                _cell(ws, name, folder, messages, threads=t, spin=s, rounds=rounds, tokens=tokens,
                      step=lambda side, load=load, t=t, s=s: step(f"{load} {label(t, s)} {side}"))
                for t, s in SETTINGS
            ]
    return {"model": name, "rounds": rounds, "tokens": tokens, "loads": results, "choice": choose(results)}


def choose(loads: dict[str, list[dict]]) -> dict:
    """Best setting per side and load, and per side the robust one (largest worst-case share of the best)."""
    out: dict[str, dict] = {}
    for side in ("raw", "agent"):
        best = {}
        for load, cells in loads.items():
            top = max(cells, key=lambda c: c[side][FIGURE] or 0)
            best[load] = {"setting": top["label"], FIGURE: top[side][FIGURE]}
        shares = {}
        for i, (t, s) in enumerate(SETTINGS):
            shares[label(t, s)] = min(
                (cells[i][side][FIGURE] or 0) / (best[load][FIGURE] or 1) for load, cells in loads.items()
            )
        robust = max(shares, key=shares.get)
        out[side] = {"best": best, "worst_case_share": shares, "robust": robust}
    return out
