"""Quality-aware routing live through the gateway, in front of three mock upstreams (no engine).

Prices: weak 0.1 < mid 0.2 < strong 0.4 $/h, so without a floor `auto` picks weak. The
quality profile says weak is good at facts (0.9) and bad at arithmetic (0.0), mid good at
arithmetic (0.7), strong good overall (0.9); the global floor is 0.6. The mocks answer every
token with logprob -3.0 (weak), -0.5 (mid), -0.1 (strong); the cascade threshold is -1.0, so
a cascade from weak escalates once, to a voting rung on mid, and stops there.
"""
from __future__ import annotations

import json
import sys

import httpx
import pytest

from tests.serving.conftest import REPO, free_port, log_tail, spawn, start_stack, stop_process, wait_until

pytestmark = pytest.mark.timeout(90)

PRICES = {"weak": 0.1, "mid": 0.2, "strong": 0.4}
LOGPROBS = {"weak": -3.0, "mid": -0.5, "strong": -0.1}


def _tag(acc):
    return {"n": 50, "correct": round(acc * 50), "accuracy": acc, "wilson_low": acc, "wilson_high": acc,
            "usd_per_request": 1e-6, "usd_per_correct": None}


def _target(model, all_, **tags):
    return {"model": model, "params": {}, "tags": {"all": _tag(all_), **{k: _tag(v) for k, v in tags.items()}},
            "calibration": {"bins": [], "threshold": None, "target_accuracy": None}}


PROFILE = {"object": "quality_profile", "version": 1, "created": 0, "eval": "mini", "cascades": [],
           "targets": {"weak": _target("weak", 0.2, arith=0.0, facts=0.9),
                       "mid": _target("mid", 0.5, arith=0.7),
                       "strong": _target("strong", 0.9)}}
# what a floor of 0.6 must pick for each task kind (None: no tag, overall)
WANT = {"arith": "mid", "facts": "weak", None: "strong", "passkey": "strong"}


