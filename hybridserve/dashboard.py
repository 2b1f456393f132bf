"""The Grafana dashboard of deploy/grafana, built from one list of panels.

Every query is written against the metrics hybridserve exports: the gateway's
`hybridserve_*` families and the workers' vLLM-named `vllm:*` ones (native and vLLM
workers alike; `hybridserve:device_seconds` is native-only). Worker series carry the
`backend` label that the gateway's service discovery (/prometheus/targets) attaches,
so one `backend` variable filters both. Tests check each metric and `by (...)` label
against live /metrics pages, and that the committed JSON is what this module builds:

    python -m hybridserve.dashboard > deploy/grafana/dashboards/hybridserve.json
"""
from __future__ import annotations

import json
import re
import sys

DATASOURCE = {"type": "prometheus", "uid": "hybridserve-prometheus"}
SEL = '{backend=~"$backend"}'
RATE = "$__rate_interval"


def _q(family: str, q: float) -> str:
    return (f"histogram_quantile({q}, sum by (le, backend) "
            f"(rate({family}_bucket{SEL}[{RATE}])))")


def _rate(counter: str, by: str = "backend") -> str:
    return f"sum by ({by}) (rate({counter}{SEL}[{RATE}]))"


# (row, title, unit, [(query, legend)], description)
PANELS: list[tuple[str, str, str, list[tuple[str, str]], str]] = [
    ("Overview", "Backends up", "none",
     [(f"hybridserve_backend_up{SEL}", "{{backend}}")],
     "1 when the gateway's last health poll of the backend succeeded."),
    ("Overview", "Spend (USD per hour)", "currencyUSD",
     [(f"3600 * {_rate('hybridserve_gateway_cost_usd_total')}", "{{backend}}")],
     "Measured cost of answered requests: price_per_hour x device-seconds."),
    ("Overview", "Live $ per 1M output tokens", "currencyUSD",
     [(f"hybridserve_economics_usd_per_1m_output{SEL}", "{{backend}} ctx {{context}} x{{concurrency}}")],
     "The router's live economics table (GET /v1/economics)."),
    ("Overview", "Economics correction (measured / predicted)", "none",
     [(f"hybridserve_economics_correction{SEL}", "{{backend}} ctx {{context}}")],
     "How far measured speed is from the profile the router started with."),
    ("Gateway", "Requests per second", "reqps",
     [(_rate("hybridserve_gateway_requests_total", "backend, status"), "{{backend}} {{status}}")],
     "Answered requests by backend and HTTP status."),
    ("Gateway", "Errors per second", "reqps",
     [(_rate("hybridserve_gateway_errors_total", "backend, type"), "{{backend}} {{type}}")],
     "Error responses by backend and OpenAI error type."),
    ("Gateway", "Routing decisions per second", "reqps",
     [(_rate("hybridserve_gateway_routed_total", "policy, backend"), "{{policy}} -> {{backend}}")],
     "Which policy sent requests where."),
    ("Gateway", "Latency the gateway adds", "s",
     [(_q("hybridserve_gateway_added_latency_seconds", 0.5), "p50 {{backend}}"),
      (_q("hybridserve_gateway_added_latency_seconds", 0.99), "p99 {{backend}}")],
     "Gateway time before the upstream call plus after its answer."),
    ("Gateway", "Upstream latency", "s",
     [(_q("hybridserve_gateway_upstream_latency_seconds", 0.5), "p50 {{backend}}"),
      (_q("hybridserve_gateway_upstream_latency_seconds", 0.99), "p99 {{backend}}")],
     "Worker time to response headers (streams) or the full body."),
    ("Gateway", "In flight and load", "none",
     [(f"hybridserve_gateway_inflight{SEL}", "in flight {{backend}}"),
      (f"hybridserve_backend_load{SEL}", "load {{backend}}")],
     "Requests this gateway has open per backend, and the backend's running + waiting."),
    ("Test-time compute", "Cascade escalations per second", "reqps",
     [(f"sum by (from_backend, to_backend) (rate(hybridserve_gateway_escalations_total[{RATE}]))",
       "{{from_backend}} -> {{to_backend}}")],
     "Cascade answers re-asked of a higher tier."),
    ("Test-time compute", "Budgets cut short", "reqps",
     [(f"sum(rate(hybridserve_gateway_budget_exhausted_total[{RATE}]))", "answers cut by a session budget"),
      ("max(hybridserve_sessions_budget_hits)", "session budget hits (total)")],
     "Answers that ended early because a budget ran out (finish reason says so)."),
    ("Test-time compute", "Agent sessions: tokens", "short",
     [("max by (kind) (hybridserve_sessions_tokens)", "{{kind}}"),
      ("max(hybridserve_sessions)", "sessions tracked")],
     "Tokens used by the sessions tracked through X-Session-Id. Max over gateway replicas: "
     "with gateway.state_url every replica reports the deployment's totals."),
    ("Workers", "Time to first token", "s",
     [(_q("vllm:time_to_first_token_seconds", 0.5), "p50 {{backend}}"),
      (_q("vllm:time_to_first_token_seconds", 0.99), "p99 {{backend}}")], ""),
    ("Workers", "Time per output token", "s",
     [(_q("vllm:request_time_per_output_token_seconds", 0.5), "p50 {{backend}}"),
      (_q("vllm:request_time_per_output_token_seconds", 0.99), "p99 {{backend}}")], ""),
    ("Workers", "End-to-end request latency", "s",
     [(_q("vllm:e2e_request_latency_seconds", 0.5), "p50 {{backend}}"),
      (_q("vllm:e2e_request_latency_seconds", 0.99), "p99 {{backend}}")], ""),
    ("Workers", "Queue time", "s",
     [(_q("vllm:request_queue_time_seconds", 0.99), "p99 {{backend}}")],
     "Time requests waited before they were scheduled."),
    ("Workers", "Tokens per second", "short",
     [(_rate("vllm:prompt_tokens_total"), "prompt {{backend}}"),
      (_rate("vllm:generation_tokens_total"), "generated {{backend}}")], ""),
    ("Workers", "Running and waiting requests", "none",
     [(f"sum by (backend) (vllm:num_requests_running{SEL})", "running {{backend}}"),
      (f"sum by (backend) (vllm:num_requests_waiting{SEL})", "waiting {{backend}}")], ""),
    ("Workers", "KV cache and state slots in use", "percentunit",
     [(f"max by (backend) (vllm:kv_cache_usage_perc{SEL})", "{{backend}}")],
     "Share of KV blocks (and, native hybrids, SSM state slots) in use."),
    ("Workers", "Prefix cache hit rate", "percentunit",
     [(f"{_rate('vllm:prefix_cache_hits_total')} / {_rate('vllm:prefix_cache_queries_total')}",
       "{{backend}}")],
     "Prompt tokens found in the prefix cache / prompt tokens looked up (native and vLLM)."),
    ("Workers", "Finished requests per second", "reqps",
     [(_rate("vllm:request_success_total", "backend, finished_reason"), "{{backend}} {{finished_reason}}")],
     "By finish reason (stop, length, abort...)."),
    ("Workers", "Device busy (device-seconds per second)", "percentunit",
     [(_rate("hybridserve:device_seconds_total"), "{{backend}}")],
     "Native workers: the share of wall time the engine spent computing."),
]


