"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from llmquant.serving.engine import Engine

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "llmquant_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("llmquant_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("llmquant_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("llmquant_finished_requests", "Finished generations by reason", ["reason"], registry=r)
        self.latency = Histogram(
            "llmquant_request_latency_seconds", "End-to-end latency of generation requests", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "llmquant_time_to_first_token_seconds", "Time from submit to the first generated token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        queue = Gauge("llmquant_queue_depth", "Requests waiting for a batch row", registry=r)
        queue.set_function(engine.num_waiting)
        running = Gauge("llmquant_running_requests", "Requests in the running batch", registry=r)
        running.set_function(engine.num_running)
        slots = Gauge("llmquant_batch_slots", "Maximum rows of the running batch", registry=r)
        slots.set(engine.max_batch)

    def render(self) -> bytes:
        return generate_latest(self.registry)
