"""The health check a freshly installed model must pass before it serves.

Workflow: load the model folder with onnxruntime-genai (through the scheduler's loader, so it runs with the
serving thread settings), answer each of the manifest's smoke prompts greedily
within the time limit, check each answer against its `expect` regex and the latency budget, and check the
process memory against the memory budget. Returns the loaded model (so the switch reuses it) or raises
`HealthCheckError` with the reason a field engineer needs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from protocol.errors import HealthCheckError
from protocol.manifest import Manifest

from .runtime import Completion, LoadedModel
from .store import ModelRef


Loader = Callable[[Path, ModelRef], LoadedModel]


def check(folder: Path, manifest: Manifest, *, timeout_s: float | None = None, load: Loader = LoadedModel.load) -> LoadedModel:
    limit = timeout_s if timeout_s is not None else manifest.health.timeout_s
    deadline = time.monotonic() + limit
    loaded = load(folder, ModelRef(manifest.name, manifest.version))
    for i, smoke in enumerate(manifest.health.prompts, 1):
        out = Completion()
        started = time.monotonic()
        try:
            for _ in loaded.generate(
                [{"role": "user", "content": smoke.prompt}],
                max_tokens=manifest.health.max_new_tokens,
                deadline=deadline,
                out=out,
            ):
                pass
        except HealthCheckError:
            raise
        except Exception as exc:
            raise HealthCheckError(f"smoke prompt {i} crashed the model: {exc}") from exc
        if out.finish_reason == "timeout":
            raise HealthCheckError(f"smoke prompt {i} did not finish within the {limit:g}s health-check limit")
        if not re.search(smoke.expect, out.text):
            raise HealthCheckError(
                f"smoke prompt {i} answer {_clip(out.text)!r} does not match the expected pattern {smoke.expect!r}"
            )
        ms = (time.monotonic() - started) * 1000
        budget = manifest.budgets.max_latency_ms
        if budget is not None and ms > budget:
            raise HealthCheckError(f"smoke prompt {i} took {ms:.0f} ms, over the {budget:g} ms latency budget")
    mem_budget = manifest.budgets.max_memory_mb
    if mem_budget is not None:
        rss = psutil.Process().memory_info().rss / 2**20
        if rss > mem_budget:
            raise HealthCheckError(f"agent uses {rss:.0f} MiB with the model loaded, over the {mem_budget:g} MiB budget")
    return loaded


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."