def _mock(tmp, name):
    port = free_port()
    proc = spawn([sys.executable, str(REPO / "tests/serving/mock_upstream.py"), str(port), name,
                  str(LOGPROBS[name])], tmp / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/stats", trust_env=False).status_code == 200, 20, f"mock {name} up")
    return proc, {"name": name, "arch": "transformer", "engine": "remote", "max_context": 512, "url": url,
                  "price_per_hour": PRICES[name]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    (tmp / "quality.json").write_text(json.dumps(PROFILE))
    mocks, backends = {}, []
    try:
        for name in PRICES:
            mocks[name], b = _mock(tmp, name)
            backends.append(b)
        gateway = {"quality_profile": str(tmp / "quality.json"), "quality_floor": 0.6, "cascade_threshold": -1.0,
                   "cascade": [{"name": "weak", "backend": "weak"},
                               {"name": "mid-vote", "backend": "mid",
                                "params": {"n": 3, "hybridserve_vote": True, "temperature": 0.7}},
                               {"name": "strong", "backend": "strong"}]}
        stack = start_stack(tmp, backends, gateway=gateway)
        stack.extra["mocks"] = {b["name"]: b["url"] for b in backends}
        yield stack
        stop_process(stack.proc)
        assert stack.proc.returncode == 0, log_tail(stack.log)
    finally:
        for m in mocks.values():
            stop_process(m, 5)


def post(stack, body, headers=None) -> httpx.Response:
    return httpx.post(stack.base_url + "/completions", json={"prompt": "hi", "max_tokens": 4, **body},
                      headers={**stack.headers(), **(headers or {})}, timeout=20, trust_env=False)


def last_body(stack, name) -> dict:
    return httpx.get(stack.extra["mocks"][name] + "/stats", trust_env=False).json()["last_body"]


def requests_seen(stack) -> dict[str, int]:
    return {n: httpx.get(u + "/stats", trust_env=False).json()["requests"] for n, u in stack.extra["mocks"].items()}


def test_auto_with_a_floor_never_sends_a_task_to_a_backend_measured_below_it(gw):
    before = requests_seen(gw)
    sent = {n: 0 for n in PRICES}
    tasks = list(WANT) * 6
    for i, task in enumerate(tasks):   # tags by header and by body field, alternately
        headers = {"x-hybridserve-task": task} if task and i % 2 else {}
        body = {"model": "auto", **({"hybridserve_task": task} if task and not i % 2 else {})}
        r = post(gw, body, headers)
        assert r.status_code == 200, r.text
        assert r.headers["x-hybridserve-backend"] == WANT[task], (task, r.headers["x-hybridserve-route-reason"])
        assert r.headers["x-hybridserve-quality"].startswith("met;")
        sent[WANT[task]] += 1
    after = requests_seen(gw)
    assert {n: after[n] - before[n] for n in PRICES} == sent   # what upstreams saw, not just the headers


def test_the_reason_and_receipt_name_the_figure_used(gw):
    r = post(gw, {"model": "auto", "hybridserve_task": "arith"})
    reason = r.headers["x-hybridserve-route-reason"]
    assert reason.startswith("cheapest with arith accuracy >= 0.60: mid 0.70 (tag arith); weak 0.00 below")
    q = r.json()["usage"]["quality"]
    assert q == {"floor": 0.6, "task": "arith", "accuracy": 0.7, "source": "tag arith", "met": True}


def test_a_request_floor_overrides_and_an_unreachable_floor_is_flagged(gw):
    low = post(gw, {"model": "auto"}, {"x-hybridserve-quality-floor": "0.1"})
    assert low.headers["x-hybridserve-backend"] == "weak"            # overall 0.2 clears 0.1
    high = post(gw, {"model": "auto", "hybridserve_quality_floor": 0.99})
    assert high.status_code == 200 and high.headers["x-hybridserve-backend"] == "strong"
    assert high.headers["x-hybridserve-quality"].startswith("unmet;")
    assert high.json()["usage"]["quality"]["met"] is False
    bad = post(gw, {"model": "auto", "hybridserve_quality_floor": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "hybridserve_quality_floor"
    bad = post(gw, {"model": "auto"}, {"x-hybridserve-quality-floor": "lots"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-hybridserve-quality-floor"


def test_gateway_only_fields_are_not_forwarded(gw):
    r = post(gw, {"model": "weak", "hybridserve_quality_floor": 0.1, "hybridserve_task": "facts",
                  "hybridserve_vote": False})
    assert r.status_code == 200
    body = last_body(gw, "weak")
    assert body["prompt"] == "hi" and body["model"] == "weak"
    assert not {"hybridserve_quality_floor", "hybridserve_task", "hybridserve_vote"} & set(body)
    r = post(gw, {"model": "auto"}, {"x-hybridserve-task": "facts"})   # header only: the raw fast path
    assert r.headers["x-hybridserve-backend"] == "weak" and "hybridserve_task" not in last_body(gw, "weak")


def test_a_cascade_rung_sends_its_params_upstream_and_reports_every_rung(gw):
    r = post(gw, {"model": "auto:cascade", "temperature": 0.0})
    assert r.status_code == 200, r.text
    body = r.json()
    tiers = body["usage"]["tiers"]
    assert [(t["name"], t["backend"], t["escalated"]) for t in tiers] == [("weak", "weak", True),
                                                                          ("mid-vote", "mid", False)]
    assert tiers[0]["mean_logprob"] == -3.0 and tiers[1]["mean_logprob"] == -0.5
    assert tiers[0]["threshold"] == -1.0 and all("cost_usd" in t for t in tiers)
    sent = last_body(gw, "mid")
    assert sent["n"] == 3 and sent["temperature"] == 0.7 and sent["logprobs"] == 0   # the rung's params win
    assert "hybridserve_vote" not in sent                                            # the gateway votes
    assert body["hybridserve_vote"]["samples"] == 3 and len(body["choices"]) == 1
    assert body["choices"][0]["logprobs"] is None          # asked for by the cascade, not the client
    assert "temperature" in last_body(gw, "weak") and last_body(gw, "weak")["temperature"] == 0.0
    assert r.headers["x-hybridserve-backend"] == "mid" and r.headers["x-hybridserve-policy"] == "cascade"
    econ = httpx.get(gw.base_url + "/economics", headers=gw.headers(), trust_env=False).json()
    assert [c["name"] for c in econ["cascade"]] == ["weak", "mid-vote", "strong"]
    assert econ["quality"]["mid"]["tags"] == ["arith"] and econ["quality_floor"] == 0.6
