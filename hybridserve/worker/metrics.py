"""Worker Prometheus metrics under vLLM's names, so one dashboard reads both engines.

Gauges and token counters are read from `engine.stats()` at scrape time (a custom
collector: nothing to keep in sync); latency histograms are observed once per
finished engine request from its `RequestMetrics`.
"""
from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector:
    """Exports the engine's live counts each time /metrics is scraped."""

    def __init__(self, model_name: str, stats_fn: Callable[[], Any]):
        self.model_name = model_name
        self.stats_fn = stats_fn

    def collect(self):
        s = self.stats_fn()
        labels = ["model_name"]
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch.", s.num_running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("vllm:kv_cache_usage_perc", "Share (0..1) of KV blocks and state slots in use.",
             s.kv_cache_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], float(value))
            yield g
        shed = CounterMetricFamily("hybridserve:requests_shed", "Requests refused with 429 (Retry-After).",
                                   labels=["model_name", "reason"])
        shed.add_metric([self.model_name, "queue_full"], float(getattr(s, "requests_shed_total", 0)))
        yield shed
        tokens = CounterMetricFamily("hybridserve:scheduled_tokens", "Tokens computed, by priority class.",
                                     labels=["model_name", "priority"])
        for prio in ("interactive", "batch"):
            tokens.add_metric([self.model_name, prio], float(getattr(s, f"{prio}_tokens_total", 0)))
        yield tokens
        queued = GaugeMetricFamily("hybridserve:num_requests_waiting_by_priority", "Waiting requests, by class.",
                                   labels=["model_name", "priority"])
        batch_waiting = getattr(s, "num_waiting_batch", 0)
        queued.add_metric([self.model_name, "interactive"], float(s.num_waiting - batch_waiting))
        queued.add_metric([self.model_name, "batch"], float(batch_waiting))
        yield queued
        for name, doc, value in (
            ("vllm:prompt_tokens", "Prefill tokens processed.", s.prompt_tokens_total),
            ("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             getattr(s, "prefix_cache_queries_total", 0)),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             getattr(s, "prefix_cache_hits_total", 0)),
            ("hybridserve:guided_requests", "Requests admitted with a grammar (structured outputs).",
             getattr(s, "guided_requests_total", 0)),
            ("hybridserve:guided_mask_seconds", "Seconds spent filling and applying grammar token masks.",
             getattr(s, "guided_mask_seconds_total", 0.0)),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model_name], float(value))
            yield c


class WorkerMetrics:
    """The worker's registry: engine gauges plus per-request latency histograms."""

    def __init__(self, model_name: str, stats_fn: Callable[[], Any]):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(model_name, stats_fn))
        kw: dict[str, Any] = {"labelnames": ["model_name"], "registry": self.registry}
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, **kw).labels(model_name)
        # vLLM's V1 name for the per-request mean (its older `vllm:time_per_output_token_seconds`
        # is gone), so one dashboard reads both engines
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds",
                              "Mean time per output token of each finished request.",
                              buckets=TPOT_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=E2E_BUCKETS, **kw).labels(model_name)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time spent waiting.",
                               buckets=E2E_BUCKETS, **kw).labels(model_name)
        self.device = Counter("hybridserve:device_seconds", "Device-seconds spent on requests.",
                              **kw).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)

    def observe_finished(self, metrics: Any, finish_reason: str | None) -> None:
        """Record one finished engine request (`RequestMetrics`)."""
        if metrics is not None:
            for hist, value in ((self.ttft, metrics.ttft_s), (self.tpot, metrics.tpot_s),
                                (self.e2e, metrics.e2e_s), (self.queue, metrics.queue_s)):
                if value is not None:
                    hist.observe(value)
            if metrics.device_seconds:
                self.device.inc(metrics.device_seconds)
        self._success.labels(self.model_name, finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
