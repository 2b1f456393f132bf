"""Native logits equal Hugging Face transformers' (fp32) for prefill, chunked prefill and decode."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from hybridserve.models.builtin import builtin_config, materialize, write_checkpoint
from hybridserve.models.loader import load_model
from tests.models.helpers import make_cache, rel_err, run_chunk

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_theta": 500000.0, "eos_token_id": 256, "pad_token_id": 259,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
}


def _nope_hybrid() -> dict:
    cfg = builtin_config("tiny-hybrid")
    cfg.update(position_embedding_type="nope", mamba_n_groups=2, mamba_chunk_size=8)
    return cfg


CASES = {
    "tiny-transformer": lambda tmp: materialize("tiny-transformer"),
    "tiny-hybrid": lambda tmp: materialize("tiny-hybrid"),
    "hybrid-nope-2groups": lambda tmp: write_checkpoint(tmp / "nope", _nope_hybrid(), seed=3),
    "tiny-llama3": lambda tmp: write_checkpoint(tmp / "llama", LLAMA, seed=5),
}


@pytest.fixture(params=list(CASES))
def pair(request, tmp_path):
    path = CASES[request.param](tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return request.param, hf, load_model(path)


def _hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def test_prefill_logits_match_transformers(pair):
    name, hf, native = pair
    tokens = torch.randint(0, 262, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = _hf_logits(hf, tokens)
    cache = make_cache(native)
    ours = run_chunk(native, cache, tokens, 0, len(tokens), [], cache.allocate_slot())
    err = rel_err(ours, ref)
    print(f"{name}: prefill rel err {err:.2e}")
    assert err < 1e-4


def test_chunked_prefill_then_decode_match_transformers(pair):
    name, hf, native = pair
    tokens = torch.randint(0, 262, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = _hf_logits(hf, tokens)
    cache = make_cache(native)
    blocks, slot = [], cache.allocate_slot()
    got = [run_chunk(native, cache, tokens, 0, 13, blocks, slot),   # chunk not block-aligned
           run_chunk(native, cache, tokens, 13, 11, blocks, slot)]
    got += [run_chunk(native, cache, tokens, i, 1, blocks, slot) for i in range(24, 40)]  # decode
    ours = torch.cat(got)
    err = rel_err(ours, ref)
    print(f"{name}: chunked+decode rel err {err:.2e}")
    assert err < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_native_is_not_trivially_equal_when_weights_differ(tmp_path):
    """Guard: the parity tests can fail — a model with other weights gives other logits."""
    a = load_model(materialize("tiny-hybrid"))
    b = load_model(write_checkpoint(tmp_path / "other", builtin_config("tiny-hybrid"), seed=9))
    tokens = list(range(20))
    la = run_chunk(a, make_cache(a), tokens, 0, 20, [], 0)
    lb = run_chunk(b, make_cache(b), tokens, 0, 20, [], 0)
    assert rel_err(la, lb) > 1e-2
