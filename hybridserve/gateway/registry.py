"""Where each backend lives, whether it is up, how loaded it is, and which one a model name means.

Workers started by `hybridserve up` listen on `backend.port`, or when that is unset on
`gateway.port + 1 + i` (i counts the non-remote backends in file order); `remote`
backends live at their `url`. A poller scrapes every backend's /metrics each second:
`vllm:num_requests_running + vllm:num_requests_waiting` is its load, and a backend
that does not answer is down. A remote server without /metrics is health-checked
on /health, then /v1/models, and its load is what this gateway has in flight there.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from dataclasses import dataclass, field

import httpx

from hybridserve.config import BackendConfig, HybridserveConfig
from hybridserve.errors import BackendUnavailableError, ModelNotFoundError

logger = logging.getLogger(__name__)

AUTO = "auto"
HEALTH_TIMEOUT_S = 2.0
_LOAD_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def worker_port(cfg: HybridserveConfig, backend: BackendConfig) -> int:
    """The port hybridserve starts this backend's worker on."""
    if backend.port:
        return backend.port
    local = [b.name for b in cfg.backends if b.engine != "remote"]
    return cfg.gateway.port + 1 + local.index(backend.name)


def backend_url(cfg: HybridserveConfig, backend: BackendConfig) -> str:
    if backend.engine == "remote":  # the server's root: a base URL ending in /v1 works too
        return backend.url.rstrip("/").removesuffix("/v1")  # type: ignore[union-attr]
    return f"http://{backend.host or '127.0.0.1'}:{worker_port(cfg, backend)}"


