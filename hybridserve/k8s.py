"""Kubernetes manifests for a hybridserve deployment, rendered from models.yaml.

`hybridserve k8s --config models.yaml --profile gpu --image IMAGE > hybridserve.yaml`
writes one multi-document YAML that `kubectl apply -f` takes:

* ConfigMap `hybridserve-config`: the models.yaml every pod reads. It is the input
  config with what a cluster changes: each worker's `host` is its Service name and its
  `port` is fixed, the gateway listens on 0.0.0.0, budgets and sessions live in Redis
  (`gateway.state_url`) so that gateway replicas share them, vLLM's interpreter is the
  image's, and the economics and quality profiles travel inside the ConfigMap.
* Per backend that hybridserve runs (native or vllm): a Deployment of one
  `hybridserve worker` pod (a GPU backend asks for `nvidia.com/gpu: 1`; vLLM gets a
  memory-backed /dev/shm) and a ClusterIP Service. Remote backends are only routed to.
* The gateway: a Deployment of `--gateway-replicas` pods running `hybridserve gateway`,
  its Service, and a PodDisruptionBudget when there are several. API key hashes come
  from the Secret `hybridserve-api-keys` (key `hashes`, comma-separated) when auth is
  required.
* Redis for the shared state, unless `--state-url` names one: a Deployment with an
  append-only file on a PersistentVolumeClaim, and its Service.

Every pod carries `prometheus.io/*` annotations for its /metrics. Probes hit /health;
a worker's startup probe allows for model loading (vLLM's `startup_timeout_s`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from hybridserve.config import BackendConfig, HybridserveConfig
from hybridserve.gateway.registry import backend_key_env, worker_port

APP = "hybridserve"
CONFIG_DIR = "/etc/hybridserve"
CONFIG_PATH = f"{CONFIG_DIR}/models.yaml"
GATEWAY_PORT = 8000
REDIS_PORT = 6379
REDIS_IMAGE = "redis:7.2-alpine"
VLLM_PYTHON = "/opt/vllm/bin/python"
CACHE_DIR = "/var/cache/hybridserve"


def service_name(backend_name: str) -> str:
    """A DNS-1035 label for a backend's Deployment and Service: `hybridserve-<name>`."""
    label = re.sub(r"[^a-z0-9-]+", "-", backend_name.lower()).strip("-")
    return f"{APP}-{label}"[:63].rstrip("-")


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}


def _meta(name: str, component: str, namespace: str | None) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "labels": _labels(component)}
    if namespace:
        m["namespace"] = namespace
    return m


def _probe(port: int, period_s: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/health", "port": port}, "periodSeconds": period_s,
            "timeoutSeconds": 5, "failureThreshold": failures}


def _deployment(name: str, component: str, namespace: str | None, replicas: int, container: dict,
                volumes: list[dict], port: int | None, strategy: str = "RollingUpdate") -> dict:
    annotations = ({"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                    "prometheus.io/path": "/metrics"} if port else {})
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, component, namespace),
            "spec": {"replicas": replicas, "strategy": {"type": strategy},
                     "selector": {"matchLabels": {**_labels(component), "app.kubernetes.io/instance": name}},
                     "template": {"metadata": {"labels": {**_labels(component),
                                                          "app.kubernetes.io/instance": name},
                                               "annotations": annotations},
                                  "spec": {"containers": [container], "volumes": volumes}}}}


def _service(name: str, component: str, namespace: str | None, port: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, component, namespace),
            "spec": {"type": "ClusterIP",
                     "selector": {**_labels(component), "app.kubernetes.io/instance": name},
                     "ports": [{"name": "http", "port": port, "targetPort": port}]}}


PROFILE_FIELDS = ("economics_profile", "quality_profile")  # gateway files that travel in the ConfigMap


