"""The gateway's own Prometheus metrics: requests, errors, added latency, backend health."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from hybridserve.gateway.registry import Registry

ADDED_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.5)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)


class _BackendCollector:
    def __init__(self, registry: Registry):
        self.registry = registry

    def collect(self):
        up = GaugeMetricFamily("hybridserve_backend_up", "1 when the backend answered its last "
                               "health check.", labels=["backend"])
        load = GaugeMetricFamily("hybridserve_backend_load", "Requests running + waiting on "
                                 "the backend (scraped, or in flight from here).", labels=["backend"])
        inflight = GaugeMetricFamily("hybridserve_gateway_inflight", "Requests this gateway has "
                                     "in flight to the backend.", labels=["backend"])
        for b in self.registry.backends.values():
            up.add_metric([b.name], 1.0 if b.healthy else 0.0)
            load.add_metric([b.name], b.load())
            inflight.add_metric([b.name], float(b.inflight))
        yield from (up, load, inflight)


class GatewayMetrics:
    def __init__(self, registry: Registry):
        self.prom = CollectorRegistry()
        self.prom.register(_BackendCollector(registry))
        self.requests = Counter("hybridserve_gateway_requests", "Requests answered, by backend, "
                                "endpoint and HTTP status.", ["backend", "endpoint", "status"],
                                registry=self.prom)
        self.errors = Counter("hybridserve_gateway_errors", "Error responses, by backend and "
                              "error type.", ["backend", "type"], registry=self.prom)
        self.added = Histogram("hybridserve_gateway_added_latency_seconds", "Time the gateway "
                               "itself adds to a request (before the upstream call plus after "
                               "its answer).", ["backend"], buckets=ADDED_BUCKETS,
                               registry=self.prom)
        self.upstream = Histogram("hybridserve_gateway_upstream_latency_seconds", "Upstream time "
                                  "to response headers (streams) or full body.", ["backend"],
                                  buckets=UPSTREAM_BUCKETS, registry=self.prom)

    def render(self) -> bytes:
        return generate_latest(self.prom)