def build() -> dict:
    """The dashboard as Grafana's JSON model (schema 39, Grafana 10/11)."""
    panels: list[dict] = []
    y, pid, row = 0, 1, None
    col = 0
    for row_name, title, unit, queries, desc in PANELS:
        if row_name != row:
            row, col = row_name, 0
            y += 0 if not panels else 8
            panels.append({"type": "row", "title": row_name, "id": pid, "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            pid, y = pid + 1, y + 1
        elif col == 0:
            y += 8
        panel = {
            "type": "stat" if title == "Backends up" else "timeseries",
            "title": title, "id": pid, "datasource": DATASOURCE, "description": desc,
            "gridPos": {"h": 8, "w": 8, "x": col * 8, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                         "legendFormat": legend} for i, (expr, legend) in enumerate(queries)],
        }
        panels.append(panel)
        pid, col = pid + 1, (col + 1) % 3
    return {
        "uid": "hybridserve", "title": "hybridserve", "tags": ["hybridserve", "llm-serving"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "editable": True,
        "templating": {"list": [{
            "name": "backend", "label": "backend", "type": "query", "datasource": DATASOURCE,
            "query": {"query": "label_values(hybridserve_backend_up, backend)", "refId": "backend"},
            "definition": "label_values(hybridserve_backend_up, backend)",
            "multi": True, "includeAll": True, "allValue": ".*", "refresh": 2,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}]},
        "panels": panels,
    }


_METRIC = re.compile(r"\b((?:vllm|hybridserve):[a-z0-9_:]+|hybridserve_[a-z0-9_]+)")
_BY = re.compile(r"by \(([^)]*)\)")


def queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metrics_used(dashboard: dict) -> dict[str, set[str]]:
    """Metric name -> the labels its queries group by (`le` and `backend` left out)."""
    used: dict[str, set[str]] = {}
    for expr in queries(dashboard):
        labels = {x.strip() for group in _BY.findall(expr) for x in group.split(",")} - {"le", "backend", ""}
        for name in _METRIC.findall(expr):
            used.setdefault(name, set()).update(labels)
    return used


def declared_metrics(text: str) -> dict[str, set[str]]:
    """Sample names a Prometheus text page declares (from # TYPE, so label sets not yet
    seen count) -> the label names seen on its samples."""
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
            for s in suffixes:
                names.setdefault(name.removesuffix("_total") + s if kind == "counter" else name + s, set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split(" ", 1)[0]
            labels = set(re.findall(r'([a-zA-Z_]\w*)="', rest)) if rest else set()
            names.setdefault(name, set()).update(labels)
    return names


def main() -> int:
    json.dump(build(), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
