"""A rollout's strategy and gate as typed records, and the pure rules the rollout engine applies to them.

Nothing here touches the database or the clock: `fleet.rollouts` reads the stored state, asks these functions what
follows, and writes the answer. Table tests drive each rule directly.

    Strategy        canary, waves, thresholds, parallelism, per-device timeout, maintenance window, rollback
    Gate            minimum eval metrics a bundle must carry (and devices must measure), and no regression
    TargetQuery     "group=lab" or "site=berlin,tier=a": key=value pairs that must all hold for a device
    plan_waves      device count + strategy -> wave sizes (canary first; the last wave takes the remainder)
    judge_wave      a wave's counts + strategy -> advance, abort or wait, with the reason in words
    in_window       whether a UTC time falls in the maintenance window (windows may wrap midnight)
    check_bundle_gate   the manifest's metrics against the gate and against the bundle it replaces

Waves are cumulative shares of the target: `[{"percent": 25}, {"percent": 100}]` after a canary of one means
wave 1 brings the total to 25% of the devices and wave 2 to all of them; `{"count": n}` adds n devices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import time
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.errors import clip

from .errors import GateError

MAX_WAVES = 20
MAX_DEVICES_PER_STEP = 1_000_000
METRIC_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")  # eval metric names, always with fullmatch
TAG_KEY_RE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
TAG_VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_QUERY_TERMS = 8
# Quality metrics where higher is better: the ones `no_regression` compares (latency, sizes and speeds are left to
# budgets, and a noisy speed figure must not block a better model).
QUALITY_RE = re.compile(r"[a-z0-9_]*(accuracy|exact_match|f1|precision|recall|format_rate|score)")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Step(_Record):
    """How many devices a canary or wave adds: a count, or a percent of the whole target (cumulative for waves)."""

    count: int | None = Field(default=None, ge=1, le=MAX_DEVICES_PER_STEP)
    percent: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one(self) -> "Step":
        if (self.count is None) == (self.percent is None):
            raise ValueError("give exactly one of count and percent")
        return self


class Window(_Record):
    """A daily maintenance window in UTC, "HH:MM" to "HH:MM"; a start later than the end wraps midnight."""

    start: time
    end: time

    @model_validator(mode="after")
    def _not_empty(self) -> "Window":
        if self.start == self.end:
            raise ValueError("a maintenance window's start and end must differ")
        return self


class Strategy(_Record):
    canary: Step | None = Step(count=1)  # None: no canary, the first wave starts at once
    waves: list[Step] = Field(default_factory=lambda: [Step(percent=100)], min_length=1, max_length=MAX_WAVES)
    success_threshold: float = Field(default=0.9, ge=0, le=1)  # share of a wave updated (and gated) to start the next
    error_threshold: float = Field(default=0.2, ge=0, le=1)  # share of a wave failed above which the rollout aborts
    max_parallel: int = Field(default=1000, ge=1, le=MAX_DEVICES_PER_STEP)  # devices updating at once
    device_timeout_s: int = Field(default=900, ge=5, le=7 * 86400)  # seconds a device may take after its command
    resend_after_s: int = Field(default=120, ge=1, le=86400)  # seconds of silence before a device is asked again
    timeout_as: Literal["failed", "pending"] = "failed"  # a device past its timeout counts as failed, or stays pending
    window: Window | None = None  # None: any time
    rollback_on_abort: bool = False  # abort sends devices this rollout updated back to the bundle they had
    pause_between_waves: bool = False  # a wave that met its success threshold pauses the rollout: resume starts the next
    download_only: bool = False  # devices download and verify the bundle but do not install it (a later rollout does)

    @classmethod
    def immediate(cls) -> "Strategy":
        """A plain deployment: every device at once, never aborted by failures."""
        return cls(canary=None, waves=[Step(percent=100)], success_threshold=0, error_threshold=1,
                   max_parallel=MAX_DEVICES_PER_STEP)


class Gate(_Record):
    min: dict[str, float] = Field(default_factory=dict, max_length=16)  # metric -> lowest acceptable score (0..1)
    no_regression: bool = True  # refuse a bundle whose metrics fall below the bundle it replaces

    @field_validator("min")
    @classmethod
    def _metrics(cls, v: dict[str, float]) -> dict[str, float]:
        for name, score in v.items():
            if not METRIC_RE.fullmatch(name):
                raise ValueError(f"metric name {clip(name)} is not valid: use 1-64 of a-z, 0-9, '_' starting with a letter")
            if not (isinstance(score, (int, float)) and math.isfinite(score) and 0 <= score <= 1):
                raise ValueError(f"gate for {name} must be a number from 0 to 1")
        return v


@dataclass(frozen=True)
class TargetQuery:
    """Devices a rollout targets: every `key=value` term must hold; the key `group` means group membership."""

    terms: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> "TargetQuery":
        if not isinstance(text, str) or not text or len(text) > 600:
            raise ValueError("a target query is 1-600 characters of key=value pairs separated by commas")
        terms = []
        for part in text.split(","):
            key, eq, value = part.strip(" ").partition("=")  # spaces only: a newline is refused, never trimmed
            if not eq or not TAG_KEY_RE.fullmatch(key) or not TAG_VALUE_RE.fullmatch(value):
                raise ValueError(f"target query term {clip(part)} is not key=value (key: a-z, 0-9, '.', '_', '-'; "
                                 "value: letters, digits, '.', '_', '-')")
            terms.append((key, value))
        if len(terms) > MAX_QUERY_TERMS:
            raise ValueError(f"a target query has at most {MAX_QUERY_TERMS} terms")
        return cls(tuple(sorted(set(terms))))

    @classmethod
    def group(cls, name: str) -> "TargetQuery":
        return cls.parse(f"group={name}")

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.terms)

    def matches(self, groups: Sequence[str], tags: Mapping[str, str]) -> bool:
        return all((value in groups) if key == "group" else tags.get(key) == value for key, value in self.terms)


def plan_waves(n: int, strategy: Strategy) -> list[tuple[str, int]]:
    """(name, size) of each wave for `n` devices: the canary first, then the waves; empty waves are left out and the
    last wave takes whatever the others did not."""
    steps = ([("canary", strategy.canary)] if strategy.canary is not None else []) + [
        (f"wave {i}", w) for i, w in enumerate(strategy.waves, 1)
    ]
    out: list[tuple[str, int]] = []
    taken = 0
    for i, (name, step) in enumerate(steps):
        if i == len(steps) - 1:
            size = n - taken
        elif step.count is not None:
            size = min(step.count, n - taken)
        else:
            assert step.percent is not None
            upto = n if name == "canary" and step.percent >= 100 else math.ceil(n * step.percent / 100 - 1e-9)
            size = max(0, min(upto, n) - taken) if name != "canary" else min(max(1, upto), n - taken)
        if size > 0:
            out.append((name, size))
            taken += size
    return out


class Verdict(str, Enum):
    WAIT = "wait"
    ADVANCE = "advance"
    ABORT = "abort"


@dataclass(frozen=True)
class WaveTally:
    """What a wave's devices have done: `ok` updated and passed the gate; `bad` failed, missed the gate or (when
    the strategy says so) timed out."""

    size: int
    ok: int
    bad: int


def judge_wave(name: str, tally: WaveTally, strategy: Strategy) -> tuple[Verdict, str]:
    """Abort once the failed share passes the error threshold; advance once the updated share reaches the success
    threshold (a threshold of 0 waits until every device of the wave has finished); otherwise wait."""
    if tally.size <= 0:
        return Verdict.ADVANCE, f"{name} is empty"
    bad_share, ok_share = tally.bad / tally.size, tally.ok / tally.size
    if tally.bad and bad_share > strategy.error_threshold:
        return Verdict.ABORT, (f"{name}: {tally.bad} of {tally.size} devices failed ({bad_share:.0%}), above the error "
                               f"threshold of {strategy.error_threshold:.0%}")
    done = tally.ok + tally.bad >= tally.size
    if ok_share >= strategy.success_threshold and (strategy.success_threshold > 0 or done):
        return Verdict.ADVANCE, f"{name}: {tally.ok} of {tally.size} devices updated ({ok_share:.0%})"
    return Verdict.WAIT, f"{name}: {tally.ok} of {tally.size} updated, {tally.bad} failed"


def in_window(window: Window | None, now: time) -> bool:
    if window is None:
        return True
    if window.start < window.end:
        return window.start <= now < window.end
    return now >= window.start or now < window.end


def check_bundle_gate(
    gate: Gate,
    *,
    bundle: str,
    metrics: Mapping[str, float],
    replaced: Mapping[str, Mapping[str, float]],
) -> None:
    """GateError unless the bundle's manifest metrics meet every minimum and, with `no_regression`, are at least
    those of each bundle it replaces (`replaced`: "name vN" -> its metrics) on every quality metric both carry (a
    name `QUALITY_RE` matches, or one the gate names)."""
    for name, floor in sorted(gate.min.items()):
        if name not in metrics:
            have = ", ".join(sorted(metrics)) or "none"
            raise GateError(f"{bundle} carries no {name!r} metric (it has: {have}); the gate needs {name} >= {floor:g}: "
                            "evaluate the model before packing it (slmops train eval)")
        if metrics[name] < floor:
            raise GateError(f"{bundle} scores {name} {metrics[name]:.4g}, below the gate's minimum of {floor:.4g}")
    if gate.no_regression:
        for old, old_metrics in sorted(replaced.items()):
            for name in sorted(set(metrics) & set(old_metrics)):
                if not (QUALITY_RE.fullmatch(name) or name in gate.min):
                    continue
                if metrics[name] < old_metrics[name]:
                    raise GateError(f"{bundle} scores {name} {metrics[name]:.4g}, below the {old_metrics[name]:.4g} of "
                                    f"{old} that it replaces (no_regression); improve the model or set "
                                    "gate.no_regression to false")
