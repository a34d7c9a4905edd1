"""Counters, gauges and histograms of the service in Prometheus' text exposition format (version 0.0.4).

Written here rather than with ``prometheus_client``: five metric families need some 60 lines, and
the service then adds no dependency beyond its ASGI stack (our choice; docs/serve.md).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds, upper bounds of the request-latency histogram."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
        for k, v in pairs
    )
    return "{" + ",".join(escaped) + "}"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: tuple[tuple[str, str], ...]) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f"{name}_bucket{_labels((*labels, ('le', le)))} {running}")
        out.append(f"{name}_sum{_labels(labels)} {self.total:.6f}")
        out.append(f"{name}_count{_labels(labels)} {running}")
        return out


class Metrics:
    """The service's metrics; every method is thread-safe."""

    def __init__(self, queue_depth: Callable[[], dict[str, int]]) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self._decisions: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self._latency: dict[tuple[tuple[str, str], ...], _Histogram] = {}
        self._batches: dict[tuple[tuple[str, str], ...], _Histogram] = {}
        self._queue_depth = queue_depth

    def request(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered on ``route`` (the route template, never the raw path)."""
        key = (("route", route), ("status", str(status)))
        with self._lock:
            self._requests[key] += 1
            self._latency.setdefault((("route", route),), _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def decision(self, model: str, outcome: str) -> None:
        """One image decided (``anomalous``, ``normal``) or failed (``error``)."""
        with self._lock:
            self._decisions[(("model", model), ("outcome", outcome))] += 1

    def batch(self, model: str, size: int) -> None:
        with self._lock:
            self._batches.setdefault((("model", model),), _Histogram(BATCH_BUCKETS)).observe(size)

    def render(self) -> str:
        """The exposition text."""
        with self._lock:
            lines = [
                "# HELP spotdiff_requests_total HTTP requests answered, by route and status.",
                "# TYPE spotdiff_requests_total counter",
            ]
            lines += [f"spotdiff_requests_total{_labels(k)} {v}" for k, v in sorted(self._requests.items())]
            lines += [
                "# HELP spotdiff_decisions_total Images decided, by model and outcome.",
                "# TYPE spotdiff_decisions_total counter",
            ]
            lines += [f"spotdiff_decisions_total{_labels(k)} {v}" for k, v in sorted(self._decisions.items())]
            lines += [
                "# HELP spotdiff_request_duration_seconds Request latency.",
                "# TYPE spotdiff_request_duration_seconds histogram",
            ]
            for k, h in sorted(self._latency.items()):
                lines += h.lines("spotdiff_request_duration_seconds", k)
            lines += ["# HELP spotdiff_batch_size Images per model batch.", "# TYPE spotdiff_batch_size histogram"]
            for k, h in sorted(self._batches.items()):
                lines += h.lines("spotdiff_batch_size", k)
        lines += [
            "# HELP spotdiff_queue_depth Images waiting or being scored, by model.",
            "# TYPE spotdiff_queue_depth gauge",
        ]
        lines += [f"spotdiff_queue_depth{_labels((('model', m),))} {n}" for m, n in sorted(self._queue_depth().items())]
        return "\n".join(lines) + "\n"
