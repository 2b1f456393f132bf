"""A worker that dies: pinned requests get 503 JSON, `auto` goes to the other backend,
and the supervisor brings the dead one back."""
from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.serving.conftest import log_tail, tiny_stack, wait_until

pytestmark = pytest.mark.timeout(200)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from tiny_stack(tmp_path_factory.mktemp("restart"))


def post(stack, model: str) -> httpx.Response:
    return httpx.post(stack.base_url + "/completions", headers=stack.headers(), timeout=60,
                      trust_env=False, json={"model": model, "prompt": "hello", "max_tokens": 2})


def test_killed_worker_is_routed_around_and_restarted(stack):
    victim, survivor = "tiny-hybrid", "tiny-transformer"
    assert post(stack, victim).status_code == 200
    pid = stack.worker_pid(victim)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: post(stack, victim).status_code == 503, 10, "pinned request gets 503")

    # straight after the 503 the gateway knows the victim is down, and the supervisor's
    # back-off (1 s) plus the process start keep it down for this burst
    r = post(stack, victim)
    routed = [post(stack, "auto") for _ in range(4)]
    if r.status_code == 503:
        err = r.json()["error"]
        assert err["type"] == "service_unavailable" and victim in err["message"]
        assert r.headers["x-hybridserve-backend"] == victim
        for a in routed:
            assert a.status_code == 200, a.text
            assert a.headers["x-hybridserve-backend"] == survivor

    wait_until(lambda: post(stack, victim).status_code == 200, 120, "restarted worker serves", 0.5)
    assert stack.worker_pid(victim) != pid
    assert "tiny-hybrid died" in log_tail(stack.log, 400)
    assert "restarted tiny-hybrid" in log_tail(stack.log, 400)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_drains_in_flight_stream_then_stops_everything(stack):
    pids = [stack.worker_pid(n) for n in stack.workers]
    body = {"model": "tiny-transformer", "prompt": "hello", "max_tokens": 300, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", stack.base_url + "/completions", json=body, headers=stack.headers(),
                      timeout=60, trust_env=False) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line)
                if len(events) == 2:
                    stack.proc.send_signal(signal.SIGTERM)  # mid-stream
    assert events[-1] == "data: [DONE]"
    assert '"completion_tokens":300' in events[-2]  # the stream ran to its end
    assert stack.proc.wait(timeout=60) == 0
    wait_until(lambda: not any(_alive(p) for p in pids), 10, "workers stopped")
    assert "all processes stopped" in log_tail(stack.log, 50)
