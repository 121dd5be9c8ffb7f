"""The scheduler on its own, over the real tiny model: admission, the bounded queue, cancellation of queued jobs,
deadlines (with an injected clock), shutdown, hot swap, and stop strings split across tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import Serving
from agent.runtime import Sampling
from agent.scheduler import Cancelled, DeadlineExceeded, Done, Failed, Piece, QueueFull, Scheduler, ShuttingDown, StopFilter
from agent.store import ModelRef

PROMPT = [{"role": "user", "content": "gw-3 battery=4% status=LOW"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model(tiny_int4):
    return Scheduler().load(Path(tiny_int4), ModelRef("triage", 1))


async def drain(job) -> list:
    return [event async for event in job.events()]


def prompt_tokens(s: Scheduler) -> float:
    return s.metrics.registry.get_sample_value("slmops_agent_prompt_tokens_total")


def test_a_full_queue_refuses_at_once_with_retry_after(model):
    async def main() -> None:
        s = Scheduler(Serving(queue_size=2))  # no workers started: everything stays queued
        ids = model.prompt_ids(PROMPT)
        s.submit(model, ids, Sampling(max_tokens=4))
        s.submit(model, ids, Sampling(max_tokens=4))
        with pytest.raises(QueueFull) as exc:
            s.submit(model, ids, Sampling(max_tokens=4))
        assert exc.value.retry_after_s >= 1 and s.queued == 2
        assert s.metrics.registry.get_sample_value("slmops_agent_requests_rejected_total") == 1
        s.stop()

    asyncio.run(main())


def test_a_cancelled_queued_job_leaves_the_queue_and_is_never_computed(model):
    async def main() -> None:
        s = Scheduler(Serving(queue_size=4))
        job = s.submit(model, model.prompt_ids(PROMPT), Sampling(max_tokens=4))
        job.cancel()
        assert s.queued == 0
        events = await drain(job)
        assert len(events) == 1 and isinstance(events[0], Failed) and isinstance(events[0].error, Cancelled)
        s.start()
        kept = s.submit(model, model.prompt_ids(PROMPT), Sampling(max_tokens=4))
        assert isinstance((await drain(kept))[-1], Done)
        assert prompt_tokens(s) == len(kept.ids)  # only the kept job was computed
        assert s.metrics.registry.get_sample_value("slmops_agent_requests_cancelled_total", {"reason": "client_gone"}) == 1
        s.stop()

    asyncio.run(main())


def test_a_job_past_its_deadline_when_its_turn_comes_is_not_computed(model):
    async def main() -> None:
        clock = Clock()
        s = Scheduler(Serving(request_timeout_s=1.0), clock=clock)
        job = s.submit(model, model.prompt_ids(PROMPT), Sampling(max_tokens=4))
        clock.now += 5
        s.start()
        events = await drain(job)
        assert isinstance(events[-1], Failed) and isinstance(events[-1].error, DeadlineExceeded)
        assert prompt_tokens(s) == 0
        assert s.metrics.registry.get_sample_value("slmops_agent_requests_cancelled_total", {"reason": "deadline"}) == 1
        s.stop()

    asyncio.run(main())


def test_stopping_fails_queued_jobs_and_refuses_new_ones(model):
    async def main() -> None:
        s = Scheduler()
        jobs = [s.submit(model, model.prompt_ids(PROMPT), Sampling(max_tokens=4)) for _ in range(2)]
        s.stop()
        for job in jobs:
            events = await drain(job)
            assert isinstance(events[-1], Failed) and isinstance(events[-1].error, ShuttingDown)
        with pytest.raises(ShuttingDown):
            s.submit(model, model.prompt_ids(PROMPT), Sampling(max_tokens=4))

    asyncio.run(main())


def test_a_job_finishes_on_the_model_it_was_admitted_with(model, tiny_int4):
    async def main() -> None:
        s = Scheduler().start()
        s.swap(model)
        job = s.submit(s.model(), model.prompt_ids(PROMPT), Sampling(max_tokens=24))
        newer = s.load(Path(tiny_int4), ModelRef("triage", 2))
        assert s.swap(newer) is model and s.current is newer
        events = await drain(job)
        assert isinstance(events[-1], Done) and job.model is model
        assert "".join(e.text for e in events if isinstance(e, Piece)) == events[-1].completion.text
        s.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    "stops, pieces, expected, hit",
    [
        ((), ["fault", ": shut", " down"], "fault: shut down", False),
        ((":",), ["fault", ": shut", " down"], "fault", True),
        (("shut down",), ["fault: sh", "ut d", "own now"], "fault: ", True),
        (("END",), ["abc", "E", "N"], "abcEN", False),  # held back, then flushed at the end
        (("xyz", "ut"), ["fault: sh", "ut"], "fault: sh", True),
    ],
)
def test_stop_strings_are_found_across_token_boundaries(stops, pieces, expected, hit):
    f = StopFilter(stops)
    out, found = "", False
    for piece in pieces:
        text, found = f.feed(piece)
        out += text
        if found:
            break
    if not found:
        out += f.flush()
    assert (out, found) == (expected, hit)
