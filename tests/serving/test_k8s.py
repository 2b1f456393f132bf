"""`hybridserve k8s`: the manifests are valid Kubernetes objects, wire every worker to its
Service, and their container commands serve when run here (Service names pointed at
loopback, each pod's port made free).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys

import httpx
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from hybridserve.cli import app
from hybridserve.config import load_config, parse_config
from hybridserve.k8s import CACHE_DIR, CONFIG_PATH, VLLM_PYTHON, dump, render, service_name
from tests.serving.conftest import (API_KEY, REPO, TINY, free_port, log_tail, spawn, start_redis,
                                    stop_process, wait_until)

pytestmark = pytest.mark.timeout(240)

K8S_VERSION = "1.33.0"


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def _cluster_config(objects: list[dict]) -> dict:
    return yaml.safe_load(_by_kind(objects, "ConfigMap")["hybridserve-config"]["data"]["models.yaml"])


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_manifests_are_valid_kubernetes_and_wire_workers_to_services(profile):
    cfg = load_config(REPO / "models.yaml", profile)
    objects = render(cfg, "registry.example/hybridserve:1", namespace="llm", gateway_replicas=3)
    for o in objects:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        assert o["metadata"]["namespace"] == "llm"
    data = _cluster_config(objects)
    cluster = parse_config(data)                 # the pods' models.yaml is a valid config
    services, deps = _by_kind(objects, "Service"), _by_kind(objects, "Deployment")
    for b in cluster.backends:
        name = service_name(b.name)
        assert b.host == name and not b.started_here
        c = _container(deps[name])
        assert c["command"][:2] == ["hybridserve", "worker"] and b.name in c["command"]
        assert c["ports"][0]["containerPort"] == b.port == services[name]["spec"]["ports"][0]["targetPort"]
        assert services[name]["spec"]["selector"] == deps[name]["spec"]["selector"]["matchLabels"]
        gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpu == (1 if b.device.startswith("cuda") else None)
        shm = [v for v in deps[name]["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"]
        assert bool(shm) == (b.engine == "vllm")
        if b.engine == "vllm":
            assert b.vllm.python == "/opt/vllm/bin/python"
    gw = deps["hybridserve-gateway"]
    assert gw["spec"]["replicas"] == 3 and _by_kind(objects, "PodDisruptionBudget")
    assert cluster.gateway.state_url == "redis://hybridserve-redis:6379/0" and "hybridserve-redis" in services
    assert cluster.gateway.host == "0.0.0.0" and services["hybridserve-gateway"]["spec"]["ports"][0]["port"] == 8000
    env = {e["name"] for e in _container(gw)["env"]}
    assert ("HYBRIDSERVE_API_KEYS" in env) == (cluster.gateway.auth == "required")


def test_an_existing_redis_a_remote_and_economics_and_quality_profiles(tmp_path):
    (tmp_path / "econ.json").write_text('{"backends": {}}')
    (tmp_path / "quality.json").write_text('{"object": "quality_profile", "targets": {}}')
    cfg = parse_config({
        "gateway": {"economics_profile": "econ.json", "quality_profile": "quality.json", "policy": "least_loaded"},
        "backends": [{"name": "t", "arch": "transformer", "checkpoint": "builtin:tiny-transformer",
                      "price_per_hour": 1.0},
                     {"name": "far", "arch": "hybrid", "engine": "remote", "url": "http://far:9000",
                      "price_per_hour": 1.0}]})
    objects = render(cfg, "img:1", gateway_replicas=1, state_url="redis://redis.infra:6379/3",
                     models_pvc="checkpoints", config_dir=tmp_path)
    for o in objects:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    assert "hybridserve-redis" not in _by_kind(objects, "Service") and not _by_kind(objects, "PodDisruptionBudget")
    assert set(_by_kind(objects, "Deployment")) == {"hybridserve-t", "hybridserve-gateway"}  # no pod for a remote
    cm = _by_kind(objects, "ConfigMap")["hybridserve-config"]["data"]
    assert json.loads(cm["economics_profile.json"]) == {"backends": {}}
    data = yaml.safe_load(cm["models.yaml"])
    assert data["gateway"]["economics_profile"] == "/etc/hybridserve/economics_profile.json"
    assert json.loads(cm["quality_profile.json"])["object"] == "quality_profile"
    assert data["gateway"]["quality_profile"] == "/etc/hybridserve/quality_profile.json"
    assert data["gateway"]["state_url"] == "redis://redis.infra:6379/3"
    worker = _container(_by_kind(objects, "Deployment")["hybridserve-t"])
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in worker["volumeMounts"]
    env = {e["name"] for e in _container(_by_kind(objects, "Deployment")["hybridserve-gateway"])["env"]}
    assert "HYBRIDSERVE_BACKEND_KEY_FAR" in env


def test_the_committed_example_and_the_image_match_the_renderer():
    """deploy/k8s/hybridserve-gpu.yaml is `hybridserve k8s --profile gpu` output, and the image
    (deploy/docker/Dockerfile) has what the manifests expect: vLLM's venv, the cache, the sources."""
    example = REPO / "deploy/k8s/hybridserve-gpu.yaml"
    cfg = load_config(REPO / "models.yaml", "gpu")
    assert example.read_text() == dump(render(cfg, "registry.example.com/hybridserve:0.1")), (
        "regenerate: hybridserve k8s --profile gpu --image registry.example.com/hybridserve:0.1 "
        "-o deploy/k8s/hybridserve-gpu.yaml")
    docker = (REPO / "deploy/docker/Dockerfile").read_text()
    assert f"python3 -m venv {VLLM_PYTHON.removesuffix('/bin/python')}" in docker
    assert f"HYBRIDSERVE_CACHE={CACHE_DIR}" in docker and "/opt/hybridserve/bin:${PATH}" in docker
    for sources in re.findall(r"^COPY (.+) /src/", docker, re.M):
        for path in sources.split():
            assert (REPO / path).exists(), path


