import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybridserve.engine import EngineConfig, LLMEngine
from hybridserve.models.builtin import materialize
from hybridserve.models.loader import load_model

PROMPTS = [
    "Hello world, this is a test of the engine.",
    "abc",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "x",
    "Mamba-2 state space duality: chunked scan for prefill, recurrent update for decode.",
]


@functools.lru_cache(maxsize=None)
def _hf(name):
    path = materialize(name)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model, AutoTokenizer.from_pretrained(str(path))


@functools.lru_cache(maxsize=None)
def hf_greedy(name: str, prompt: tuple, n: int) -> list[int]:
    model, tok = _hf(name)
    with torch.no_grad():
        out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, len(prompt):].tolist()


@pytest.fixture(params=["tiny-transformer", "tiny-hybrid"])
def model_name(request):
    return request.param


@pytest.fixture
def make_engine(model_name):
    path = materialize(model_name)
    model = load_model(path)
    tok = AutoTokenizer.from_pretrained(str(path))

    def make(**kw):
        cfg = dict(max_context=1024, max_num_seqs=8, max_num_batched_tokens=512, block_size=8,
                   cache_memory_gb=0.02)
        cfg.update(kw)
        return LLMEngine(model, tok, EngineConfig(**cfg), name=model_name)

    return make


@pytest.fixture
def tokenizer(model_name):
    return _hf(model_name)[1]
