"""Checkpoints as transformers 5's own `save_pretrained` writes them load natively, logits equal.

transformers 5 writes `dtype` (not `torch_dtype`), `rope_parameters` (not `rope_theta`), and
non-finite floats as `{"__float__": "Infinity"}` — Granite's `time_step_limit` has one by default.
"""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GraniteMoeHybridConfig, LlamaConfig

from hybridserve.models.builtin import builtin_config
from hybridserve.models.loader import load_model
from hybridserve.models.registry import model_args, parse_config_text, read_config
from tests.models.helpers import make_cache, rel_err, run_chunk


def _llama_config() -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, rms_norm_eps=1e-5)
    cfg.attn_logit_softcapping = float("inf")   # a float field set to inf (no cap)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _granite_config() -> GraniteMoeHybridConfig:
    fields = {k: v for k, v in builtin_config("tiny-hybrid").items() if k not in ("architectures", "torch_dtype")}
    cfg = GraniteMoeHybridConfig(**fields)
    cfg.architectures = ["GraniteMoeHybridForCausalLM"]
    return cfg


CONFIGS = {"llama": _llama_config, "granite-hybrid": _granite_config}


def _saved(tmp_path, name):
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():   # transformers' default init is tiny; make the logits clearly peaked
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 2.0 / math.sqrt(p.shape[1]))
    model.save_pretrained(str(tmp_path / name))
    return tmp_path / name, model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_checkpoint_loads_and_matches(tmp_path, name):
    directory, hf = _saved(tmp_path, name)
    text = (directory / "config.json").read_text()
    assert '"__float__": "Infinity"' in text and '"dtype"' in text and '"torch_dtype"' not in text
    native = load_model(directory)
    tokens = torch.randint(0, 262, (33,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    cache = make_cache(native)
    blocks, slot = [], cache.allocate_slot()
    ours = torch.cat([run_chunk(native, cache, tokens, 0, 21, blocks, slot)]
                     + [run_chunk(native, cache, tokens, i, 1, blocks, slot) for i in range(21, 33)])
    assert rel_err(ours, ref) < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_granite_time_step_limit_is_decoded_to_inf(tmp_path):
    directory, _ = _saved(tmp_path, "granite-hybrid")
    cfg = read_config(directory)
    assert cfg["time_step_limit"] == [0.0, float("inf")]
    assert model_args(cfg).mamba.dt_limit == (0.0, float("inf"))


def test_non_finite_markers_decode_and_unknown_ones_are_refused():
    cfg = parse_config_text(json.dumps({"a": {"__float__": "-Infinity"}, "b": [{"__float__": "NaN"}],
                                        "c": {"__float__": "Infinity", "other": 1}, "d": float("inf")}))
    assert cfg["a"] == float("-inf") and math.isnan(cfg["b"][0]) and cfg["c"]["other"] == 1
    assert cfg["d"] == float("inf")   # json.dumps wrote a bare Infinity (older writers): it parses too
    with pytest.raises(ValueError, match="non-finite float 'Huge'"):
        parse_config_text('{"x": {"__float__": "Huge"}}')


def test_rope_parameters_nested_per_layer_type_use_the_attention_entry():
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1234.0}}}
    assert model_args(cfg).rope.theta == 1234.0
