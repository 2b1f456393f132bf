"""`LlamaForCausalLM`: the second transformer family users bring (Llama 2/3, TinyLlama, ...)."""
from __future__ import annotations

import math

from hybridserve.errors import UnsupportedModelError
from hybridserve.models.args import ModelArgs, eos_ids, rope_from_config


def llama_args(cfg: dict) -> ModelArgs:
    """ModelArgs of a Llama config dict; refuses features the native decoder lacks."""
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("Llama with mlp_bias is not supported by the native engine")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act '{cfg['hidden_act']}' is not supported (silu only)")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    n = int(cfg["num_hidden_layers"])
    return ModelArgs(
        architecture="LlamaForCausalLM",
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]), num_layers=n, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
        layer_types=("attention",) * n, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=int(cfg.get("max_position_embeddings", 2048)), rope=rope_from_config(cfg),
        attention_scale=1.0 / math.sqrt(head_dim), attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_style="llama", tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=eos_ids(cfg),
    )
