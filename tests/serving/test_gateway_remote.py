"""The gateway in front of `engine: remote` backends (mock upstreams): routing, auth,
failures, timeouts, streaming pass-through and disconnects. No engine needed."""
from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
from openai import OpenAI

from tests.serving.conftest import (API_KEY, free_port, log_tail, start_mock_upstream, start_stack,
                                    stop_process, wait_until)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote")
    mocks = {}
    try:
        backends = []
        for n in ("up1", "up2"):
            mocks[n], backend = start_mock_upstream(tmp, n)
            backends.append(backend)
        backends.append({"name": "dead", "arch": "hybrid", "engine": "remote", "max_context": 4096,
                         "url": f"http://127.0.0.1:{free_port()}", "price_per_hour": 0.1})
        env = {"HYBRIDSERVE_BACKEND_KEY_UP2": "upstream-secret",  # sent to up2 only
               "HYBRIDSERVE_API_KEYS": hashlib.sha256(API_KEY.encode()).hexdigest()}
        # the client key arrives hashed by env, not by config: auth stays required
        stack = start_stack(tmp, backends, gateway={"api_key_hashes": [], "request_timeout_s": 1.5},
                            aliases={"pair": ["up1", "up2"]}, env=env)
        stack.extra["mocks"] = {b["name"]: b["url"] for b in backends[:2]}
        yield stack
        stop_process(stack.proc)
        assert stack.proc.returncode == 0, log_tail(stack.log)
    finally:
        for m in mocks.values():
            stop_process(m, 5)


def post(stack, body, headers=None) -> httpx.Response:
    return httpx.post(stack.base_url + "/completions", json={"prompt": "hi", **body},
                      headers={**stack.headers(), **(headers or {})}, timeout=10, trust_env=False)


def stats(stack, name) -> dict:
    return httpx.get(stack.extra["mocks"][name] + "/stats", trust_env=False).json()


def test_up_starts_nothing_for_remote_backends(remote):
    log = log_tail(remote.log, 200)
    assert "started gateway" in log
    assert "started up1" not in log and "started dead" not in log


def test_pinned_routing_request_ids_and_keys(remote):
    r = post(remote, {"model": "up1"}, headers={"x-request-id": "my-req-42"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello from up1"
    assert r.headers["x-hybridserve-backend"] == "up1"
    assert r.headers["x-hybridserve-request-id"] == "my-req-42"
    s = stats(remote, "up1")
    assert s["last_request_id"] == "my-req-42"
    assert s["last_authorization"] is None  # the client's gateway key never goes upstream
    assert post(remote, {"model": "up2"}).status_code == 200
    assert stats(remote, "up2")["last_authorization"] == "Bearer upstream-secret"


def test_openai_client_through_remote(remote):
    client = OpenAI(base_url=remote.base_url, api_key=API_KEY, max_retries=0)
    out = client.completions.create(model="pair", prompt="hi", max_tokens=3)
    assert out.choices[0].text.startswith("hello from up")
    ids = {m.id for m in client.models.list()}
    assert {"up1", "up2", "dead", "pair", "auto"} <= ids


def test_dead_backend_503_and_auto_avoids_it(remote):
    r = post(remote, {"model": "dead"})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"
    assert r.headers["x-hybridserve-backend"] == "dead"
    seen = {post(remote, {"model": "auto"}).headers["x-hybridserve-backend"] for _ in range(6)}
    assert seen == {"up1", "up2"}  # both live ones get work; the dead one none


def test_unknown_route_and_bad_key(remote):
    r = httpx.get(remote.url + "/v1/nothing", trust_env=False)
    assert r.status_code == 404 and "error" in r.json()
    assert r.headers["x-hybridserve-request-id"]
    r = post(remote, {"model": "up1"}, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_request_timeout_gives_504(remote):
    t0 = time.monotonic()
    r = post(remote, {"model": "up1", "delay_s": 5})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert time.monotonic() - t0 < 4
    assert post(remote, {"model": "up1"}).status_code == 200


def test_stream_passes_through_chunk_by_chunk(remote):
    body = {"model": "up1", "prompt": "hi", "stream": True, "max_tokens": 4, "delay_s": 0.3}
    arrivals = []
    t0 = time.monotonic()
    with httpx.stream("POST", remote.base_url + "/completions", json=body, headers=remote.headers(),
                      timeout=10, trust_env=False) as r:
        assert r.headers["x-hybridserve-backend"] == "up1"
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append((time.monotonic() - t0, line))
    assert arrivals[-1][1] == "data: [DONE]" and len(arrivals) == 5
    assert arrivals[0][0] < arrivals[-1][0] - 0.6  # the first chunk came long before the last


def test_client_disconnect_reaches_upstream(remote):
    before = stats(remote, "up2")["streams_cut"]
    body = {"model": "up2", "prompt": "hi", "stream": True, "max_tokens": 100, "delay_s": 0.05}
    with httpx.stream("POST", remote.base_url + "/completions", json=body, headers=remote.headers(),
                      timeout=10, trust_env=False) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
    wait_until(lambda: stats(remote, "up2")["streams_cut"] == before + 1, 5, "upstream saw the cut")


def test_gateway_metrics_per_backend(remote):
    post(remote, {"model": "up1"})
    text = httpx.get(remote.url + "/metrics", trust_env=False).text
    assert 'hybridserve_gateway_requests_total{backend="up1"' in text
    assert 'hybridserve_backend_up{backend="dead"} 0.0' in text
    assert 'hybridserve_backend_up{backend="up1"} 1.0' in text
    assert 'hybridserve_gateway_added_latency_seconds_count{backend="up1"}' in text
    assert 'hybridserve_gateway_errors_total{backend="dead",type="service_unavailable"}' in text


def test_upstream_crash_mid_stream_ends_with_an_error_event(remote):
    body = {"model": "up1", "prompt": "hi", "stream": True, "max_tokens": 10, "crash_after": 2}
    with httpx.stream("POST", remote.base_url + "/completions", json=body, headers=remote.headers(),
                      timeout=10, trust_env=False) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 3
    assert json.loads(events[-1][5:])["error"]["type"] == "bad_gateway"
    assert post(remote, {"model": "up1"}).status_code == 200  # and the gateway carries on
