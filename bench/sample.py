"""One timed generation and the small statistics the benchmark reports.

Workflow: the agent client (`bench.client`) and the raw runner (`bench.raw`) each return a `Sample` per request,
timed from a start instant `t0` the caller gives (so a request that waits behind others counts its wait);
`summarize` turns the samples of one scenario into the figures compared side by side, and `ratio`/`median`
combine rounds.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass
class Sample:
    """One request: seconds from t0 to its first text and to its end, and the tokens it generated."""

    ttft_s: float | None  # None: not measured (non-streaming agent request)
    total_s: float
    tokens: int
    text_chars: int = 0

    @property
    def decode_tps(self) -> float | None:
        """Tokens per second after the first one (streaming only)."""
        if self.ttft_s is None or self.tokens < 2 or self.total_s <= self.ttft_s:
            return None
        return (self.tokens - 1) / (self.total_s - self.ttft_s)

    def as_dict(self) -> dict:
        return {**asdict(self), "decode_tps": self.decode_tps}


def mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def summarize(samples: list[Sample], wall_s: float) -> dict:
    """Per-scenario figures: mean TTFT, mean decode rate, mean latency, and tokens/s over the whole scenario."""
    tokens = sum(s.tokens for s in samples)
    return {
        "ttft_s": mean([s.ttft_s for s in samples]),
        "decode_tps": mean([s.decode_tps for s in samples]),
        "latency_s": mean([s.total_s for s in samples]),
        "aggregate_tps": tokens / wall_s if wall_s > 0 else None,
        "tokens": [s.tokens for s in samples],
        "text_chars": [s.text_chars for s in samples],
        "wall_s": wall_s,
    }
