"""What simulated devices do: step durations, who fails, who falls silent, and the eval score they report.

`Knobs` holds every setting (one place, a unit per field). `fate(knobs, device_id, deployment_id, bundle)` decides
one update's end from a hash of the seed, the device and the deployment, so a rerun with the same seed makes the
same devices fail or fall silent, and a redelivered command never changes its fate. `eval_of(...)` is the one place
that builds the aggregate evaluation score a status report carries (`StatusReport.eval`, when protocol/ has it).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import Enum

from protocol.errors import ConfigError, clip

BUNDLE_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,63}):([0-9]{1,18})")  # NAME:VERSION, fullmatch


class Fate(str, Enum):
    ACTIVE = "active"  # every step passes
    HEALTH_FAIL = "health_fail"  # the health check fails: rolled back, error code health_check
    SILENT = "silent"  # reports stop after downloading; the device never answers this deployment


@dataclass(frozen=True)
class Durations:
    """Simulated seconds each step takes (the agent reports a step when it enters it)."""

    download_s: float = 0.0
    verify_s: float = 0.0
    install_s: float = 0.0
    health_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("download_s", "verify_s", "install_s", "health_s"):
            value = getattr(self, name)
            if not 0 <= value <= 3600:
                raise ConfigError(f"{name} must be 0 to 3600 seconds, not {value}")


def parse_bundle(text: str) -> tuple[str, int]:
    """NAME:VERSION (as --fail-bundle takes it) -> (name, version)."""
    m = BUNDLE_RE.fullmatch(text)
    if m is None:
        raise ConfigError(f"bundle {clip(text)} must be NAME:VERSION, e.g. tiny:3")
    return m.group(1), int(m.group(2))


@dataclass(frozen=True)
class Knobs:
    durations: Durations = field(default_factory=Durations)
    fail_rate: float = 0.0  # share of updates (0-1) whose health check fails
    fail_bundles: tuple[tuple[str, int], ...] = ()  # every device fails the health check of these bundles
    silent_rate: float = 0.0  # share of updates (0-1) after which the device stops reporting mid-update
    telemetry_s: float = 0.0  # seconds between telemetry samples per device; 0: none
    eval_metric: str | None = None  # name of the reported eval metric ("accuracy"); None: no eval in reports
    eval_score: float = 0.9  # the score a passing device measures
    eval_fail_score: float = 0.2  # the score a device measures for a bundle it fails
    eval_n: int = 20  # examples in the bundle's held-out set
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("fail_rate", "silent_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be a share from 0 to 1, not {getattr(self, name)}")
        if self.telemetry_s < 0 or (0 < self.telemetry_s < 0.1):
            raise ConfigError(f"telemetry_s must be 0 (off) or at least 0.1 seconds, not {self.telemetry_s}")
        if not (0 <= self.eval_score <= 1 and 0 <= self.eval_fail_score <= 1 and 1 <= self.eval_n <= 1_000_000):
            raise ConfigError("eval scores must be 0 to 1 and eval_n 1 to 1,000,000")


def _draw(seed: int, *parts: str) -> float:
    """A number in [0, 1) from a hash of the seed and `parts`: the same inputs give the same number."""
    digest = hashlib.blake2b("\x00".join((str(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def fate(knobs: Knobs, device_id: str, deployment_id: str, bundle: tuple[str, int]) -> Fate:
    if bundle in knobs.fail_bundles:
        return Fate.HEALTH_FAIL
    if knobs.silent_rate and _draw(knobs.seed, "silent", device_id, deployment_id) < knobs.silent_rate:
        return Fate.SILENT
    if knobs.fail_rate and _draw(knobs.seed, "fail", device_id, deployment_id) < knobs.fail_rate:
        return Fate.HEALTH_FAIL
    return Fate.ACTIVE


def eval_of(knobs: Knobs, end: Fate) -> dict | None:
    """The aggregate score sent with a terminal report ({"metric", "score", "n"}), or None when eval is off."""
    if knobs.eval_metric is None or end is Fate.SILENT:
        return None
    score = knobs.eval_score if end is Fate.ACTIVE else knobs.eval_fail_score
    return {"metric": knobs.eval_metric, "score": score, "n": knobs.eval_n}
