"""Routing on live economics and the test-time-compute governor, through the gateway with the
tiny pair (one `hybridserve up` for the module).

The gateway is seeded with a hand-made economics profile in which the transformer is
cheap at short context and the hybrid is cheap at long context (a 100x gap, so the
live corrections of a few requests cannot flip it); sessions are capped at
SESSION_TOKENS tokens; agent step `plan` maps to the hybrid's tier, `polish` to the
transformer; the cascade threshold is above any possible mean logprob or verifier score
(always escalates); the hybrid judges drafts for `parallel_verify`.

A second gateway (`lenient`) in front of the same two workers has a threshold below any
greedy mean logprob (so a measured cascade draft never escalates) and a verifier that can
say "yes": the tiny models' byte vocabulary has no "yes" token, so a stub in front of the
hybrid answers the judge prompts itself (confident, or doubtful when the question says so)
and passes every other request to the real worker.
"""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from tests.serving.conftest import engine_backends, free_port, log_tail, start_stack, stop_process

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


# greedy picks the most likely of the tiny models' 262 tokens, so its logprob is >= -ln 262 (about -5.57)
GREEDY_FLOOR = -math.log(262)
LENIENT_THRESHOLD = -6.0             # below GREEDY_FLOOR: a measured greedy answer never escalates
JUDGE_CONFIDENT, JUDGE_DOUBTFUL = -0.25, -9.0   # the stub verifier's log P(yes), either side of it


class _JudgeStub(BaseHTTPRequestHandler):
    """Answers judge prompts (`verify.judge_prompt`, one token) with a chosen log P(" Yes");
    forwards everything else to the worker behind it."""

    upstream = ""
    judged: list[str] = []

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes, ctype: str | None) -> None:
        try:
            self.send_response(status)
            self.send_header("content-type", ctype or "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the gateway went away (teardown)

    def _forward(self, method: str, raw: bytes | None = None) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "x-request-id")}
        try:
            r = httpx.request(method, self.upstream + self.path, content=raw, headers=headers, timeout=60,
                              trust_env=False)
        except httpx.HTTPError as err:
            return self._reply(502, json.dumps({"error": {"message": str(err)}}).encode(), None)
        self._reply(r.status_code, r.content, r.headers.get("content-type"))

    def do_GET(self):
        self._forward("GET")

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        req = json.loads(raw)
        prompt = req.get("prompt")
        if isinstance(prompt, str) and prompt.startswith("Question:") and prompt.endswith("Reply:"):
            type(self).judged.append(prompt)
            yes = JUDGE_DOUBTFUL if "doubtful" in prompt else JUDGE_CONFIDENT
            top = {" Yes": yes, " No": -0.1 if yes < -1 else -2.0}
            body = {"id": "cmpl-judge", "object": "text_completion", "created": 0, "model": req.get("model"),
                    "choices": [{"index": 0, "text": " Yes", "finish_reason": "length",
                                 "logprobs": {"tokens": [" Yes"], "token_logprobs": [yes],
                                              "top_logprobs": [top], "text_offset": [0]}}],
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1,
                              "total_tokens": len(prompt) + 1, "device_seconds": 0.002}}
            return self._reply(200, json.dumps(body).encode(), "application/json")
        self._forward("POST", raw)