def cluster_config(cfg: HybridserveConfig, state_url: str, vllm_python: str,
                   bundled_files: dict[str, str] | None = None) -> dict[str, Any]:
    """The models.yaml the pods read (see the module docstring for what changes);
    `bundled_files` maps a gateway field (PROFILE_FIELDS) to its file name in the ConfigMap."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    gw = data.setdefault("gateway", {})
    gw.update(host="0.0.0.0", port=GATEWAY_PORT, state_url=state_url)
    gw.pop("ledger_path", None)
    for field, name in (bundled_files or {}).items():
        gw[field] = f"{CONFIG_DIR}/{name}"
    for raw, b in zip(data["backends"], cfg.backends):
        if not b.started_here:
            continue
        raw["host"] = service_name(b.name)
        raw["port"] = worker_port(cfg, b)
        raw.pop("cpu_cores", None)          # the pod's CPU limit bounds it; nothing to pin
        if b.engine == "vllm":
            raw.setdefault("vllm", {})["python"] = vllm_python
    return data


def _worker(cfg: HybridserveConfig, b: BackendConfig, image: str, namespace: str | None,
            models_pvc: str | None) -> list[dict]:
    name, port = service_name(b.name), worker_port(cfg, b)
    volumes = [{"name": "config", "configMap": {"name": f"{APP}-config"}},
               {"name": "cache", "emptyDir": {}}]
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "cache", "mountPath": CACHE_DIR}]
    if models_pvc:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": models_pvc, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": "/models", "readOnly": True})
    if b.engine == "vllm":   # vLLM's workers share tensors through /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if b.device.startswith("cuda"):
        resources = {"limits": {"nvidia.com/gpu": 1}}
    else:
        mem_gib = int(b.native.cache_memory_gb + 3) if b.engine == "native" else 8
        resources = {"requests": {"cpu": "2", "memory": f"{mem_gib}Gi"},
                     "limits": {"memory": f"{mem_gib + 2}Gi"}}
    load_s = int(b.vllm.startup_timeout_s if b.engine == "vllm" else 600)
    container = {
        "name": "worker", "image": image,
        "command": ["hybridserve", "worker", "--config", CONFIG_PATH, "--backend", b.name,
                    "--host", "0.0.0.0", "--port", str(port)],
        "env": [{"name": "HYBRIDSERVE_CACHE", "value": CACHE_DIR},
                {"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"}],
        "ports": [{"name": "http", "containerPort": port}],
        "startupProbe": _probe(port, 10, max(1, load_s // 10)),
        "readinessProbe": _probe(port, 5, 2),
        "livenessProbe": _probe(port, 15, 4),
        "resources": resources, "volumeMounts": mounts}
    # one pod per backend; Recreate frees the GPU before the new pod asks for it
    return [_deployment(name, "worker", namespace, 1, container, volumes, port, strategy="Recreate"),
            _service(name, "worker", namespace, port)]


def _gateway(cfg: HybridserveConfig, image: str, namespace: str | None, replicas: int) -> list[dict]:
    name = f"{APP}-gateway"
    env = []
    if cfg.gateway.auth == "required":
        env.append({"name": cfg.gateway.api_keys_env, "valueFrom": {"secretKeyRef": {
            "name": f"{APP}-api-keys", "key": "hashes", "optional": True}}})
    for b in cfg.backends:   # keys the gateway sends to remote backends, when the Secret has them
        if b.engine == "remote":
            env.append({"name": backend_key_env(b.name), "valueFrom": {"secretKeyRef": {
                "name": f"{APP}-backend-keys", "key": service_name(b.name), "optional": True}}})
    container = {
        "name": "gateway", "image": image,
        "command": ["hybridserve", "gateway", "--config", CONFIG_PATH],
        "env": env, "ports": [{"name": "http", "containerPort": GATEWAY_PORT}],
        "readinessProbe": _probe(GATEWAY_PORT, 5, 2), "livenessProbe": _probe(GATEWAY_PORT, 15, 4),
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]}
    out = [_deployment(name, "gateway", namespace, replicas, container,
                       [{"name": "config", "configMap": {"name": f"{APP}-config"}}], GATEWAY_PORT),
           _service(name, "gateway", namespace, GATEWAY_PORT)]
    if replicas > 1:
        out.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                    "metadata": _meta(name, "gateway", namespace),
                    "spec": {"minAvailable": 1, "selector": {"matchLabels": {
                        **_labels("gateway"), "app.kubernetes.io/instance": name}}}})
    return out


def _redis(namespace: str | None) -> list[dict]:
    name = f"{APP}-redis"
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(name, "state", namespace),
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    container = {"name": "redis", "image": REDIS_IMAGE,
                 "args": ["--appendonly", "yes", "--save", "", "--dir", "/data"],
                 "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                 "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
                 "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    dep = _deployment(name, "state", namespace, 1, container,
                      [{"name": "data", "persistentVolumeClaim": {"claimName": name}}], None, strategy="Recreate")
    svc = _service(name, "state", namespace, REDIS_PORT)
    svc["spec"]["ports"][0]["name"] = "redis"
    return [pvc, dep, svc]


def render(cfg: HybridserveConfig, image: str, *, namespace: str | None = None, gateway_replicas: int = 2,
           state_url: str | None = None, vllm_python: str = VLLM_PYTHON, models_pvc: str | None = None,
           config_dir: Path | None = None) -> list[dict]:
    """Every object of the deployment, in the order `kubectl apply` should create them."""
    if gateway_replicas < 1:
        raise ValueError("--gateway-replicas must be at least 1")
    names: dict[str, str] = {}
    for b in cfg.backends:
        if b.started_here:
            other = names.setdefault(service_name(b.name), b.name)
            if other != b.name:
                raise ValueError(f"backends '{other}' and '{b.name}' map to the same Service name "
                                 f"'{service_name(b.name)}'; rename one")
    objects: list[dict] = []
    bundled = state_url is None
    url = state_url or f"redis://{APP}-redis:{REDIS_PORT}/0"
    files: dict[str, str] = {}
    bundled_files: dict[str, str] = {}
    for field in PROFILE_FIELDS:
        ref = getattr(cfg.gateway, field)
        if not ref:
            continue
        path = Path(ref) if Path(ref).is_absolute() or config_dir is None else config_dir / ref
        if not path.is_file():
            raise ValueError(f"gateway.{field} '{ref}' was not found ({path}); the pods need "
                             "its content, so render from where it exists")
        files[f"{field}.json"] = path.read_text()
        bundled_files[field] = f"{field}.json"
    data = cluster_config(cfg, url, vllm_python, bundled_files)
    files["models.yaml"] = yaml.safe_dump(data, sort_keys=False)
    objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{APP}-config", "config", namespace),
                    "data": files})
    if bundled:
        objects += _redis(namespace)
    for b in cfg.backends:
        if b.started_here:
            objects += _worker(cfg, b, image, namespace, models_pvc)
    objects += _gateway(cfg, image, namespace, gateway_replicas)
    return objects


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's files) as literal blocks, readable in the output."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def dump(objects: list[dict]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False) for o in objects)