def backend_key_env(name: str) -> str:
    """Env var holding the API key hybridserve sends to a remote backend (optional)."""
    return "HYBRIDSERVE_BACKEND_KEY_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def parse_load(text: str) -> float:
    """Sum running + waiting requests over every label set of a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(_LOAD_METRICS):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return total


def parse_cache_usage(text: str) -> float:
    """The largest `vllm:kv_cache_usage_perc` (0..1) on a Prometheus text page."""
    usage = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc"):
            try:
                usage = max(usage, float(line.rsplit(" ", 1)[1]))
            except (IndexError, ValueError):
                continue
    return usage


@dataclass
class BackendState:
    config: BackendConfig
    url: str
    auth_header: str | None = None
    healthy: bool = False
    scraped_load: float = 0.0
    cache_usage: float = 0.0
    inflight: int = 0
    health_path: str = "/metrics"
    last_error: str = "not checked yet"
    slow_checks: int = 0
    checked_at: float = 0.0

    @property
    def name(self) -> str:
        return self.config.name

    def load(self) -> float:
        return max(self.scraped_load, float(self.inflight))

    def mark_down(self, why: str) -> None:
        if self.healthy:
            logger.warning("backend %s marked down: %s", self.name, why)
        self.healthy = False
        self.last_error = why


@dataclass
class Registry:
    """All backends, the model names that reach them, and their live health and load."""

    cfg: HybridserveConfig
    backends: dict[str, BackendState] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    _rr: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def from_config(cls, cfg: HybridserveConfig, environ=os.environ) -> "Registry":
        reg = cls(cfg)
        for b in cfg.backends:
            key = environ.get(backend_key_env(b.name))
            reg.backends[b.name] = BackendState(b, backend_url(cfg, b),
                                                f"Bearer {key}" if key else None)
        for tier, names in cfg.tiers().items():  # tiers first: explicit aliases win a clash
            if tier not in reg.backends:
                reg.groups[tier] = names
        reg.groups.update(cfg.aliases)
        reg.groups[AUTO] = list(reg.backends)
        return reg

    def resolve(self, model: str) -> tuple[list[BackendState], bool]:
        """Backends a model name may go to, and whether it was pinned to one backend."""
        if model in self.backends:
            return [self.backends[model]], True
        if model in self.groups:
            return [self.backends[n] for n in self.groups[model]], False
        known = sorted(self.backends) + sorted(self.groups)
        raise ModelNotFoundError(f"model '{model}' does not exist here; use one of: "
                                 + ", ".join(known))

    def order(self, candidates: list[BackendState], pinned: bool,
              preferred: frozenset[str] = frozenset()) -> list[BackendState]:
        """Candidates to try, best first: healthy, `preferred` first, then least loaded
        (round-robin among equals)."""
        if pinned:
            return candidates
        up = [b for b in candidates if b.healthy]
        if not up:
            names = ", ".join(b.name for b in candidates)
            raise BackendUnavailableError(f"no healthy backend for this model (tried: {names}); "
                                          "retry shortly")
        turn = next(self._rr)
        n = len(up)
        return sorted(up, key=lambda b: (b.name not in preferred, b.load(), (up.index(b) - turn) % n))

    # ---------------------------------------------------------------- health

    async def check(self, client: httpx.AsyncClient, b: BackendState) -> None:
        headers = {"authorization": b.auth_header} if b.auth_header else None
        paths = [b.health_path] + [p for p in ("/metrics", "/health", "/v1/models")
                                   if p != b.health_path]
        for path in paths:
            try:
                r = await client.get(b.url + path, headers=headers, timeout=HEALTH_TIMEOUT_S)
            except httpx.TimeoutException:
                # a busy worker may answer late: down only after two slow checks in a row
                b.slow_checks += 1
                if b.slow_checks >= 2:
                    b.mark_down(f"no answer on {path} within {HEALTH_TIMEOUT_S:g}s")
                return
            except httpx.HTTPError as err:
                b.mark_down(f"{type(err).__name__} on {path}")
                return
            b.slow_checks = 0
            if r.status_code == 404:
                continue
            b.checked_at = time.monotonic()
            if r.status_code != 200:
                b.mark_down(f"{path} answered {r.status_code}")
                return
            b.health_path = path
            b.scraped_load = parse_load(r.text) if path == "/metrics" else 0.0
            b.cache_usage = parse_cache_usage(r.text) if path == "/metrics" else 0.0
            if not b.healthy:
                logger.info("backend %s is up at %s", b.name, b.url)
            b.healthy = True
            b.last_error = ""
            return
        b.mark_down("no /metrics, /health or /v1/models")

    async def poll_once(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.check(client, b) for b in self.backends.values()))

    async def run_poller(self, client: httpx.AsyncClient, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll_once(client)
            except Exception:  # keep polling whatever one round did
                logger.exception("health poll failed")

    def prometheus_targets(self) -> list[dict]:
        """Prometheus HTTP service discovery: a target group per backend that serves /metrics.

        Labels name the backend (`backend`, `arch`, `engine`, `tier`, `device`), so one
        scrape job covers native and vLLM workers alike. A remote server found to have
        no /metrics (health-checked elsewhere) is left out; a URL path prefix becomes
        `__metrics_path__`, https becomes `__scheme__`.
        """
        groups = []
        for b in self.backends.values():
            if b.health_path != "/metrics":
                continue
            url, c = httpx.URL(b.url), b.config
            labels = {"backend": b.name, "arch": c.arch, "engine": c.engine, "tier": c.tier,
                      "device": c.device}
            if url.scheme == "https":
                labels["__scheme__"] = "https"
            if url.path.strip("/"):
                labels["__metrics_path__"] = url.path.rstrip("/") + "/metrics"
            port = url.port or (443 if url.scheme == "https" else 80)
            groups.append({"targets": [f"{url.host}:{port}"], "labels": labels})
        return groups

    def cards(self) -> list[dict]:
        """/v1/models entries: every backend, then every alias (tiers and `auto` included)."""
        out = []
        for b in self.backends.values():
            c = b.config
            out.append({"id": b.name, "object": "model", "created": 0, "owned_by": "hybridserve",
                        "max_model_len": c.max_context, "arch": c.arch, "engine": c.engine,
                        "tier": c.tier, "healthy": b.healthy})
        for alias, names in self.groups.items():
            out.append({"id": alias, "object": "model", "created": 0,
                        "owned_by": "hybridserve-alias", "backends": names,
                        "max_model_len": max(self.backends[n].config.max_context for n in names)})
        return out
