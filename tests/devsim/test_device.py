"""One simulated device without a network: the reports it sends, in the agent's order, and the commands it drops
(one row per refusal, asserting the reason and that nothing was sent and the accepted seq did not move)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from devsim.behaviour import Durations, Fate, Knobs, eval_of, fate
from devsim.device import SimDevice, Stats, status_report
from devsim.gate import Trust
from protocol.messages import BundleRef, CancelCommand, DeployCommand, encode
from tests.trustkit import ORIGIN, TrustKit

STEPS = ["received", "downloading", "verifying", "installing", "health_check"]
SHA = "ab" * 32


class FakePort:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict, int, bool]] = []
        self.timers: list = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.sent.append((topic, json.loads(payload), qos, retain))

    def later(self, delay_s: float, fn) -> None:
        self.timers.append(fn)

    def drain(self) -> None:
        while self.timers:
            self.timers.pop(0)()

    def reports(self) -> list[dict]:
        return [m for t, m, _, _ in self.sent if t.endswith("/status")]


@pytest.fixture
def kit() -> TrustKit:
    return TrustKit()


def device(kit: TrustKit, **knobs) -> tuple[SimDevice, FakePort, Stats]:
    port, stats = FakePort(), Stats()
    d = SimDevice("dev-1", trust=Trust(kit.roots[1], [ORIGIN]), knobs=Knobs(**knobs), port=port, stats=stats)
    return d, port, stats


def deploy(kit: TrustKit, seq: int, *, dep: str = "d1", version: int = 1, url: str | None = None, sign=True):
    cmd = DeployCommand(deployment_id=dep, device_id="dev-1", seq=seq, sent_at=datetime.now(timezone.utc),
                        bundle=BundleRef(name="tiny", version=version, sha256=SHA, size=10,
                                         url=url or f"{ORIGIN}/api/v1/bundles/tiny/{version}"))
    return kit.sign(cmd) if sign else cmd


def test_reports_in_the_agents_order_and_a_repeat_gets_the_terminal_report_again(kit: TrustKit) -> None:
    d, port, stats = device(kit, eval_metric="accuracy", eval_score=0.93)
    d.connected()
    cmd = encode(deploy(kit, 10))
    d.command(cmd)
    port.drain()
    reports = port.reports()
    assert [r["state"] for r in reports] == [*STEPS, "active"]
    assert reports[-1]["active_version"] == 1 and reports[-1]["error_code"] is None
    assert len({r["seq"] for r in reports}) == 6 and [r["seq"] for r in reports] == sorted(r["seq"] for r in reports)
    presence = [m for t, m, q, r in port.sent if t.endswith("/presence")]
    assert presence[-1]["online"] and presence[-1]["active"] == {"name": "tiny", "version": 1}
    # the fleet asks again (a new seq, same deployment): the same terminal report, nothing runs twice
    d.command(encode(deploy(kit, 11)))
    port.drain()
    again = port.reports()[6:]
    assert [r["state"] for r in again] == ["active"] and again[0]["deployment_id"] == "d1"
    assert stats.resent == 1 and stats.states["active"] == 2


def test_a_failing_bundle_is_rolled_back_and_a_silent_device_stops(kit: TrustKit) -> None:
    d, port, _ = device(kit, fail_bundles=(("tiny", 2),))
    d.command(encode(deploy(kit, 1)))
    port.drain()
    d.command(encode(deploy(kit, 2, dep="d2", version=2)))
    port.drain()
    last = port.reports()[-1]
    assert (last["state"], last["error_code"], last["active_version"]) == ("rolled_back", "health_check", 1)
    s, sport, _ = device(kit, silent_rate=1.0)
    s.command(encode(deploy(kit, 1)))
    sport.drain()
    assert [r["state"] for r in sport.reports()] == ["received", "downloading"]


def test_cancel_and_supersede_like_the_agent(kit: TrustKit) -> None:
    d, port, _ = device(kit)
    d.command(encode(deploy(kit, 1)))  # runs: received, downloading sent; the rest waits on timers
    d.command(encode(kit.sign(CancelCommand(deployment_id="d1", device_id="dev-1", seq=2,
                                            sent_at=datetime.now(timezone.utc)))))
    d.command(encode(deploy(kit, 3, dep="d2", version=2)))
    d.command(encode(deploy(kit, 4, dep="d3", version=3)))  # d2 and d3 wait; d3 is newer for the same bundle
    port.drain()
    ends = [(r["deployment_id"], r["state"], r["error_code"]) for r in port.reports() if r["state"] in
            ("active", "failed", "rolled_back")]
    assert ends == [("d1", "failed", "cancelled"), ("d2", "failed", "superseded"), ("d3", "active", None)]


def test_fate_is_stable_and_eval_goes_in_only_when_on() -> None:
    k = Knobs(fail_rate=0.5, seed=3)
    draws = [fate(k, f"dev-{i}", "d1", ("tiny", 1)) for i in range(200)]
    assert draws == [fate(k, f"dev-{i}", "d1", ("tiny", 1)) for i in range(200)]
    assert 60 < draws.count(Fate.HEALTH_FAIL) < 140
    assert eval_of(Knobs(), Fate.ACTIVE) is None
    assert eval_of(Knobs(eval_metric="accuracy", eval_score=0.8), Fate.ACTIVE) == {"metric": "accuracy", "score": 0.8, "n": 20}
    assert Durations(download_s=1).download_s == 1


def test_status_report_carries_eval_only_when_the_protocol_has_it() -> None:
    r = status_report(device_id="dev-1", deployment_id="d", bundle_name="tiny", bundle_version=1, state="active",
                      eval={"metric": "accuracy", "score": 0.9, "n": 20}, sent_at=datetime.now(timezone.utc))
    assert ("eval" in r.model_dump()) == ("eval" in type(r).model_fields)


def _other_kit_deploy(kit: TrustKit):
    return TrustKit().sign(deploy(kit, 50, sign=False))


REFUSED = [
    ("forged", lambda kit: _other_kit_deploy(kit), "forged"),
    ("unsigned", lambda kit: deploy(kit, 50, sign=False), "forged"),
    ("replayed", lambda kit: deploy(kit, 10), "replayed"),
    ("reordered", lambda kit: deploy(kit, 5), "reordered"),
    ("wrong_origin", lambda kit: deploy(kit, 50, url="http://evil.test/api/v1/bundles/tiny/1"), "wrong_origin"),
    ("newer_root", lambda kit: deploy(kit, 50).model_copy(update={"root_version": 9}), "root_unavailable"),
]


@pytest.mark.parametrize(("make", "reason"), [(m, r) for _, m, r in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_commands_refused(kit: TrustKit, make, reason: str) -> None:
    d, port, stats = device(kit)
    d.command(encode(deploy(kit, 10, dep="first")))
    port.drain()
    sent_before, last_before = len(port.sent), d.guard.last
    d.command(encode(make(kit)))
    port.drain()
    assert stats.dropped == {reason: 1}
    assert len(port.sent) == sent_before and d.guard.last == last_before == 10


def test_an_expired_root_is_refused_at_start() -> None:
    from protocol.errors import ConfigError

    kit = TrustKit(days=1)
    with pytest.raises(ConfigError, match="trust root"):
        Trust(kit.roots[1], clock=lambda: datetime.now(timezone.utc) + timedelta(days=2))
