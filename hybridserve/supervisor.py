"""`hybridserve up`: start one worker per local backend plus the gateway, keep them alive.

Children are plain processes (`python -m hybridserve.cli worker|gateway ...`; for an
`engine: vllm` backend the worker process runs vLLM's own OpenAI server from vLLM's
venv, see hybridserve/worker/vllm_launcher.py, and prefixes its log lines) in
their own session, so Ctrl-C reaches only the supervisor, which then stops them in
order: the gateway first (it drains in-flight requests), then the workers. A child
that dies on its own is reported and restarted after a back-off (1 s, doubling to
30 s; reset once it has stayed up a minute). Children also get SIGTERM if the
supervisor itself dies (Linux parent-death signal), so nothing is left orphaned.
Each worker computing on the CPU is pinned to its own share of the cores, its thread
pool sized to that share (`cpu_cores`, see hybridserve/cpu_binding.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from hybridserve.config import ConfigError, HybridserveConfig
from hybridserve.cpu_binding import (available_cores, binding_env, check_cores, format_cores,
                                     plan_cores)
from hybridserve.gateway.registry import worker_port
from hybridserve.worker.vllm_launcher import die_with_parent

BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0


@dataclass
class Child:
    name: str
    argv: list[str]
    health_url: str
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    history: list[int] = field(default_factory=list)
    cores: list[int] | None = None  # pinned to these (threads: cpu_binding.compute_threads)
    engine: str = "native"

    def start(self) -> None:
        env, cores = None, self.cores

        def preexec() -> None:
            die_with_parent()
            if cores and hasattr(os, "sched_setaffinity"):  # Linux; elsewhere threads only
                os.sched_setaffinity(0, cores)

        if cores:
            env = {**os.environ, **binding_env(cores, self.engine, os.environ)}
        self.proc = subprocess.Popen(self.argv, start_new_session=True, env=env, preexec_fn=preexec)
        self.started_at = time.monotonic()
        self.restart_at = None

    def healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=1.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False


def check_startable(cfg: HybridserveConfig) -> None:
    """Refuse, before starting anything, what cannot start (ConfigError naming the fix)."""
    try:
        check_cores(cfg.backends, available_cores())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    vllm = [b for b in cfg.backends if b.engine == "vllm" and b.started_here]
    if vllm:
        from hybridserve.worker.vllm_launcher import check_vllm_backend

        for b in vllm:  # vLLM's interpreter exists, flags are possible on this device
            check_vllm_backend(b)


def plan_children(cfg: HybridserveConfig, config_path: str, profile: str | None,
                  log_level: str = "info", engine_factory: str | None = None) -> list[Child]:
    """Workers (one per backend started here: not remote, no `host`) then the gateway, as commands."""
    base = [sys.executable, "-m", "hybridserve.cli"]
    common = ["--config", config_path, "--log-level", log_level]
    if profile:
        common += ["--profile", profile]
    children = []
    cores = plan_cores(cfg.backends, available_cores())
    for b in cfg.backends:
        if not b.started_here:
            continue
        port = worker_port(cfg, b)
        argv = base + ["worker", *common, "--backend", b.name, "--port", str(port)]
        if b.engine == "vllm":
            # the worker runs vLLM's server once; this supervisor restarts it with back-off
            argv += ["--no-restart"]
        elif engine_factory:
            argv += ["--engine-factory", engine_factory]
        children.append(Child(b.name, argv, f"http://127.0.0.1:{port}/health",
                              cores=cores.get(b.name), engine=b.engine))
    gw = cfg.gateway
    host = "127.0.0.1" if gw.host in ("0.0.0.0", "::") else gw.host
    children.append(Child("gateway", base + ["gateway", *common],
                          f"http://{host}:{gw.port}/health"))
    return children


class Supervisor:
    def __init__(self, children: list[Child], say: Callable[[str], None]):
        self.children = children
        self.say = say
        self.stopping = False

    def start_all(self) -> None:
        for c in self.children:
            c.start()
            where = f", cores {format_cores(c.cores)}" if c.cores else ""
            self.say(f"started {c.name} (pid {c.proc.pid}{where})")

    def wait_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        pending = list(self.children)
        while pending and time.monotonic() < deadline and not self.stopping:
            for c in list(pending):
                if c.proc.poll() is not None:
                    self.say(f"{c.name} exited with code {c.proc.returncode} while starting")
                    return False
                if c.healthy():
                    pending.remove(c)
            time.sleep(0.2)
        return not pending

    def tick(self) -> None:
        """Notice dead children and restart them once their back-off has passed."""
        now = time.monotonic()
        for c in self.children:
            if c.restart_at is not None:
                if now >= c.restart_at:
                    c.start()
                    self.say(f"restarted {c.name} (pid {c.proc.pid}, restart #{c.failures})")
                continue
            code = c.proc.poll()
            if code is None:
                continue
            c.failures = 1 if now - c.started_at > STABLE_AFTER_S else c.failures + 1
            delay = min(BACKOFF_MAX_S, 2.0 ** (c.failures - 1))
            c.history.append(code)
            c.restart_at = now + delay
            self.say(f"{c.name} died (exit code {code}); restarting in {delay:g}s")

    def stop_all(self, grace_s: float = 30.0) -> None:
        """Gateway first (drains its clients), then the workers; kill what outlives the grace."""
        self.stopping = True
        gateway = [c for c in self.children if c.name == "gateway"]
        workers = [c for c in self.children if c.name != "gateway"]
        for group in (gateway, workers):
            live = [c for c in group if c.proc and c.proc.poll() is None]
            for c in live:
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for c in live:
                try:
                    c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"{c.name} did not stop in {grace_s:g}s; killing it")
                    c.proc.kill()
                    c.proc.wait()


def banner(cfg: HybridserveConfig) -> str:
    gw = cfg.gateway
    host = "127.0.0.1" if gw.host in ("0.0.0.0", "::") else gw.host
    url = f"http://{host}:{gw.port}"
    key = "$HYBRIDSERVE_KEY" if gw.auth == "required" else "none"
    auth = f' -H "Authorization: Bearer {key}"' if gw.auth == "required" else ""
    names = ", ".join([b.name for b in cfg.backends] + ["auto"])
    return f"""
