"""deploy/: the gateway's Prometheus service discovery, the Grafana dashboard's queries
against what the live stack exports, and a real Prometheus scraping the stack."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from hybridserve.dashboard import build, declared_metrics, metrics_used, queries
from tests.serving.conftest import TINY, free_port, wait_until

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def get(url: str, **kw) -> httpx.Response:
    return httpx.get(url, timeout=10, trust_env=False, **kw)


@pytest.fixture(scope="module")
def served(engine_stack):
    """The stack after a few answered requests (so histograms and counters have samples)."""
    for model in TINY:
        for stream in (False, True):
            r = httpx.post(engine_stack.base_url + "/completions", headers=engine_stack.headers(),
                           timeout=60, trust_env=False,
                           json={"model": model, "prompt": "hello", "max_tokens": 3, "stream": stream})
            assert r.status_code == 200, r.text
    return engine_stack


def test_committed_dashboard_is_the_built_one():
    committed = json.loads((DEPLOY / "grafana/dashboards/hybridserve.json").read_text())
    assert committed == build(), "run: python -m hybridserve.dashboard > deploy/grafana/dashboards/hybridserve.json"
    ids = [p["id"] for p in committed["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["datasource"]["uid"] == "hybridserve-prometheus" for p in committed["panels"]
               for t in p.get("targets", []))
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/hybridserve.yaml").read_text())
    assert prov["datasources"][0]["uid"] == "hybridserve-prometheus"


def test_service_discovery_lists_every_worker_with_labels(served):
    groups = get(served.url + "/prometheus/targets").json()
    by_name = {g["labels"]["backend"]: g for g in groups}
    assert set(by_name) == set(served.workers)
    for name, g in by_name.items():
        assert g["labels"]["arch"] == TINY[name] and g["labels"]["engine"] == "native"
        (target,) = g["targets"]
        assert served.workers[name] == f"http://{target}"
        assert "vllm:num_requests_running{" in get(f"http://{target}/metrics").text


def test_every_dashboard_metric_and_label_is_exported(served):
    pages = [get(served.url + "/metrics").text] + [get(u + "/metrics").text for u in served.workers.values()]
    declared: dict[str, set[str]] = {}
    for page in pages:
        for name, labels in declared_metrics(page).items():
            declared.setdefault(name, set()).update(labels)
    for name, labels in metrics_used(build()).items():
        assert name in declared, f"dashboard queries {name}, which nothing exports"
        seen = declared[name]
        if seen:  # label sets not yet observed (e.g. no escalation happened) cannot be checked
            assert labels <= seen, f"{name}: grouped by {labels - seen}, exported labels {seen}"


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="the prometheus binary is not installed (.ci/run installs Debian's)")
def test_prometheus_scrapes_the_stack_and_every_dashboard_query_runs(served, tmp_path):
    gw = served.url.removeprefix("http://")
    cfg = (DEPLOY / "prometheus/prometheus.yml").read_text().replace("127.0.0.1:8000", gw)
    cfg = cfg.replace("scrape_interval: 5s", "scrape_interval: 1s").replace("refresh_interval: 30s",
                                                                            "refresh_interval: 1s")
    (tmp_path / "prometheus.yml").write_text(cfg)
    port = free_port()
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "wb"))
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def all_up() -> bool:
            try:
                active = get(api + "/targets").json()["data"]["activeTargets"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            return len(active) == 1 + len(served.workers) and all(t["health"] == "up" for t in active)

        wait_until(all_up, 60, "Prometheus scrapes the gateway and every worker", 0.5)
        active = get(api + "/targets").json()["data"]["activeTargets"]
        workers = {t["labels"]["backend"]: t["labels"] for t in active
                   if t["labels"]["job"] == "hybridserve-workers"}
        assert set(workers) == set(served.workers)
        assert all(w["component"] == "worker" and w["arch"] == TINY[n] for n, w in workers.items())

        # more traffic after the first scrapes, so rate() has two points that differ; one
        # request is refused, so the errors panel has a series
        time.sleep(2.5)
        for model in TINY:
            httpx.post(served.base_url + "/completions", headers=served.headers(), timeout=60,
                       trust_env=False, json={"model": model, "prompt": "again", "max_tokens": 3})
        bad = httpx.post(served.base_url + "/completions", headers=served.headers(), timeout=60,
                         trust_env=False, json={"model": "no-such-model", "prompt": "x"})
        assert bad.status_code == 404
        time.sleep(2.5)
        empty = []
        for expr in queries(build()):
            q = expr.replace("$backend", ".*").replace("$__rate_interval", "30s")
            body = get(api + "/query", params={"query": q}).json()
            assert body["status"] == "success", (q, body)
            if not body["data"]["result"]:
                empty.append(q)
        # only what this traffic cannot produce may come back empty: escalations (no cascade)
        assert all("escalations" in q for q in empty), empty
        backends = {r["metric"]["backend"] for r in get(api + "/query", params={
            "query": "sum by (backend) (rate(vllm:generation_tokens_total[30s]))"}).json()["data"]["result"]}
        assert backends == set(TINY)
    finally:
        prom.terminate()
        prom.wait(timeout=30)


def test_service_discovery_paths_schemes_and_servers_without_metrics():
    from hybridserve.config import parse_config
    from hybridserve.gateway.registry import Registry

    cfg = parse_config({"gateway": {"auth": "disabled", "port": 9000}, "backends": [
        {"name": "local", "arch": "transformer", "checkpoint": "builtin:tiny-transformer",
         "price_per_hour": 1, "device": "cpu"},
        {"name": "tls", "arch": "hybrid", "engine": "remote", "url": "https://gpu-7.internal/v1",
         "price_per_hour": 2, "tier": "premium"},
        {"name": "proxied", "arch": "hybrid", "engine": "remote", "url": "http://lb:8080/team-a/v1",
         "price_per_hour": 2},
        {"name": "bare", "arch": "transformer", "engine": "remote", "url": "http://10.0.0.5:9001",
         "price_per_hour": 2}]})
    reg = Registry.from_config(cfg)
    reg.backends["bare"].health_path = "/health"  # found to have no /metrics
    groups = {g["labels"]["backend"]: g for g in reg.prometheus_targets()}
    assert set(groups) == {"local", "tls", "proxied"}
    assert groups["local"] == {"targets": ["127.0.0.1:9001"], "labels": {
        "backend": "local", "arch": "transformer", "engine": "native", "tier": "standard", "device": "cpu"}}
    assert groups["tls"]["targets"] == ["gpu-7.internal:443"]
    assert groups["tls"]["labels"]["__scheme__"] == "https" and groups["tls"]["labels"]["tier"] == "premium"
    assert "__metrics_path__" not in groups["tls"]["labels"]
    assert groups["proxied"]["targets"] == ["lb:8080"]
    assert groups["proxied"]["labels"]["__metrics_path__"] == "/team-a/metrics"
