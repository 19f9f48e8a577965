"""The engine's Prometheus metrics, on a registry of its own (served at `/metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("loramill_engine_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("loramill_engine_requests_waiting", "Requests waiting for admission", registry=r)
        self.prompt_tokens = Counter("loramill_engine_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("loramill_engine_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("loramill_engine_requests_finished", "Finished requests by reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("loramill_engine_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loramill_engine_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter_events = Counter("loramill_engine_adapter_events",
                                      "Adapter slot cache: loads into a slot, evictions from one, hits on a resident one",
                                      ["event"], registry=r)
        self.adapter_reads = Counter("loramill_engine_adapter_reads", "Adapters read from disk into the host cache",
                                     registry=r)

    def adapter_event(self, event: str) -> None:
        self.adapter_events.labels(event).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
