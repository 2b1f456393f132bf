"""The launcher as a process, with a stand-in for vLLM (no vLLM needed, a few seconds).

`vllm.python` points at a small script that takes vLLM's command line: it serves
/health on --port, prints a line, and exits when told to (or fails at once, or never
becomes healthy), so the launcher's health-wait, messages, log prefix, restart with
back-off and clean stop are checked without starting vLLM.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.serving.conftest import REPO, free_port, wait_until

pytestmark = pytest.mark.timeout(60)

FAKE = r'''#!{python}
import http.server, os, sys, threading
argv = sys.argv
mode = os.environ.get("FAKE_MODE", "serve")
print("fake vllm argv:", " ".join(argv[1:]), flush=True)
if mode == "fail":
    print("boom: cannot load the model", flush=True)
    sys.exit(3)
if mode == "hang":
    threading.Event().wait()
port = int(argv[argv.index("--port") + 1])

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        if self.path == "/die":
            os._exit(7)
    def log_message(self, *a):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def worker(tmp_path, mode: str, *extra: str, timeout_s: float = 30) -> tuple[subprocess.Popen, int]:
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE.replace("{python}", sys.executable))
    fake.chmod(0o755)
    port = free_port()
    cfg = {"gateway": {"auth": "disabled"}, "backends": [
        {"name": "fake-v", "arch": "hybrid", "engine": "vllm", "checkpoint": "org/model",
         "price_per_hour": 1, "port": port,
         "vllm": {"python": str(fake), "startup_timeout_s": timeout_s}}]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "hybridserve.cli", "worker", "--config", str(path),
                             "--backend", "fake-v", *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "FAKE_MODE": mode})
    return proc, port


def die(url: str) -> None:
    time.sleep(1.5)  # the launcher polls /health every 0.5 s: let it see vLLM ready first
    try:
        httpx.get(url + "/die", timeout=2, trust_env=False)
    except httpx.HTTPError:
        pass


def test_failing_vllm_is_reported_with_its_last_lines(tmp_path):
    proc, _ = worker(tmp_path, "fail")
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 1
    assert "[fake-v] boom: cannot load the model" in out  # forwarded, prefixed
    assert "exited with code 3 while starting" in out
    assert "--served-model-name fake-v" in out and "--no-enable-prefix-caching" in out


def test_health_wait_times_out_with_a_clear_message(tmp_path):
    proc, port = worker(tmp_path, "hang", timeout_s=1.5)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 1
    assert f"did not answer http://127.0.0.1:{port}/health within 1.5s" in out
    assert "vllm.startup_timeout_s" in out


def test_standalone_worker_restarts_vllm_with_backoff_and_stops_cleanly(tmp_path):
    proc, port = worker(tmp_path, "serve")
    url = f"http://127.0.0.1:{port}"
    ok = lambda: httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200  # noqa: E731
    try:
        wait_until(ok, 20, "fake vLLM healthy")
        die(url)
        time.sleep(0.3)
        wait_until(ok, 20, "fake vLLM restarted")
        time.sleep(1.5)  # as in die(): the launcher sees it ready before it is told to stop
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "vLLM died (exit code 7); restarting in 1s" in out
    assert out.count("vLLM is ready on port") == 2
    assert "vLLM stopped" in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=1, trust_env=False)


def test_under_up_the_worker_runs_vllm_once(tmp_path):
    proc, port = worker(tmp_path, "serve", "--no-restart")
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=1,
                                     trust_env=False).status_code == 200, 20, "fake vLLM healthy")
        die(f"http://127.0.0.1:{port}")
        out = proc.communicate(timeout=20)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7, out  # the supervisor sees vLLM's exit and restarts this worker
    assert "vLLM died (exit code 7)" in out and "restarting" not in out
