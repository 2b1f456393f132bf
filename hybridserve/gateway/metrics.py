"""The gateway's own Prometheus metrics: requests, errors, added latency, backend health, agent steps.

Step kinds (X-Step-Kind) are chosen by clients, so they never become label values as they
come: `step_kind` is one of the kinds configured in `gateway.step_tiers`, `unspecified` (no
header) or `other` (any other kind), a label set as small as the config.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from hybridserve.errors import HybridserveError
from hybridserve.gateway.governor import OTHER, UNSPECIFIED
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


class _EconomicsCollector:
    """The live economics table and session totals, read at scrape time."""

    def __init__(self, router, sessions):
        self.router = router
        self.sessions = sessions

    def collect(self):
        out = GaugeMetricFamily("hybridserve_economics_usd_per_1m_output", "Live $/1M output tokens "
                                "per backend, context bucket and concurrency.",
                                labels=["backend", "context", "concurrency"])
        corr = GaugeMetricFamily("hybridserve_economics_correction", "Measured / predicted "
                                 "device-seconds (decays to 1).", labels=["backend", "context"])
        for r in self.router.table.rows():
            labels = [r["backend"], str(r["context"]), str(r["concurrency"])]
            if r["usd_per_1m_output"] is not None:
                out.add_metric(labels, r["usd_per_1m_output"])
            corr.add_metric(labels[:2], r["correction"])
        yield from (out, corr)
        if self.sessions is not None:
            yield from self._sessions()

    def _sessions(self):
        try:
            t = self.sessions.totals()
        except HybridserveError:   # shared store away: the scrape goes on without session gauges
            return
        n = GaugeMetricFamily("hybridserve_sessions", "Agent sessions tracked (X-Session-Id).")
        n.add_metric([], t["sessions"])
        tokens = GaugeMetricFamily("hybridserve_sessions_tokens", "Tokens used by the tracked "
                                   "sessions, by kind.", labels=["kind"])
        for kind in ("prompt_tokens", "completion_tokens", "thinking_tokens"):
            tokens.add_metric([kind.removesuffix("_tokens")], t[kind])
        totals = {name: GaugeMetricFamily(f"hybridserve_sessions_{name}", help_)
                  for name, help_ in (("calls", "Calls made by the tracked sessions."),
                                      ("usd", "Measured $ spent by the tracked sessions."),
                                      ("escalations", "Cascade escalations in the tracked sessions."),
                                      ("budget_hits", "Session budget hits (cut answers and 429s)."),
                                      ("tool_calls", "Tool calls in the tracked sessions' answers."),
                                      ("failovers", "Backend attempts in the tracked sessions that failed "
                                                    "over to the next backend."),
                                      ("client_retries", "Calls the tracked sessions' clients retried."))}
        for name, fam in totals.items():
            fam.add_metric([], t[name])
        yield from (n, tokens, *totals.values())


class GatewayMetrics:
    def __init__(self, registry: Registry, router=None, sessions=None, step_kinds=()):
        self.step_kinds = frozenset(step_kinds) | {UNSPECIFIED}
        self.prom = CollectorRegistry()
        self.prom.register(_BackendCollector(registry))
        if router is not None:
            self.prom.register(_EconomicsCollector(router, sessions))
        self.cost = Counter("hybridserve_gateway_cost_usd", "Measured cost of answered requests "
                            "(price_per_hour x device-seconds).", ["backend"], registry=self.prom)
        self.device = Counter("hybridserve_gateway_device_seconds", "Device-seconds reported by "
                              "backends for answered requests.", ["backend"], registry=self.prom)
        self.routed = Counter("hybridserve_gateway_routed", "Answered requests by routing policy "
                              "and backend.", ["policy", "backend"], registry=self.prom)
        self.escalations = Counter("hybridserve_gateway_escalations", "Cascade escalations, "
                                   "from tier to tier.", ["from_backend", "to_backend"],
                                   registry=self.prom)
        self.budget_exhausted = Counter("hybridserve_gateway_budget_exhausted", "Answers cut "
                                        "short by a session budget.", registry=self.prom)
        self.requests = Counter("hybridserve_gateway_requests", "Requests answered, by backend, "
                                "endpoint and HTTP status.", ["backend", "endpoint", "status"],
                                registry=self.prom)
        self.errors = Counter("hybridserve_gateway_errors", "Error responses, by backend and "
                              "error type.", ["backend", "type"], registry=self.prom)
        self.batch_lines = Counter("hybridserve_gateway_batch_lines", "Batch API lines run, by outcome "
                                   "(ok: a 200 answer; error: an error line).", ["outcome"], registry=self.prom)
        self.session_steps = Counter("hybridserve_gateway_session_steps", "Answered calls in agent "
                                     "sessions (X-Session-Id), by step kind.", ["step_kind"],
                                     registry=self.prom)
        self.session_step_tokens = Counter("hybridserve_gateway_session_step_tokens", "Tokens of answered "
                                           "session calls, by step kind and kind (prompt, completion, "
                                           "cached: prompt tokens served from a prefix cache).",
                                           ["step_kind", "kind"], registry=self.prom)
        self.tool_calls = Counter("hybridserve_gateway_tool_calls", "Tool calls in the answers clients got, "
                                  "by step kind.", ["step_kind"], registry=self.prom)
        self.added = Histogram("hybridserve_gateway_added_latency_seconds", "Time the gateway "
                               "itself adds to a request (before the upstream call plus after "
                               "its answer).", ["backend"], buckets=ADDED_BUCKETS,
                               registry=self.prom)
        self.upstream = Histogram("hybridserve_gateway_upstream_latency_seconds", "Upstream time "
                                  "to response headers (streams) or full body.", ["backend"],
                                  buckets=UPSTREAM_BUCKETS, registry=self.prom)

    def batch_line(self, status: int) -> None:
        self.batch_lines.labels("ok" if status == 200 else "error").inc()

    def render(self) -> bytes:
        return generate_latest(self.prom)

    def step_label(self, kind: str) -> str:
        """A step kind as a label value: configured, `unspecified`, or `other`."""
        return kind if kind in self.step_kinds else OTHER

    def account(self, backend: str, call) -> None:
        """Count one answered call's cost and route, its tool calls and, in a session, its step."""
        o = call.outcome
        self.cost.labels(backend).inc(call.usd)
        self.device.labels(backend).inc(call.device_s)
        self.routed.labels(call.route.policy, backend).inc()
        if call.exhausted:
            self.budget_exhausted.inc()
        step = self.step_label(call.step_kind)
        if o.tool_calls:
            self.tool_calls.labels(step).inc(o.tool_calls)
        if call.hold is not None:
            self.session_steps.labels(step).inc()
            counts = o.counts
            for kind, n in (("prompt", counts["prompt_tokens"]), ("completion", counts["completion_tokens"]),
                            ("cached", o.cached)):
                self.session_step_tokens.labels(step, kind).inc(n)
