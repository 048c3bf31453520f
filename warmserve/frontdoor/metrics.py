"""Prometheus metrics of one front door, in a registry of its own so that several apps in one
process (tests, benchmarks) do not share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# From a warm instance's milliseconds to a cold start's tens of seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    """Per-model request counts by outcome, TTFT and TPOT, queue depth and requests running."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "warmserve_requests",
            "Requests answered, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "warmserve_ttft_seconds",
            "Time from receiving a request to its first token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "warmserve_tpot_seconds",
            "Mean time per output token after the first, per request.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.queued = Gauge(
            "warmserve_queue_depth",
            "Requests waiting for room on an instance.",
            ["model"],
            registry=self.registry,
        )
        self.running = Gauge(
            "warmserve_requests_running",
            "Requests routed to an instance and not finished.",
            ["model"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
