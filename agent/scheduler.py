"""Admission, the queue, cancellation, and the generation workers that own the model.

Workflow:
1. `Scheduler.load(folder, ref)` opens a model with the configured thread settings; `swap(model)` makes it the one
   new requests get (requests already admitted keep the model they were admitted with, so a hot swap fails none).
2. An HTTP handler calls `submit(model, ids, sampling, stops)`; it never waits for a lock: the job joins a bounded
   queue or `QueueFull` is raised at once (the API answers 429 with Retry-After).
3. A fixed number of worker threads take jobs in arrival order and run them token by token. Between two tokens a
   worker checks the job's cancel flag and deadline, so a job whose client hung up stops within one token; a job
   cancelled while still queued is removed from the queue and never computed.
4. Results travel back to the handler's event loop as `Piece`, then one `Done` or `Failed`, through an asyncio
   queue fed with `call_soon_threadsafe`; the handler awaits them and holds no thread while it waits.
Stop strings are applied here, so a stop found early also frees the worker early. Counters go to `Metrics`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import SlmopsError

from .config import Serving
from .metrics import Metrics
from .runtime import Completion, LoadedModel, ModelNotLoaded, Sampling, Step
from .store import ModelRef

log = logging.getLogger("slmops.agent.scheduler")
HANDOFF_WAIT_S = 0.05  # seconds a worker waits at most for a handler to send a first piece or a finished answer
WAKE_EVERY_S = 0.004  # seconds: a worker wakes a handler's event loop for new pieces at most this often


class QueueFull(SlmopsError):
    """Every place in the request queue is taken; try again after `retry_after_s` seconds."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(SlmopsError):
    """The request waited in the queue past its deadline and was not computed."""

    code = "timeout"


class Cancelled(SlmopsError):
    """The request was cancelled (its client went away) before a worker took it."""

    code = "cancelled"


class ShuttingDown(SlmopsError):
    """The agent is stopping and takes no more requests."""

    code = "shutting_down"


@dataclass(frozen=True)
class Piece:
    """Text ready to send (stop strings already removed) and the tokens it came from."""

    text: str
    steps: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Done:
    completion: Completion


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Piece | Done | Failed


