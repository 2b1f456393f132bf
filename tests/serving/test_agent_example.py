"""examples/agent.py, run as a user runs it (a subprocess) against a gateway over the tiny
transformer: its steps, its table and the session summary it prints agree with what
GET /v1/sessions/{id} reports; the step cap and the client-side budget stop it; its calculator
evaluates arithmetic and nothing else."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import httpx
import pytest

from tests.serving.conftest import REPO, engine_backends, log_tail, start_stack, stop_process

pytestmark = pytest.mark.timeout(300)

AGENT = REPO / "examples" / "agent.py"
BACKEND = "tiny-transformer"


def _agent_module():
    spec = importlib.util.spec_from_file_location("example_agent", AGENT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


agent = _agent_module()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent")
    backends, extra = engine_backends(tmp, max_context=4096)   # the tools' preamble is ~1 k byte tokens
    s = start_stack(tmp, [b for b in backends if b["name"] == BACKEND], up_args=extra)
    yield s
    stop_process(s.proc)
    assert s.proc.returncode == 0, log_tail(s.log)


def run_agent(stack, *args: str) -> tuple[str, dict]:
    p = subprocess.run([sys.executable, str(AGENT), "--url", stack.url, "--api-key", stack.key,
                        "--model", BACKEND, "--json", *args], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    return p.stdout, json.loads(p.stdout.strip().splitlines()[-1])


def gateway_session(stack, sid: str) -> dict:
    r = httpx.get(f"{stack.base_url}/sessions/{sid}", headers=stack.headers(), timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_agent_runs_every_step_and_its_summary_is_the_gateways(stack):
    text, out = run_agent(stack)
    steps, session = out["steps"], gateway_session(stack, out["session_id"])
    assert out["session"] == session and out["stopped"] == "answered" and out["answer"] is not None
    assert [s["kind"] for s in steps] == ["plan", "tool", "tool", "answer"]
    lookup, calc = steps[1]["detail"], steps[2]["detail"]
    facts = agent.load_facts(agent.FACTS)
    assert lookup.startswith("lookup(") and any(lookup.endswith("-> " + f) for f in facts.values()), lookup
    assert calc.startswith("calculator(") and "arguments are not JSON" not in calc, calc
    for s in steps:                                     # one table row per step, as measured
        assert f"{s['n']:>2}  {s['kind']:<7} {BACKEND:<18} {s['prompt_tokens']:>6} {s['completion_tokens']:>5}" in text
        assert s["backend"] == BACKEND and s["completion_tokens"] > 0
    assert f"session {out['session_id']}: {len(steps)} calls" in text
    assert session["calls"] == len(steps) and session["backends"] == {BACKEND: len(steps)}
    for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        assert session[name] == sum(s[name] for s in steps), name
    assert session["usd"] == pytest.approx(sum(s["usd"] for s in steps), rel=1e-6)
    for kind, row in session["steps"].items():
        mine = [s for s in steps if s["kind"] == kind]
        assert row["calls"] == len(mine)
        assert row["prompt_tokens"] == sum(s["prompt_tokens"] for s in mine)
        assert row["usd"] == pytest.approx(sum(s["usd"] for s in mine), rel=1e-6)
    assert session["tool_calls"] == session["steps"]["tool"]["tool_calls"] == 2
    assert session["retries"] == 0
    # the calls ran one after another: the session's span holds all of their durations
    assert session["wall_s"] >= sum(r["wall_s"] for r in session["steps"].values()) - 1e-6
    assert session["wall_s"] <= sum(s["latency_s"] for s in steps) + 5.0


def test_the_step_cap_keeps_the_answer_and_the_budget_stops_the_run(stack):
    _, capped = run_agent(stack, "--max-steps", "2")
    assert [s["kind"] for s in capped["steps"]] == ["plan", "answer"]
    assert gateway_session(stack, capped["session_id"])["calls"] == 2
    _, broke = run_agent(stack, "--budget", "1e-12")
    assert len(broke["steps"]) == 1 and broke["answer"] is None
    assert broke["stopped"].startswith("budget spent") and broke["session"]["calls"] == 1


def test_the_calculator_evaluates_arithmetic_only():
    assert agent.calculate("384400 / 299792") == pytest.approx(1.2822, abs=1e-4)
    assert agent.calculate("-(2 + 3) * 2 ** 3 % 7") == -(2 + 3) * 2 ** 3 % 7
    for bad in ("__import__('os').system('true')", "x + 1", "2 ** 1000", "1 / 0", "[1, 2]", "'a' * 3"):
        with pytest.raises(ValueError):
            agent.calculate(bad)
    assert agent.run_tool("calculator", '{"expression": "1 +"}', {}).startswith("error:")
    assert agent.run_tool("lookup", '{"topic": "nope"}', {"a": "b"}).startswith("error: no topic")
