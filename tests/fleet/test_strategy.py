"""The pure rollout rules: wave sizes, the window, target queries and their refusals, strategy bounds."""

from __future__ import annotations

from datetime import time

import pytest
from pydantic import ValidationError

from fleet.strategy import Step, Strategy, TargetQuery, Window, in_window, plan_waves

PLANS = [
    ("canary-then-halves", 10, dict(canary=Step(count=1), waves=[Step(percent=50), Step(percent=100)]),
     [("canary", 1), ("wave 1", 4), ("wave 2", 5)]),
    ("canary-percent-rounds-up", 10, dict(canary=Step(percent=5), waves=[Step(percent=100)]),
     [("canary", 1), ("wave 1", 9)]),
    ("counts", 10, dict(canary=None, waves=[Step(count=3), Step(count=3), Step(count=1)]),
     [("wave 1", 3), ("wave 2", 3), ("wave 3", 4)]),
    ("last-wave-takes-the-rest", 10, dict(canary=None, waves=[Step(percent=30), Step(percent=60)]),
     [("wave 1", 3), ("wave 2", 7)]),
    ("fewer-devices-than-waves", 2, dict(canary=Step(count=1), waves=[Step(percent=10), Step(percent=20), Step(percent=100)]),
     [("canary", 1), ("wave 3", 1)]),
    ("one-device", 1, dict(canary=Step(count=5), waves=[Step(percent=100)]), [("canary", 1)]),
]


@pytest.mark.parametrize("case, n, strategy, expect", PLANS, ids=[p[0] for p in PLANS])
def test_plan_waves(case: str, n: int, strategy: dict, expect: list) -> None:
    plan = plan_waves(n, Strategy(**strategy))
    assert plan == expect and sum(size for _, size in plan) == n


@pytest.mark.parametrize(
    "start, end, now, inside",
    [("01:00", "05:00", "01:00", True), ("01:00", "05:00", "05:00", False), ("01:00", "05:00", "12:00", False),
     ("22:00", "02:00", "23:30", True), ("22:00", "02:00", "01:59", True), ("22:00", "02:00", "02:00", False)],
)
def test_window(start: str, end: str, now: str, inside: bool) -> None:
    assert in_window(Window(start=start, end=end), time.fromisoformat(now)) is inside
    assert in_window(None, time.fromisoformat(now))


def test_queries_parse_normalise_and_match() -> None:
    q = TargetQuery.parse("tier=a, group=lab,tier=a")
    assert str(q) == "group=lab,tier=a"
    assert q.matches(["lab", "x"], {"tier": "a"}) and not q.matches(["lab"], {"tier": "b"})
    assert not q.matches(["other"], {"tier": "a"})


@pytest.mark.parametrize("text", ["", "site", "=x", "Site=x", "site=", "site=a b", "site=x\n", "a=" + "x" * 65,
                                  ",".join(f"k{i}=v" for i in range(9)), "x" * 601],
                         ids=["empty", "no-eq", "no-key", "upper-key", "no-value", "space", "newline", "long-value",
                              "too-many-terms", "too-long"])
def test_query_refusals(text: str) -> None:
    with pytest.raises(ValueError):
        TargetQuery.parse(text)


@pytest.mark.parametrize(
    "body",
    [dict(waves=[]), dict(waves=[{"count": 1, "percent": 5}]), dict(waves=[{}]), dict(success_threshold=1.5),
     dict(error_threshold=-0.1), dict(max_parallel=0), dict(device_timeout_s=1), dict(timeout_as="ignore"),
     dict(window={"start": "01:00", "end": "01:00"}), dict(canary={"percent": 0}), dict(surprise=True),
     dict(waves=[{"percent": 5}] * 21)],
    ids=["no-waves", "count-and-percent", "neither", "success>1", "error<0", "parallel-0", "timeout-1s",
         "timeout-as", "empty-window", "canary-0", "unknown-field", "too-many-waves"],
)
def test_strategy_refusals(body: dict) -> None:
    with pytest.raises(ValidationError):
        Strategy.model_validate(body)
