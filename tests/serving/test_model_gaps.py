"""The native worker on a real checkpoint that lacks a chat template and a `</think>` token.

A tiny Llama GGUF (byte-level BPE, no chat template, no reasoning markers) is converted and
served in-process by the real engine: chat requests get a 400 in OpenAI's shape instead of a
500, and thinking budgets cap the answer through max_tokens instead of being refused.
"""
import pytest
from fastapi.testclient import TestClient

from hybridserve.config import BackendConfig
from hybridserve.engine import AsyncEngine, LLMEngine, SamplingParams
from hybridserve.gateway.governor import ANSWER_BUDGET_TOKENS
from hybridserve.worker.app import create_app
from tests.models.gguf_fixtures import CONTEXT, write_tiny_llama_gguf

BUDGET = 4


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("gaps") / "no-template.gguf", seed=5,
                                 chat_template=None)
    backend = BackendConfig(name="plain-llama", arch="transformer", checkpoint=str(path), price_per_hour=1.0,
                            max_context=CONTEXT, native={"max_num_seqs": 4, "max_num_batched_tokens": 256,
                                                         "block_size": 16, "cache_memory_gb": 0.05})
    engine = AsyncEngine(LLMEngine.from_backend(backend))   # a .gguf checkpoint, converted on the way
    assert engine.tokenizer.chat_template is None
    assert engine.tokenizer.convert_tokens_to_ids("</think>") in (None, engine.tokenizer.unk_token_id)
    with TestClient(create_app(engine, SamplingParams)) as c:
        yield c


def test_chat_without_template_is_a_400_pointing_at_completions(client):
    r = client.post("/v1/chat/completions", json={"model": "plain-llama", "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "messages"
    assert "no chat template" in err["message"] and "/v1/completions" in err["message"]
    ok = client.post("/v1/completions", json={"model": "plain-llama", "prompt": "hi", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize("max_tokens, expected", [(None, BUDGET + ANSWER_BUDGET_TOKENS),
                                                  (400, BUDGET + ANSWER_BUDGET_TOKENS), (10, 10)])
def test_thinking_budget_without_think_token_caps_max_tokens(client, max_tokens, expected):
    body = {"model": "plain-llama", "prompt": "the hello", "max_thinking_tokens": BUDGET,
            "ignore_eos": True, "temperature": 0}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == expected
    assert out["choices"][0]["finish_reason"] == "length"
