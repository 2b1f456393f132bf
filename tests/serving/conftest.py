"""Live-process fixtures: `hybridserve up` on free loopback ports, always torn down.

`stack` starts the gateway plus a tiny-transformer and a tiny-hybrid worker once per
module through `hybridserve up` (so the supervisor is exercised too). Set
HYBRIDSERVE_TEST_ENGINE=fake to run the same tests against tests/serving/fake_engine
(serving-layer debugging only; the default is the real native engine).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-hybridserve"
TINY = {"tiny-transformer": "transformer", "tiny-hybrid": "hybrid"}
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as err:
            last = err
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s}s (last: {last!r})")


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200


def stop_process(proc: subprocess.Popen, grace_s: float = 40.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL) if _own_group(proc) else proc.kill()
            proc.wait()


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def spawn(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def start_mock_upstream(tmp: Path, name: str) -> tuple[subprocess.Popen, dict]:
    """tests/serving/mock_upstream.py on a free port, and the `engine: remote` backend for it."""
    port = free_port()
    proc = spawn([sys.executable, str(REPO / "tests/serving/mock_upstream.py"), str(port), name],
                 tmp / f"{name}.log")
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/stats", trust_env=False).status_code == 200,
               20, f"mock {name} up")
    return proc, {"name": name, "arch": "transformer", "engine": "remote", "max_context": 256,
                  "url": f"http://127.0.0.1:{port}", "price_per_hour": 0.1}


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server of our own on a free loopback port (no persistence), and its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis
    client = redis.Redis(port=port, socket_timeout=1)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
    wait_until(up, 10, "redis-server up")
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """One redis-server per test module that asks for it (skips where redis-server is absent)."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)


def log_tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class Stack:
    """A running `hybridserve up`: where to call it and how to find its workers."""

    url: str
    workers: dict[str, str]
    proc: subprocess.Popen
    log: Path
    config: Path
    key: str = API_KEY
    extra: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def worker_pid(self, name: str) -> int:
        return httpx.get(self.workers[name] + "/health", timeout=5, trust_env=False).json()["pid"]


def engine_backends(ckpt_dir: Path, max_context: int = 512) -> tuple[list[dict], list[str]]:
    """Backend entries for the two tiny models, plus extra `up` args (fake engine only)."""
    fake = os.environ.get("HYBRIDSERVE_TEST_ENGINE") == "fake"
    backends = []
    for name, arch in TINY.items():
        backends.append({"name": name, "arch": arch, "engine": "native",
                         "checkpoint": str(ckpt_dir) if fake else f"builtin:{name}",
                         "max_context": max_context, "price_per_hour": 0.5, "port": free_port(),
                         "tier": "standard" if arch == "transformer" else "economy",
                         "native": {"max_num_seqs": 32, "max_num_batched_tokens": 512,
                                    "cache_memory_gb": 0.25}})
    extra = ["--engine-factory", "tests.serving.fake_engine:make"] if fake else []
    return backends, extra


def start_stack(tmp: Path, backends: list[dict], gateway: dict | None = None,
                up_args: list[str] | None = None, aliases: dict | None = None,
                env: dict | None = None) -> Stack:
    port = free_port()
    gw = {"host": "127.0.0.1", "port": port, "auth": "required",
          "api_key_hashes": [hashlib.sha256(API_KEY.encode()).hexdigest()],
          "request_timeout_s": 60}
    gw.update(gateway or {})
    cfg = {"gateway": gw, "backends": backends, "aliases": aliases or {}}
    path = tmp / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp / "up.log"
    proc = spawn([sys.executable, "-m", "hybridserve.cli", "up", "--config", str(path),
                  "--ready-timeout", str(STARTUP_TIMEOUT_S), *(up_args or [])], log, env)
    workers = {b["name"]: f"http://127.0.0.1:{b['port']}" for b in backends
               if b.get("engine", "native") != "remote"}
    stack = Stack(f"http://127.0.0.1:{port}", workers, proc, log, path)
    try:
        wait_until(lambda: proc.poll() is None and "hybridserve is up" in log.read_text(errors="replace"),
                   STARTUP_TIMEOUT_S + 10, "`hybridserve up` ready", 0.25)
        wait_until(lambda: all(b["healthy"] for b in httpx.get(
            stack.url + "/health", timeout=2, trust_env=False).json()["backends"].values()
            if b["url"] in workers.values()), 10, "gateway sees every worker")
    except BaseException:
        stop_process(proc)
        raise RuntimeError("stack failed to start:\n" + log_tail(log)) from None
    return stack


def native_and_mock_stack(tmp: Path, native: str, max_context: int = 512, gateway: dict | None = None):
    """A stack of one tiny native backend (`native`) and a mock upstream `up1`; yields the stack
    and stops both (a fixture's body: `yield from native_and_mock_stack(...)`)."""
    mock_proc, mock = start_mock_upstream(tmp, "up1")
    backends, extra = engine_backends(tmp, max_context=max_context)
    try:
        s = start_stack(tmp, [*[b for b in backends if b["name"] == native], mock], gateway=gateway,
                        up_args=extra)
    except BaseException:
        stop_process(mock_proc, 5)
        raise
    yield s
    stop_process(s.proc)
    stop_process(mock_proc, 5)


def tiny_stack(tmp: Path, max_context: int = 512, aliases: dict | None = None):
    """A stack of the two tiny native backends; yields it, stops it and checks it exited cleanly
    (a fixture's body: `yield from tiny_stack(...)`)."""
    backends, extra = engine_backends(tmp, max_context=max_context)
    stack = start_stack(tmp, backends, up_args=extra, aliases=aliases)
    yield stack
    stop_process(stack.proc)
    assert stack.proc.returncode == 0, log_tail(stack.log)


def openai_client_of(stack: Stack):
    """The `openai` client of a stack's gateway (no retries), closed afterwards (a fixture's
    body: `yield from openai_client_of(stack)`)."""
    from openai import OpenAI

    with OpenAI(base_url=stack.base_url, api_key=stack.key, timeout=60, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def engine_stack(tmp_path_factory) -> Stack:
    yield from tiny_stack(tmp_path_factory.mktemp("stack"), aliases={"any-tiny": list(TINY)})


@pytest.fixture()
def openai_client(engine_stack):
    yield from openai_client_of(engine_stack)