hybridserve is up: {url}/v1   (models: {names})

  curl {url}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{{"model": "auto", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{url}/v1", api_key="{key}")
r = c.chat.completions.create(model="auto", messages=[{{"role": "user", "content": "Hello"}}], max_tokens=32)
print(r.choices[0].message.content, r.usage)'

builtin:small-* and builtin:tiny-* have random weights (they measure serving, not answers);
builtin:smollm2-135m-instruct is a real model: `auto` answers with it in the cpu profile.
Metrics: {url}/metrics   Health: {url}/health   Stop: Ctrl-C
"""


def _wait_gateway_sees_backends(cfg: HybridserveConfig, timeout_s: float) -> bool:
    """Wait until the gateway's own health poll reports every backend healthy.

    Workers answering /health is not enough: the gateway learns of them on its next
    poll, and a request sent in between would get a 503. Bounded; a remote backend
    that is down does not hold `up` for longer than `timeout_s`.
    """
    host = "127.0.0.1" if cfg.gateway.host in ("0.0.0.0", "::") else cfg.gateway.host
    url = f"http://{host}:{cfg.gateway.port}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            backends = httpx.get(url, timeout=1.0, trust_env=False).json().get("backends", {})
            if backends and all(b.get("healthy") for b in backends.values()):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    return False


def run_up(cfg: HybridserveConfig, config_path: str, profile: str | None, *,
           log_level: str = "info", engine_factory: str | None = None,
           ready_timeout_s: float = 600.0, say: Callable[[str], None] = print) -> int:
    """Start everything, print how to call it, supervise until SIGINT/SIGTERM; exit code."""
    check_startable(cfg)
    sup = Supervisor(plan_children(cfg, config_path, profile, log_level, engine_factory), say)

    def on_signal(signum, _frame) -> None:
        sup.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sup.start_all()
    try:
        if not sup.wait_healthy(ready_timeout_s):
            if not sup.stopping:
                say(f"not every process became healthy within {ready_timeout_s:g}s; stopping")
                return 1
            return 0
        _wait_gateway_sees_backends(cfg, timeout_s=15.0)
        say(banner(cfg))
        while not sup.stopping:
            sup.tick()
            time.sleep(0.25)
        say("stopping: draining in-flight requests")
        return 0
    finally:
        sup.stop_all()
        say("all processes stopped")