@pytest.fixture(scope="module")
def lenient(routed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lenient")
    (tmp / "profile.json").write_text(json.dumps(PROFILE))
    handler = type("Judge", (_JudgeStub,), {"upstream": routed.workers["tiny-hybrid"], "judged": []})
    stub = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    backends = yaml.safe_load(routed.config.read_text())["backends"]
    for b in backends:  # the routed stack's workers, reached as workers run elsewhere (not started here)
        b["host"] = "127.0.0.1"
        if b["name"] == "tiny-hybrid":
            b["port"] = stub.server_address[1]
    gateway = {"economics_profile": str(tmp / "profile.json"), "cascade_threshold": LENIENT_THRESHOLD,
               "verifier": "tiny-hybrid", "ledger_path": str(tmp / "ledger.sqlite")}
    try:
        stack = start_stack(tmp, backends, gateway=gateway)
        stack.extra["judged"] = handler.judged
        yield stack
        stop_process(stack.proc)
        assert stack.proc.returncode == 0, log_tail(stack.log)
    finally:
        stub.shutdown()
        stub.server_close()


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
    # a measured confidence (not a missing one, which escalates too) that is below the 0.5 threshold
    assert all(t["mean_logprob"] is not None and GREEDY_FLOOR - 1e-3 <= t["mean_logprob"] <= 0 for t in tiers)
    assert all(t["cost_usd"] > 0 for t in tiers)
    assert body["usage"]["cost_usd"] == pytest.approx(sum(t["cost_usd"] for t in tiers), abs=1e-9)
    assert r.headers["x-hybridserve-backend"] == "tiny-hybrid"
    assert r.headers["x-hybridserve-tiers"] == "tiny-transformer,tiny-hybrid"
    assert body["choices"][0]["logprobs"] is None  # asked for the cascade, not by the client


def test_cascade_keeps_a_confident_draft(lenient):
    r = post(lenient, {"model": "auto:cascade", "prompt": SHORT, "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    (tier,) = body["usage"]["tiers"]
    assert tier["backend"] == "tiny-transformer" and not tier["escalated"]
    assert tier["mean_logprob"] is not None and LENIENT_THRESHOLD < tier["mean_logprob"] <= 0
    assert "x-hybridserve-tiers" not in r.headers  # the header names the tiers of an escalation only
    assert r.headers["x-hybridserve-backend"] == "tiny-transformer"
    assert body["usage"]["cost_usd"] == pytest.approx(tier["cost_usd"], abs=1e-9) and tier["cost_usd"] > 0
    assert body["choices"][0]["logprobs"] is None


def test_parallel_verify_books_the_verdict_and_escalates_on_a_weak_one(routed):
    r = post(routed, {"model": "auto:parallel_verify", "prompt": SHORT, "max_tokens": 5})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    draft, final = usage["tiers"]
    assert draft["backend"] == "tiny-transformer" and draft["verified_by"] == "tiny-hybrid"
    # the tiny models' byte vocabulary has no "yes" token: no score, and no score escalates
    assert draft["verifier_cost_usd"] > 0 and draft["escalated"] and draft["verifier_score"] is None
    assert final == {"backend": "tiny-hybrid", "cost_usd": final["cost_usd"], "escalated": False}
    total = draft["cost_usd"] + draft["verifier_cost_usd"] + final["cost_usd"]
    assert usage["cost_usd"] == pytest.approx(total, abs=1e-9)
    assert r.headers["x-hybridserve-policy"] == "parallel_verify"
    assert r.headers["x-hybridserve-tiers"] == "tiny-transformer,tiny-hybrid"


@pytest.mark.parametrize("question, score, tried", [
    (SHORT, JUDGE_CONFIDENT, ["tiny-transformer"]),
    ("Hi there, doubtful one", JUDGE_DOUBTFUL, ["tiny-transformer", "tiny-hybrid"])])
def test_parallel_verify_escalates_below_the_threshold_only(lenient, question, score, tried):
    judged = len(lenient.extra["judged"])
    r = post(lenient, {"model": "auto:parallel_verify", "prompt": question, "max_tokens": 5})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert [t["backend"] for t in usage["tiers"]] == tried
    assert r.headers.get("x-hybridserve-tiers") == (",".join(tried) if len(tried) > 1 else None)
    assert r.headers["x-hybridserve-backend"] == tried[-1]
    draft = usage["tiers"][0]
    assert draft["verified_by"] == "tiny-hybrid" and draft["verifier_score"] == pytest.approx(score)
    assert draft["escalated"] == (score < LENIENT_THRESHOLD) == (len(tried) == 2)
    assert len(lenient.extra["judged"]) == judged + 1 and question in lenient.extra["judged"][-1]
    total = sum(t["cost_usd"] + t.get("verifier_cost_usd", 0.0) for t in usage["tiers"])
    assert draft["verifier_cost_usd"] > 0 and usage["cost_usd"] == pytest.approx(total, abs=1e-9)


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


def _key(text: str) -> str:
    return " ".join(text.split()).strip(".").lower()


def test_self_consistency_vote_takes_the_majority_of_disagreeing_samples(routed):
    # sampled answers (sample j gets seed + j); find, on the worker itself, a seed whose samples
    # disagree, have one clear majority, and whose first sample is not in it
    worker = routed.workers["tiny-hybrid"] + "/v1/completions"
    n, found = 5, None
    for temperature in (0.5, 1.0):
        for seed in range(40):
            body = {"model": "tiny-hybrid", "prompt": SHORT, "max_tokens": 1, "temperature": temperature,
                    "n": n, "seed": seed}
            got = httpx.post(worker, json=body, timeout=60, trust_env=False)
            assert got.status_code == 200, got.text
            texts = [c["text"] for c in sorted(got.json()["choices"], key=lambda c: c["index"])]
            keys = [_key(t) for t in texts]
            counts = sorted((keys.count(k) for k in set(keys)), reverse=True)
            if len(set(texts)) == len(set(keys)) and 2 <= counts[0] < n and counts[1:2] != counts[:1] \
                    and keys.count(keys[0]) < counts[0]:
                found = body, texts, keys, counts
                break
        if found:
            break
    assert found, "no seed gave disagreeing samples with a clear majority"
    body, texts, keys, counts = found
    majority = next(k for k in keys if keys.count(k) == counts[0])
    r = post(routed, {**body, "hybridserve_vote": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["hybridserve_vote"] == {"samples": n, "agreeing": counts[0], "distinct_answers": len(counts),
                                       "winner_sample": keys.index(majority)}
    assert len(out["choices"]) == 1 and out["choices"][0]["index"] == 0
    assert out["choices"][0]["text"] == texts[keys.index(majority)] != texts[0]
    assert out["usage"]["completion_tokens"] == n  # every sample is paid for
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
