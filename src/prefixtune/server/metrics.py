"""Prometheus metrics: HTTP-side counters here, engine gauges read from the scheduler at scrape time.

Each app has its own CollectorRegistry, so several servers (tests) in one process do not collide.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
UNKNOWN = "-"  # adapter label of requests that never named a servable model (keeps label cardinality bounded)


class _EngineCollector:
    """Reads the scheduler's counters when /metrics is scraped (no work on the decode path)."""

    def __init__(self, scheduler, loaded: Callable[[], int], served: Callable[[], int]):
        self.scheduler, self.loaded, self.served = scheduler, loaded, served

    def collect(self):
        s = self.scheduler
        st = s.stats
        yield GaugeMetricFamily("prefixtune_queue_depth", "Rows waiting to join the running batch", value=s.waiting)
        yield GaugeMetricFamily("prefixtune_running_rows", "Rows in the running batch", value=s.running)
        yield GaugeMetricFamily("prefixtune_batch_size", "Rows in the latest decode step", value=st.last_batch_size)
        yield GaugeMetricFamily("prefixtune_max_batch", "Configured --max-batch", value=s.max_batch)
        yield GaugeMetricFamily("prefixtune_tokens_per_second", "Generated tokens/s over the last 10 s",
                                value=st.tokens_per_second())
        yield CounterMetricFamily("prefixtune_decode_steps", "Decode steps", value=st.steps)
        yield CounterMetricFamily("prefixtune_decode_rows", "Sum of batch sizes over decode steps",
                                  value=st.step_rows)
        yield CounterMetricFamily("prefixtune_prompt_tokens", "Prompt tokens prefilled", value=st.prompt_tokens)
        yield CounterMetricFamily("prefixtune_generated_tokens", "Tokens generated", value=st.generated_tokens)
        finished = CounterMetricFamily("prefixtune_finished_rows", "Finished rows by finish reason",
                                       labels=["reason"])
        for reason, count in sorted(st.finished.items()):
            finished.add_metric([reason], count)
        yield finished
        yield GaugeMetricFamily("prefixtune_loaded_adapters", "Adapters whose prefix is in memory",
                                value=self.loaded())
        yield GaugeMetricFamily("prefixtune_served_adapters", "Adapters listed by /v1/models", value=self.served())
        if hasattr(s, "restarts"):  # a supervised engine process
            yield CounterMetricFamily("prefixtune_engine_restarts", "Engine processes started again after one died",
                                      value=s.restarts)


class ServerMetrics:
    def __init__(self, scheduler, loaded: Callable[[], int], served: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("prefixtune_requests", "Generation requests by adapter and HTTP status",
                                ["adapter", "status"], registry=self.registry)
        self.ttft = Histogram("prefixtune_time_to_first_token_seconds", "Arrival to first generated text",
                              ["adapter"], registry=self.registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.registry.register(_EngineCollector(scheduler, loaded, served))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts generation requests by adapter and final status; handlers name the adapter in scope["state"]."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        status = 500
        state = scope.setdefault("state", {})  # the same dict request.state writes to, even if scope is copied

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            adapter = state.get("adapter", UNKNOWN)
            self.metrics.requests.labels(adapter=adapter, status=str(status)).inc()
