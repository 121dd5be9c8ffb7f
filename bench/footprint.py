"""The agent's start-up time and idle memory, with no model installed and with each model loaded.

Workflow of `footprint(...)`: for each case start the agent `repeats` times on the same data folder, time process
start until GET /health answers (503 "no_model" without a model, 200 "ok" with one), and on the last start sample
the agent process's resident set size (psutil) after it has sat idle for `settle_s`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .agentproc import AgentProcess, Workspace
from .sample import median


def footprint(ws: Workspace, models: dict[str, Path], *, threads: int, spin: bool, repeats: int, settle_s: float,
              step: Callable[[str], None]) -> dict:
    out = {}
    for name, folder in [("no_model", None), *models.items()]:
        data = ws.data_dir(name, folder)
        startups, rss, os_threads = [], None, None
        for i in range(repeats):
            with AgentProcess(data, ws.trust_root, threads=threads, spin=spin) as agent:
                startups.append(round(agent.start(expect_model=folder is not None), 3))
                if i == repeats - 1:
                    rss = agent.rss_mb(settle_s=settle_s)
                    os_threads = agent.os_threads()
            step(f"{name} start {i + 1}")
        out[name] = {
            "health": "200 ok" if folder else "503 no_model",
            "startup_s": startups,
            "startup_median_s": median(startups),
            "rss_idle_mb": rss,
            "os_threads": os_threads,
        }
    return out
