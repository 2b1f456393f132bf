"""Routing on live economics and the test-time-compute governor, through the gateway with the
tiny pair (one `hybridserve up` for the module).

The gateway is seeded with a hand-made economics profile in which the transformer is
cheap at short context and the hybrid is cheap at long context (a 100x gap, so the
live corrections of a few requests cannot flip it); sessions are capped at
SESSION_TOKENS tokens; agent step `plan` maps to the hybrid's tier, `polish` to the
transformer; the cascade threshold is above any possible mean logprob or verifier score
(always escalates); the hybrid judges drafts for `parallel_verify`.
"""
from __future__ import annotations

import json

import httpx
import pytest

from tests.serving.conftest import engine_backends, log_tail, start_stack, stop_process

pytestmark = pytest.mark.timeout(120)

SESSION_TOKENS = 100
SHORT = "Hi there"
LONG = "lorem ipsum dolor sit amet " * 24   # 648 bytes: ~160 tokens by the gateway's estimate


def _point(context, prefill, decode):
    return {"context": context, "concurrency": 1, "prefill_tok_s": prefill, "decode_tok_s": decode}


PROFILE = {"format": "hybridserve-economics/1", "backends": {
    "tiny-transformer": {"arch": "transformer", "price_per_hour": 0.5,
                         "points": [_point(64, 50000, 5000), _point(2048, 100, 2)]},
    "tiny-hybrid": {"arch": "hybrid", "price_per_hour": 0.5,
                    "points": [_point(64, 500, 50), _point(2048, 10000, 500)]}}}


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routed")
    (tmp / "profile.json").write_text(json.dumps(PROFILE))
    backends, extra = engine_backends(tmp, max_context=1024)
    gateway = {"economics_profile": str(tmp / "profile.json"), "session_max_tokens": SESSION_TOKENS,
               "cascade_threshold": 0.5, "verifier": "tiny-hybrid",
               "step_tiers": {"plan": "economy", "polish": "tiny-transformer"}}
    stack = start_stack(tmp, backends, gateway=gateway, up_args=extra)
    yield stack
    stop_process(stack.proc)
    assert stack.proc.returncode == 0, log_tail(stack.log)


def post(stack, body, headers=None, path="/completions") -> httpx.Response:
    body = {"temperature": 0.0, "max_tokens": 4, **body}
    return httpx.post(stack.base_url + path, json=body, headers={**stack.headers(), **(headers or {})},
                      timeout=60, trust_env=False)


# ------------------------------------------------------------------ routing

def test_long_prompts_go_to_the_hybrid_short_ones_to_the_transformer(routed):
    for prompt, want in [(LONG, "tiny-hybrid"), (SHORT, "tiny-transformer"), (LONG, "tiny-hybrid"),
                         (SHORT, "tiny-transformer")]:
        r = post(routed, {"model": "auto", "prompt": prompt})
        assert r.status_code == 200, r.text
        h, usage = r.headers, r.json()["usage"]
        assert h["x-hybridserve-backend"] == want, h["x-hybridserve-route-reason"]
        assert h["x-hybridserve-policy"] == "economics" and "cheapest" in h["x-hybridserve-route-reason"]
        # the receipt: measured device-seconds x price, in headers and in the usage extension
        assert float(h["x-hybridserve-device-seconds"]) == pytest.approx(usage["device_seconds"], abs=1e-5)
        assert float(h["x-hybridserve-cost-usd"]) == pytest.approx(0.5 / 3600 * usage["device_seconds"], rel=1e-3)
        assert usage["cost_usd"] > 0 and usage["route_backend"] == want
        assert usage["route_policy"] == "economics" and usage["predicted_cost_usd"] > 0
    econ = httpx.get(routed.base_url + "/economics", headers=routed.headers(), trust_env=False).json()
    assert econ["policy"] == "economics" and econ["seeded"]
    assert set(econ["backends"]) == {"tiny-transformer", "tiny-hybrid"}
    touched = [r for r in econ["rows"] if r["correction"] != 1.0]
    assert touched, "finished requests must correct the table"
    metrics = httpx.get(routed.url + "/metrics", trust_env=False).text
    assert "hybridserve_economics_usd_per_1m_output{" in metrics
    assert 'hybridserve_gateway_routed_total{backend="tiny-hybrid",policy="economics"}' in metrics


def test_model_aliases_choose_the_policy(routed):
    r = post(routed, {"model": "auto:fastest", "prompt": SHORT})
    assert r.headers["x-hybridserve-policy"] == "economics:fastest"
    r = post(routed, {"model": "auto:round_robin", "prompt": SHORT})
    assert r.headers["x-hybridserve-policy"] == "round_robin" and r.json()["usage"]["cost_usd"] > 0
    r = post(routed, {"model": "tiny-hybrid", "prompt": SHORT})
    assert r.headers["x-hybridserve-policy"] == "pinned" and r.headers["x-hybridserve-backend"] == "tiny-hybrid"
    r = post(routed, {"model": "auto:nonsense", "prompt": SHORT})
    assert r.status_code == 404 and "auto:cheapest" in r.json()["error"]["message"]


def test_stream_receipt_in_final_usage_chunk_only_when_asked(routed):
    def stream(body):
        with httpx.stream("POST", routed.base_url + "/completions", headers=routed.headers(),
                          json={"model": "auto", "prompt": LONG, "max_tokens": 5, "temperature": 0.0,
                                "stream": True, **body}, timeout=60, trust_env=False) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            return r.headers, events
    headers, events = stream({"stream_options": {"include_usage": True}})
    assert headers["x-hybridserve-backend"] == "tiny-hybrid" and headers["x-hybridserve-policy"] == "economics"
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 5 and usage["cost_usd"] > 0 and usage["route_backend"] == "tiny-hybrid"
    # without include_usage the gateway still learns the cost, but the client sees no usage at all
    before = _cost_total(routed)
    headers, events = stream({})
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert _cost_total(routed) > before


