"""IBM Granite 4.0 (`GraniteMoeHybridForCausalLM`): dense and H (Mamba-2 hybrid) configs.

Dense and H models share one architecture; only `layer_types` differs. The
native engine serves the MoE-free variants (every Granite 4.0 "micro"/1b/350m
model); a config with experts is refused at load instead of computed wrongly.
"""
from __future__ import annotations

from hybridserve.errors import UnsupportedModelError
from hybridserve.models.args import MambaArgs, ModelArgs, eos_ids, rope_from_config

_LAYER_NAMES = {"mamba": "mamba", "linear_attention": "mamba",
                "attention": "attention", "full_attention": "attention"}


def layer_types(cfg: dict) -> tuple[str, ...]:
    raw = cfg.get("layer_types") or cfg.get("layers_block_type")
    n = int(cfg["num_hidden_layers"])
    if raw is None:
        raise UnsupportedModelError("GraniteMoeHybrid config has no `layer_types`")
    if len(raw) != n:
        raise UnsupportedModelError(f"`layer_types` has {len(raw)} entries for {n} layers")
    unknown = sorted({t for t in raw if t not in _LAYER_NAMES})
    if unknown:
        raise UnsupportedModelError(f"layer types {unknown} are not supported (supported: mamba, attention)")
    return tuple(_LAYER_NAMES[t] for t in raw)


def granite_args(cfg: dict) -> ModelArgs:
    """ModelArgs of a GraniteMoeHybrid config dict (config.json as loaded)."""
    if int(cfg.get("num_local_experts") or 0) > 0:
        raise UnsupportedModelError(
            f"this Granite checkpoint has {cfg['num_local_experts']} MoE experts; the native engine "
            "serves only dense (expert-free) Granite 4.0 models — use engine: vllm for MoE ones")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    types = layer_types(cfg)
    mamba = None
    if "mamba" in types:
        expand = int(cfg.get("mamba_expand", 2))
        n_heads = int(cfg["mamba_n_heads"])
        d_head = cfg.get("mamba_d_head", "auto")
        d_head = expand * hidden // n_heads if d_head in (None, "auto") else int(d_head)
        limit = cfg.get("time_step_limit") or (0.0, float("inf"))
        mamba = MambaArgs(num_heads=n_heads, head_dim=d_head, d_state=int(cfg["mamba_d_state"]),
                          n_groups=int(cfg.get("mamba_n_groups", 1)), d_conv=int(cfg.get("mamba_d_conv", 4)),
                          chunk_size=int(cfg.get("mamba_chunk_size", 256)),
                          conv_bias=bool(cfg.get("mamba_conv_bias", True)),
                          proj_bias=bool(cfg.get("mamba_proj_bias", False)),
                          dt_limit=(float(limit[0]), float(limit[1])))
    pos = cfg.get("position_embedding_type")
    if pos not in (None, "nope", "rope"):
        raise UnsupportedModelError(f"position_embedding_type '{pos}' is not supported (rope or nope)")
    return ModelArgs(
        architecture="GraniteMoeHybridForCausalLM",
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(cfg.get("shared_intermediate_size", 1024)),
        num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
        layer_types=types, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=int(cfg.get("max_position_embeddings", 2048)),
        rope=rope_from_config(cfg) if pos == "rope" else None,
        attention_scale=float(cfg.get("attention_multiplier", 1.0)),
        attention_bias=bool(cfg.get("attention_bias", False)), mlp_style="granite",
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
        logits_scaling=float(cfg.get("logits_scaling", 1.0)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mamba=mamba, eos_token_ids=eos_ids(cfg),
    )