def test_refusals_name_the_problem(tmp_path):
    clash = parse_config({"backends": [
        {"name": n, "arch": "transformer", "checkpoint": "builtin:tiny-transformer", "price_per_hour": 1}
        for n in ("a.b", "a-b")]})
    with pytest.raises(ValueError, match="same Service name 'hybridserve-a-b'"):
        render(clash, "img:1")
    cfg_path = tmp_path / "m.yaml"
    cfg_path.write_text(yaml.safe_dump({"backends": [
        {"name": "t", "arch": "transformer", "checkpoint": "builtin:tiny-transformer", "price_per_hour": 1}]}))
    runner = CliRunner()
    for args, says in ((["--gateway-replicas", "0"], "at least 1"),
                       (["--state-url", "http://nope"], "must be a Redis URL")):
        out = runner.invoke(app, ["k8s", "--config", str(cfg_path), "--image", "img:1", *args])
        assert out.exit_code == 2 and says in out.output, out.output
    out = runner.invoke(app, ["k8s", "--config", str(cfg_path), "--image", "img:1", "-o", str(tmp_path / "k.yaml")])
    assert out.exit_code == 0
    assert [o["kind"] for o in yaml.safe_load_all((tmp_path / "k.yaml").read_text())][0] == "ConfigMap"


def test_the_rendered_pods_serve_when_run_here(tmp_path):
    """Every Deployment's container command, run as a local process: two workers (the tiny
    pair) and two gateway replicas sharing state through a real Redis. Only what a cluster
    provides is swapped: Service names become 127.0.0.1, and ports free ones."""
    redis_proc, redis_url = start_redis(tmp_path)
    backends = [{"name": name, "arch": arch, "checkpoint": f"builtin:{name}", "max_context": 512,
                 "price_per_hour": 0.5, "native": {"max_num_seqs": 8, "cache_memory_gb": 0.25}}
                for name, arch in TINY.items()]
    cfg = parse_config({"gateway": {"auth": "required", "budgets": [{"name": "d", "tokens": 10**9}]},
                        "backends": backends})
    objects = render(cfg, "img:1", gateway_replicas=2, state_url=redis_url)
    data = _cluster_config(objects)
    ports = {}
    for b in data["backends"]:
        ports[b["host"]] = b["port"], free_port()
        b["host"], b["port"] = "127.0.0.1", ports[b["host"]][1]
    local_cfg = tmp_path / "models.yaml"
    local_cfg.write_text(yaml.safe_dump(data))
    deps = _by_kind(objects, "Deployment")
    procs, gateways = [], []
    try:
        for name, dep in deps.items():
            c = _container(dep)
            replicas = dep["spec"]["replicas"]
            for i in range(replicas):
                argv = [sys.executable, "-m", "hybridserve.cli", *c["command"][1:]]
                argv[argv.index(CONFIG_PATH)] = str(local_cfg)
                if "--host" in argv:
                    argv[argv.index("--host") + 1] = "127.0.0.1"
                if name in ports:
                    argv[argv.index("--port") + 1] = str(ports[name][1])
                    url = f"http://127.0.0.1:{ports[name][1]}"
                else:
                    port = free_port()
                    argv += ["--port", str(port)]
                    url = f"http://127.0.0.1:{port}"
                    gateways.append(url)
                env = {e["name"]: e.get("value") for e in c.get("env", []) if "value" in e}
                env.pop("HYBRIDSERVE_CACHE", None)   # keep the tests' checkpoint cache
                env.pop("HF_HOME", None)
                if name == "hybridserve-gateway":     # the Secret the manifest reads it from
                    env["HYBRIDSERVE_API_KEYS"] = hashlib.sha256(API_KEY.encode()).hexdigest()
                procs.append((spawn(argv, tmp_path / f"{name}-{i}.log", env), tmp_path / f"{name}-{i}.log", url))
        for proc, log, url in procs:
            wait_until(lambda: proc.poll() is None and httpx.get(url + "/health", timeout=2,
                                                                 trust_env=False).status_code == 200,
                       180, f"{log.name} healthy (log: {log_tail(log)})", 0.5)
        headers = {"authorization": f"Bearer {API_KEY}"}
        for gw in gateways:
            wait_until(lambda: all(b["healthy"] for b in httpx.get(gw + "/health", trust_env=False)
                                   .json()["backends"].values()), 20, "gateway sees both workers")
        for gw, model in zip(gateways, TINY):
            r = httpx.post(gw + "/v1/chat/completions", headers=headers, timeout=60, trust_env=False,
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4 and r.headers["x-hybridserve-backend"] == model
        spent = [httpx.get(gw + "/v1/budgets", headers=headers, trust_env=False).json()["data"][0]["spent_tokens"]
                 for gw in gateways]
        assert spent[0] == spent[1] > 0              # one ledger, whichever replica is asked
    finally:
        for proc, _, _ in procs:
            stop_process(proc)
        redis_proc.terminate()
        redis_proc.wait(10)
