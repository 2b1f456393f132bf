"""Start a private `hybridserve up` for an eval run (when no --url is given), and stop it.

The selected profile of the config is written as a flat temporary copy with the gateway
on 127.0.0.1, a free port (with the next ports, where `up` puts workers that have no
`port`, free too) and `auth: disabled` (loopback only, this process is the only
client). `up` runs as a child in its own session with its log in `log_path`; `start`
waits until the gateway's /health lists every backend healthy, `stop` sends SIGTERM
(the gateway drains, then the workers stop) and kills what outlives the grace.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

logger = logging.getLogger(__name__)


class StackError(RuntimeError):
    """The stack could not be started."""


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_run(count: int) -> int:
    """A port p with p .. p+count-1 all free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + count < 65535 and all(_free(p + i) for i in range(1, count)):
            return p
    raise StackError("no run of free ports found")


def eval_config(config_path: str, profile: str | None, port: int) -> dict:
    """The selected section of models.yaml, flat, with the gateway moved to 127.0.0.1:port."""
    data = yaml.safe_load(Path(config_path).read_text()) or {}
    if isinstance(data, dict) and "profiles" in data:
        profiles = data["profiles"] or {}
        name = profile or data.get("default_profile") or next(iter(profiles), None)
        if name not in profiles:
            raise StackError(f"{config_path}: profile {name!r} not found")
        data = profiles[name]
    data = dict(data)
    data["gateway"] = {**(data.get("gateway") or {}), "host": "127.0.0.1", "port": port, "auth": "disabled"}
    return data


class Stack:
    def __init__(self, config_path: str, profile: str | None, log_path: Path, ready_timeout_s: float = 600.0,
                 engine_factory: str | None = None):
        self.config_path, self.profile, self.engine_factory = config_path, profile, engine_factory
        self.log_path, self.ready_timeout_s = log_path, ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.tmpdir: tempfile.TemporaryDirectory | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        """Start `up` and wait until it serves; the /v1 URL."""
        from hybridserve.config import load_config

        n_backends = len(load_config(self.config_path, self.profile).backends)
        self.port = free_port_run(n_backends + 1)
        self.tmpdir = tempfile.TemporaryDirectory(prefix="hybridserve-eval-")
        cfg_path = Path(self.tmpdir.name) / "models.yaml"
        cfg_path.write_text(yaml.safe_dump(eval_config(self.config_path, self.profile, self.port)))
        argv = [sys.executable, "-m", "hybridserve.cli", "up", "--config", str(cfg_path),
                "--log-level", "warning", "--ready-timeout", str(self.ready_timeout_s)]
        if self.engine_factory:
            argv += ["--engine-factory", self.engine_factory]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        logger.info("started hybridserve up (pid %d) on port %d; log: %s", self.proc.pid, self.port, self.log_path)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _ready(self) -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0, trust_env=False)
            backends = r.json().get("backends", {}) if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return False
        return bool(backends) and all(b.get("healthy") for b in backends.values())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(f"hybridserve up exited with code {self.proc.returncode}; see {self.log_path}")
            if self._ready():
                return
            time.sleep(0.5)
        raise StackError(f"the stack was not healthy within {self.ready_timeout_s:g}s; see {self.log_path}")

    def stop(self, grace_s: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("hybridserve up did not stop in %gs; killing its process group", grace_s)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None

    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