class StopFilter:
    """Pass text through until a stop string appears; hold back just enough to catch one split across tokens."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        if len(self.buf) > self.hold:
            cut = len(self.buf) - self.hold
            out, self.buf = self.buf[:cut], self.buf[cut:]
            return out, False
        return "", False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass(eq=False)
class Job:
    """One admitted request: its pinned model, prompt, sampling, stop strings, deadline and event channel."""

    model: LoadedModel
    ids: list[int]
    sampling: Sampling
    stops: tuple[str, ...]
    deadline: float  # time.monotonic() value
    loop: asyncio.AbstractEventLoop
    admitted: float = field(default_factory=time.monotonic)
    completion: Completion = field(default_factory=Completion)
    cancel_reason: str | None = None
    stream: bool = False  # the handler streams: the worker lets it send the first piece before going on
    first_sent: threading.Event = field(default_factory=threading.Event, repr=False)  # set by a streaming handler
    delivered: threading.Event = field(default_factory=threading.Event, repr=False)  # set once the answer is sent
    _events: collections.deque = field(default_factory=collections.deque, repr=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _wake_pending: bool = False
    _last_wake: float = 0.0
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _on_cancel: Callable[["Job"], None] | None = field(default=None, repr=False)

    def cancel(self, reason: str = "client_gone") -> None:
        """Stop this job: dropped if still queued, else ended after the current token. Idempotent."""
        if self._cancelled.is_set():
            return
        self.cancel_reason = reason
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """From a worker: queue `event` and wake the handler's loop, once for however many events pile up, and for
        pieces at most every WAKE_EVERY_S (a fast model's tokens then travel in small batches; the end, and the
        first piece, always wake it at once)."""
        self._events.append(event)
        if self._wake_pending:
            return
        now = time.monotonic()
        if isinstance(event, Piece) and self._last_wake and now - self._last_wake < WAKE_EVERY_S:
            return
        self._last_wake = now
        self._wake_pending = True
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the handler's event loop is gone: nobody will read this
            self.cancel("client_gone")

    def _wake(self) -> None:
        self._wake_pending = False
        self._ready.set()

    async def events(self) -> AsyncIterator[Event]:
        """Pieces as they come, then one Done or Failed."""
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, Piece):  # what piled up goes out as one piece: one write, not one per token
                    while self._events and isinstance(self._events[0], Piece):
                        more = self._events.popleft()
                        event = Piece(event.text + more.text, event.steps + more.steps)
                yield event
                if not isinstance(event, Piece):
                    return
            self._ready.clear()
            if not self._events:
                await self._ready.wait()


class Scheduler:
    """Owns the served model and the workers that generate with it."""

    def __init__(self, serving: Serving | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.serving = serving or Serving()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.started = clock()
        self._current: LoadedModel | None = None
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self._closing = False
        self._avg_s = 1.0  # seconds one generation takes, smoothed: for Retry-After
        self._workers: list[threading.Thread] = []
        self.metrics.watch_model(lambda: (m.ref.name, m.ref.version) if (m := self._current) else None)

    # -- the model ------------------------------------------------------------------------------------------
    def load(self, folder: Path, ref: ModelRef) -> LoadedModel:
        return LoadedModel.load(folder, ref, threads=self.serving.intra_op_threads, spinning=self.serving.spinning)

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def swap(self, new: LoadedModel | None) -> LoadedModel | None:
        """Serve `new` to requests admitted from now on; return the model it replaced."""
        with self._cond:
            old, self._current = self._current, new
            return old

    def model(self) -> LoadedModel:
        m = self._current
        if m is None:
            raise ModelNotLoaded("no model is active on this device yet; deploy a bundle from the fleet")
        return m

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def uptime_s(self) -> float:
        return self.clock() - self.started

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        for i in range(self.serving.workers):
            t = threading.Thread(target=self._work, name=f"slmops-generate-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            running = list(self._running)
            self._cond.notify_all()
        self.metrics.queue_depth.set(0)
        for job in waiting:
            job.cancel_reason = "shutdown"
            self.metrics.cancelled.labels("shutdown").inc()
            job.emit(Failed(ShuttingDown("the agent is stopping")))
        for job in running:
            job.cancel("shutdown")
        for t in self._workers:
            t.join(timeout=timeout_s)

    # -- admission ------------------------------------------------------------------------------------------
    def submit(self, model: LoadedModel, ids: list[int], sampling: Sampling, stops: tuple[str, ...] = (),
               *, stream: bool = False, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a job, or raise `QueueFull` at once. Call from the event loop that reads the job's events."""
        job = Job(model=model, ids=ids, sampling=sampling, stops=stops, stream=stream,
                  deadline=self.clock() + self.serving.request_timeout_s,
                  loop=loop or asyncio.get_running_loop(), admitted=self.clock())
        job.completion.prompt_tokens = len(ids)
        job._on_cancel = self._drop
        with self._cond:
            if self._closing:
                raise ShuttingDown("the agent is stopping")
            self.admit_check()
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()
        return job

    def admit_check(self) -> None:
        """Raise `QueueFull` now if a job could not be queued, before a handler spends time tokenizing."""
        if len(self._waiting) >= self.serving.queue_size:
            self.metrics.rejected.inc()
            raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model", self._retry_after())

    def _queue_deadline(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"waited over {self.serving.request_timeout_s:g}s in the queue")

    def _retry_after(self) -> int:
        ahead = len(self._waiting) + len(self._running)
        return max(1, min(60, math.ceil(ahead * self._avg_s / self.serving.workers)))

    def _drop(self, job: Job) -> None:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # already running (it stops after its current token) or finished
            self.metrics.queue_depth.set(len(self._waiting))
        reason = job.cancel_reason or "client_gone"
        self.metrics.cancelled.labels(reason).inc()
        if reason == "deadline":
            job.emit(Failed(self._queue_deadline()))
        else:
            job.emit(Failed(ShuttingDown("the agent is stopping") if reason == "shutdown" else Cancelled("cancelled")))

    def _take(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            job = self._waiting.popleft()
            self._running.add(job)
            self.metrics.queue_depth.set(len(self._waiting))
            return job

    # -- the workers ----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._take()) is not None:
            try:
                self._run(job)
            except Exception as exc:  # a worker outlives any single request
                log.exception("generation failed")
                job.emit(Failed(exc))
            finally:
                with self._cond:
                    self._running.discard(job)

    def _run(self, job: Job) -> None:
        m, out = self.metrics, job.completion
        if self.clock() > job.deadline:
            m.cancelled.labels("deadline").inc()
            job.emit(Failed(self._queue_deadline()))
            return
        m.running.inc()
        started = self.clock()
        times: list[float] = []  # when each token came; histograms are fed after the answer, off the hot loop
        stops = StopFilter(job.stops)
        hit = False
        out.finish_reason = "length"
        try:
            with contextlib.closing(job.model.steps(job.ids, job.sampling)) as steps:
                for step in steps:
                    now = self.clock()
                    times.append(now)
                    out.completion_tokens += 1
                    text, hit = stops.feed(step.text) if stops.stops else (step.text, False)
                    out.text += text
                    job.emit(Piece(text, (step,)))
                    if job.stream and out.completion_tokens == 1:
                        # onnxruntime-genai holds the GIL while it computes a token: pause so the event loop can
                        # send the first piece now instead of between later tokens (time to first token)
                        job.first_sent.wait(HANDOFF_WAIT_S)
                    if hit:
                        out.finish_reason = "stop"
                        break
                    if job.cancelled:
                        break
                    if now > job.deadline:
                        job.cancel_reason = "deadline"
                        break
                else:
                    if out.completion_tokens < job.sampling.max_tokens:
                        out.finish_reason = "stop"
        except Exception as exc:
            job.emit(Failed(exc))
            return
        else:
            m.prompt_tokens.inc(len(job.ids))
        finally:
            m.running.dec()
            m.completion_tokens.inc(out.completion_tokens)
            if times:
                m.ttft.observe(times[0] - job.admitted)
                for a, b in zip(times, times[1:]):
                    m.itl.observe(b - a)
        tail = "" if hit else stops.flush()
        if tail:
            out.text += tail
            job.emit(Piece(tail))
        out.seconds = self.clock() - started
        if out.completion_tokens > 1 and out.seconds > 0:
            m.tokens_per_s.set(out.completion_tokens / out.seconds)
        self._avg_s = 0.8 * self._avg_s + 0.2 * out.seconds
        if job.cancel_reason is not None:
            m.cancelled.labels(job.cancel_reason).inc()
        job.emit(Done(out))
        if self._waiting and job.cancel_reason is None:
            # the next prompt step holds the GIL for as long as it takes: let the handler send this answer first
            job.delivered.wait(HANDOFF_WAIT_S)