def _cost_total(stack) -> float:
    text = httpx.get(stack.url + "/metrics", trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("hybridserve_gateway_cost_usd_total{"))


def test_agent_step_kinds_map_to_tiers(routed):
    plan = post(routed, {"model": "auto", "prompt": SHORT}, {"x-step-kind": "plan"})
    polish = post(routed, {"model": "auto", "prompt": LONG}, {"x-step-kind": "polish"})
    assert plan.headers["x-hybridserve-backend"] == "tiny-hybrid"  # economics alone would pick the transformer
    assert polish.headers["x-hybridserve-backend"] == "tiny-transformer"
    assert "step_kind=plan" in plan.headers["x-hybridserve-route-reason"]


def test_cascade_escalates_and_reports_every_tier(routed):
    r = post(routed, {"model": "auto:cascade", "prompt": SHORT, "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    tiers = body["usage"]["tiers"]
    assert [t["backend"] for t in tiers] == ["tiny-transformer", "tiny-hybrid"]  # standard tier first
    assert tiers[0]["escalated"] and not tiers[1]["escalated"]
    assert all(t["mean_logprob"] < 0.5 and t["cost_usd"] > 0 for t in tiers)
    assert body["usage"]["cost_usd"] == pytest.approx(sum(t["cost_usd"] for t in tiers), abs=1e-9)
    assert r.headers["x-hybridserve-backend"] == "tiny-hybrid"
    assert r.headers["x-hybridserve-tiers"] == "tiny-transformer,tiny-hybrid"
    assert body["choices"][0]["logprobs"] is None  # asked for the cascade, not by the client


def test_parallel_verify_books_the_verdict_and_escalates_on_a_weak_one(routed):
    r = post(routed, {"model": "auto:parallel_verify", "prompt": SHORT, "max_tokens": 5})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    draft, final = usage["tiers"]
    assert draft["backend"] == "tiny-transformer" and draft["verified_by"] == "tiny-hybrid"
    assert draft["verifier_cost_usd"] > 0 and draft["escalated"]  # log P(yes) <= 0 < threshold 0.5
    assert draft["verifier_score"] is None or draft["verifier_score"] < 0.5
    assert final == {"backend": "tiny-hybrid", "cost_usd": final["cost_usd"], "escalated": False}
    total = draft["cost_usd"] + draft["verifier_cost_usd"] + final["cost_usd"]
    assert usage["cost_usd"] == pytest.approx(total, abs=1e-9)
    assert r.headers["x-hybridserve-policy"] == "parallel_verify"


# ------------------------------------------------------------------ governor

def test_thinking_budget_is_forced_by_the_native_worker(routed):
    r = post(routed, {"model": "tiny-transformer", "prompt": "Question: 2+2?<think>", "max_tokens": 12,
                      "ignore_eos": True, "max_thinking_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["thinking_tokens"] == 3 and body["usage"]["max_thinking_tokens"] == 3
    assert "</think>" in body["choices"][0]["text"]
    # reasoning_effort maps to a budget; a bad one is a 400 naming the field
    r = post(routed, {"model": "auto", "prompt": "x<think>", "reasoning_effort": "low", "ignore_eos": True})
    assert r.json()["usage"]["max_thinking_tokens"] == 256
    r = post(routed, {"model": "auto", "prompt": "x", "reasoning_effort": "extreme"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"


def test_self_consistency_vote(routed):
    r = post(routed, {"model": "tiny-hybrid", "prompt": SHORT, "n": 4, "hybridserve_vote": True})
    body = r.json()
    assert len(body["choices"]) == 1 and body["choices"][0]["index"] == 0
    assert body["hybridserve_vote"]["samples"] == 4 and body["hybridserve_vote"]["agreeing"] == 4  # greedy
    assert body["usage"]["completion_tokens"] == 16  # every sample is paid for
    r = post(routed, {"model": "tiny-hybrid", "prompt": SHORT, "n": 1, "hybridserve_vote": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_session_cap_gives_a_partial_answer_then_429(routed):
    sid = {"x-session-id": "agent-run-1"}
    first = post(routed, {"model": "tiny-transformer", "prompt": "Hello", "max_tokens": 60, "ignore_eos": True}, sid)
    assert first.status_code == 200 and "x-hybridserve-budget" not in first.headers
    used = first.json()["usage"]["total_tokens"]
    second = post(routed, {"model": "tiny-transformer", "prompt": "Hello", "max_tokens": 60, "ignore_eos": True}, sid)
    assert second.status_code == 200, second.text
    body = second.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] == "budget_exhausted"
    assert second.headers["x-hybridserve-budget"] == "exhausted" and body["usage"]["budget"] == "exhausted"
    assert used + body["usage"]["total_tokens"] <= SESSION_TOKENS  # never an overrun
    third = post(routed, {"model": "tiny-transformer", "prompt": "Hello", "max_tokens": 60}, sid)
    assert third.status_code == 429
    err = third.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "session_budget_exceeded"
    s = httpx.get(routed.base_url + "/sessions/agent-run-1", headers=routed.headers(), trust_env=False).json()
    assert s["calls"] == 2 and s["tokens"] == used + body["usage"]["total_tokens"]
    assert s["budget_hits"] == 2 and s["usd"] > 0 and s["backends"] == {"tiny-transformer": 2}
    assert httpx.get(routed.base_url + "/sessions/nope", headers=routed.headers(),
                     trust_env=False).status_code == 404
    metrics = httpx.get(routed.url + "/metrics", trust_env=False).text
    assert "hybridserve_sessions_budget_hits 2.0" in metrics
