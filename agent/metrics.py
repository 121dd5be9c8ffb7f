"""The agent's counters, in Prometheus form; `/metrics` shows them and telemetry reads the same ones.

Workflow: one `Metrics` per agent holds its own registry (no process-global state, so tests can build many). The
scheduler counts queue depth, cancellations, tokens, time to first token and inter-token latency; the API counts
requests by route and status; the command gate counts dropped commands by reason; the model served and the
update state are read at scrape time through callables.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, StateSetMetricFamily

disable_created_metrics()  # the *_created series double the page and say nothing a scraper needs
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
COMMAND_DROP_REASONS = ("forged", "replayed", "reordered", "wrong_origin", "root_unavailable")
UPDATE_STATES = ("idle", "download", "verify", "install", "health_check", "commit", "rollback", "cleanup")


class _Served:
    """The model served, read at scrape time."""

    def __init__(self, model: Callable[[], tuple[str, int] | None]) -> None:
        self.model = model

    def collect(self):
        info = GaugeMetricFamily("slmops_agent_model_info", "The model this agent serves (1), by name and version",
                                 labels=["name", "version"])
        current = self.model()
        if current is not None:
            info.add_metric([current[0], str(current[1])], 1)
        yield info


class _UpdateState:
    """The update state machine's state, read at scrape time."""

    def __init__(self, state: Callable[[], str]) -> None:
        self.state = state

    def collect(self):
        state = self.state()
        states = StateSetMetricFamily("slmops_agent_update_state", "The update state machine's current state")
        states.add_metric([], {s: s == state for s in UPDATE_STATES})
        yield states


class _Outbox:
    """The telemetry outbox: samples waiting for the broker and samples dropped to stay within its bounds."""

    def __init__(self, pending: Callable[[], int], dropped: Callable[[], int]) -> None:
        self.pending, self.dropped = pending, dropped

    def collect(self):
        yield GaugeMetricFamily("slmops_agent_telemetry_pending", "Telemetry samples waiting in the outbox",
                                value=self.pending())
        yield CounterMetricFamily("slmops_agent_telemetry_dropped", "Telemetry samples dropped, oldest first, "
                                  "because the outbox was full", value=self.dropped())


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("slmops_agent_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.queue_depth = Gauge("slmops_agent_queue_depth", "Requests waiting for a generation worker", registry=r)
        self.running = Gauge("slmops_agent_generations_running", "Requests generating now", registry=r)
        self.rejected = Counter("slmops_agent_requests_rejected", "Requests refused with 429 (queue full)", registry=r)
        self.cancelled = Counter("slmops_agent_requests_cancelled",
                                 "Requests ended early: client_gone (hung up), deadline, shutdown", ["reason"], registry=r)
        self.prompt_tokens = Counter("slmops_agent_prompt_tokens", "Prompt tokens read", registry=r)
        self.completion_tokens = Counter("slmops_agent_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("slmops_agent_time_to_first_token_seconds",
                              "From admission to the first generated token (queue wait included)", buckets=_TTFT, registry=r)
        self.itl = Histogram("slmops_agent_inter_token_latency_seconds", "Time between two generated tokens",
                             buckets=_ITL, registry=r)
        self.tokens_per_s = Gauge("slmops_agent_tokens_per_second", "Decode speed of the last finished generation", registry=r)
        for reason in ("client_gone", "deadline", "shutdown"):
            self.cancelled.labels(reason)
        self.commands_dropped = Counter(
            "slmops_agent_commands_dropped", "Fleet commands dropped unacted: forged, replayed, reordered, "
            "wrong_origin (bundle URL off the fleet), root_unavailable (no current trust root)",
            ["reason"], registry=r)
        for reason in COMMAND_DROP_REASONS:
            self.commands_dropped.labels(reason)

    def watch_model(self, model: Callable[[], tuple[str, int] | None]) -> None:
        """Report the served model (name, version), read when scraped."""
        self.registry.register(_Served(model))

    def watch_updates(self, state: Callable[[], str]) -> None:
        """Report the update state, read when scraped."""
        self.registry.register(_UpdateState(state))

    def watch_outbox(self, pending: Callable[[], int], dropped: Callable[[], int]) -> None:
        """Report the telemetry outbox's size and drops, read when scraped."""
        self.registry.register(_Outbox(pending, dropped))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # figures telemetry sends
    def generation_requests(self) -> int:
        return int(sum(s.value for m in self.requests.collect() for s in m.samples
                       if s.name.endswith("_total") and s.labels.get("route") in ("/v1/chat/completions", "/v1/completions")))

    def tokens_generated(self) -> int:
        return int(self.registry.get_sample_value("slmops_agent_completion_tokens_total") or 0)

    def decode_rate(self) -> float:
        return float(self.registry.get_sample_value("slmops_agent_tokens_per_second") or 0.0)
