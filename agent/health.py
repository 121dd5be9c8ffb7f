"""The health check a freshly installed model must pass before it serves.

Workflow: load the model folder with onnxruntime-genai (through the scheduler's loader, so it runs with the
serving thread settings), answer each of the manifest's smoke prompts greedily within the time limit, check each
answer against its `expect` regex and the latency budget; then, when the bundle carries a held-out evaluation set
(`eval.heldout`), answer every item of it greedily within the same time limit and score the answers with the set's
rule (`protocol.evalset`): below the bundle's own `min_score` the check fails (`EvalBelowMinimumError`, carrying the
score for the report). Last, check the process memory against the memory budget. Returns the loaded model (so the
switch reuses it) and the aggregate score, or raises `HealthCheckError` with the reason a field engineer needs.
Prompts and answers are never logged or reported; only the aggregate score leaves the device.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from protocol.errors import EvalBelowMinimumError, EvalSetError, HealthCheckError
from protocol.evalset import EvalItem, aggregate, is_right, parse_items
from protocol.manifest import MAX_EVAL_SET_BYTES, Manifest
from protocol.messages import EvalScore

from .runtime import Completion, LoadedModel
from .store import ModelRef


Loader = Callable[[Path, ModelRef], LoadedModel]


@dataclass(frozen=True)
class Passed:
    """A model that passed its health check, and the held-out score it measured (None: the bundle has no set)."""

    model: LoadedModel
    score: EvalScore | None = None


def read_heldout(folder: Path, manifest: Manifest) -> tuple[EvalItem, ...] | None:
    """The items of the bundle's held-out set in `folder` (None: the manifest names none); EvalSetError when the
    file is missing or malformed. The file's hash was checked with the bundle; its size is bounded again here."""
    spec = manifest.eval.heldout
    if spec is None:
        return None
    path = folder / spec.file
    try:
        with path.open("rb") as f:
            data = f.read(MAX_EVAL_SET_BYTES + 1)
    except FileNotFoundError:
        raise EvalSetError(f"the held-out set {spec.file[:80]!r} the manifest names is not in the model folder") from None
    return parse_items(data)


def check(folder: Path, manifest: Manifest, *, timeout_s: float | None = None, load: Loader = LoadedModel.load) -> Passed:
    limit = timeout_s if timeout_s is not None else manifest.health.timeout_s
    deadline = time.monotonic() + limit
    items = read_heldout(folder, manifest)  # a malformed set fails before the model is loaded
    loaded = load(folder, ModelRef(manifest.name, manifest.version))
    for i, smoke in enumerate(manifest.health.prompts, 1):
        started = time.monotonic()
        out = _answer(loaded, [{"role": "user", "content": smoke.prompt}], manifest.health.max_new_tokens, deadline,
                      f"smoke prompt {i}", limit)
        if not re.search(smoke.expect, out.text):
            raise HealthCheckError(
                f"smoke prompt {i} answer {_clip(out.text)!r} does not match the expected pattern {smoke.expect!r}"
            )
        ms = (time.monotonic() - started) * 1000
        budget = manifest.budgets.max_latency_ms
        if budget is not None and ms > budget:
            raise HealthCheckError(f"smoke prompt {i} took {ms:.0f} ms, over the {budget:g} ms latency budget")
    score = _score(loaded, manifest, items, deadline, limit) if items is not None else None
    mem_budget = manifest.budgets.max_memory_mb
    if mem_budget is not None:
        rss = psutil.Process().memory_info().rss / 2**20
        if rss > mem_budget:
            raise HealthCheckError(f"agent uses {rss:.0f} MiB with the model loaded, over the {mem_budget:g} MiB budget")
    return Passed(loaded, score)


def _score(loaded: LoadedModel, manifest: Manifest, items: tuple[EvalItem, ...], deadline: float,
           limit: float) -> EvalScore:
    """Answer every held-out item greedily; the share answered right, or EvalBelowMinimumError under the minimum."""
    spec = manifest.eval.heldout
    assert spec is not None  # items come from it
    rights = []
    for i, item in enumerate(items, 1):
        out = _answer(loaded, item.chat(), spec.max_new_tokens, deadline, f"held-out item {i} of {len(items)}", limit)
        rights.append(is_right(out.text, item.expected, item.match or spec.match))
    score = aggregate(spec.metric, rights)
    if spec.min_score is not None and score.score < spec.min_score:
        raise EvalBelowMinimumError(
            f"the model scored {spec.metric} {score.score:.3f} on its held-out set ({sum(rights)} of {score.n} right), "
            f"below the bundle's minimum {spec.min_score:g}; publish a better model or lower the minimum",
            score=score,
        )
    return score


def _answer(loaded: LoadedModel, messages: list[dict], max_tokens: int, deadline: float, what: str,
            limit: float) -> Completion:
    out = Completion()
    try:
        for _ in loaded.generate(messages, max_tokens=max_tokens, deadline=deadline, out=out):
            pass
    except HealthCheckError:
        raise
    except Exception as exc:
        raise HealthCheckError(f"{what} crashed the model: {exc}") from exc
    if out.finish_reason == "timeout":
        raise HealthCheckError(f"{what} did not finish within the {limit:g}s health-check limit")
    return out


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."
