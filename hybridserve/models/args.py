"""`ModelArgs`: the architecture facts the native decoder needs, parsed from an HF config.

One dataclass covers Granite 4.0 (dense and H) and Llama: they differ in layer
types, multipliers and MLP weight names, not in the shape of the forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeArgs:
    theta: float = 10000.0
    kind: str = "default"  # "default" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class MambaArgs:
    num_heads: int
    head_dim: int
    d_state: int
    n_groups: int
    d_conv: int
    chunk_size: int
    conv_bias: bool = True
    proj_bias: bool = False
    dt_limit: tuple[float, float] = (0.0, float("inf"))

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state


@dataclass(frozen=True)
class ModelArgs:
    architecture: str  # HF class name, e.g. "GraniteMoeHybridForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]  # each "attention" | "mamba"
    rms_norm_eps: float
    max_position: int
    rope: RopeArgs | None  # None = no positional encoding ("nope")
    attention_scale: float
    attention_bias: bool = False
    mlp_style: str = "granite"  # "granite": shared_mlp.input_linear (fused gate|up); "llama": gate/up/down
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by this
    tie_word_embeddings: bool = False
    mamba: MambaArgs | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def num_attention_layers(self) -> int:
        return sum(t == "attention" for t in self.layer_types)

    @property
    def num_mamba_layers(self) -> int:
        return sum(t == "mamba" for t in self.layer_types)

    @property
    def is_hybrid(self) -> bool:
        return self.num_mamba_layers > 0


def eos_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def rope_from_config(cfg: dict) -> RopeArgs:
    """Rope settings from either the v5 `rope_parameters` dict or legacy `rope_theta`/`rope_scaling`."""
    from hybridserve.errors import UnsupportedModelError

    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if float(cfg.get("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported by the native engine")
    if kind == "default":
        return RopeArgs(theta=theta)
    if kind == "llama3":
        return RopeArgs(theta=theta, kind="llama3", factor=float(merged["factor"]),
                        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
                        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
                        original_max_position=int(merged.get("original_max_position_embeddings", 8192)))
    raise UnsupportedModelError(f"rope type '{kind}' is not supported by the native engine "
                                "(supported: default, llama3); serve this model with engine: vllm")
