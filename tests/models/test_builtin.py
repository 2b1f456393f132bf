"""Built-in checkpoints: HF-loadable, deterministic, peaked, and the pair differs only in layer types."""
import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybridserve.errors import UnsupportedModelError
from hybridserve.models.builtin import BUILTIN_NAMES, builtin_config, materialize, write_checkpoint
from hybridserve.models.loader import load_model


def test_pairs_differ_only_in_layer_types():
    for size in ("tiny", "small"):
        t, h = builtin_config(f"{size}-transformer"), builtin_config(f"{size}-hybrid")
        assert set(h["layer_types"]) == {"mamba", "attention"} and set(t["layer_types"]) == {"attention"}
        assert h["layer_types"].count("attention") * 4 == len(h["layer_types"])
        t.pop("layer_types"), h.pop("layer_types")
        assert t == h


def test_every_builtin_fits_vllm_cpu_and_keeps_gqa():
    """vLLM's CPU attention needs head size >= 32 (tests/vllm serves the tiny pair on it)."""
    for name in BUILTIN_NAMES:
        cfg = builtin_config(name)
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        assert cfg["hidden_size"] % heads == 0 and cfg["hidden_size"] // heads >= 32, name
        assert heads % kv_heads == 0 and kv_heads < heads, name  # grouped-query attention
        assert cfg["mamba_n_heads"] * cfg["mamba_d_head"] == cfg["mamba_expand"] * cfg["hidden_size"], name


def test_weights_are_deterministic(tmp_path):
    a = write_checkpoint(tmp_path / "a", builtin_config("tiny-hybrid"))
    b = write_checkpoint(tmp_path / "b", builtin_config("tiny-hybrid"))
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (a, b)]
    assert digest[0] == digest[1]


def test_transformers_loads_builtins_and_distributions_are_peaked():
    path = materialize("tiny-hybrid")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    text = "Round trip: héllo wörld"
    assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.endswith("<|start_of_role|>assistant<|end_of_role|>")
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(text * 3)])).logits[0]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.5  # far above fp32 rounding
    assert logits.softmax(-1).max(-1).values.median() > 0.2


def test_small_pair_sizes():
    for name in BUILTIN_NAMES:
        if name.startswith("small"):
            model = load_model(materialize(name), prepack=False)  # packed linears hold buffers, not parameters
            n = sum(p.numel() for p in model.parameters())
            assert 10e6 < n < 100e6, (name, n)


def test_moe_config_is_refused_at_load(tmp_path):
    cfg = builtin_config("tiny-hybrid")
    path = write_checkpoint(tmp_path / "m", cfg)
    cfg_moe = {**cfg, "num_local_experts": 4, "num_experts_per_tok": 2}
    (path / "config.json").write_text(__import__("json").dumps(cfg_moe))
    try:
        load_model(path)
    except UnsupportedModelError as err:
        assert "MoE" in str(err)
    else:
        raise AssertionError("MoE config was accepted")
