"""The native causal LM: embedding → decoder layers (attention or Mamba-2) → norm → logits.

`forward(batch, caches)` runs one engine step over packed tokens and returns the
logits of each sequence's last token. `cache_specs()` tells the engine what each
layer stores per token (attention) or per sequence (Mamba), so the cache manager
allocates without knowing layer types.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridserve.models.args import ModelArgs
from hybridserve.models.batch import ForwardBatch
from hybridserve.models.layers import MLP, Attention, MambaMixer, RMSNorm, RotaryEmbedding


@dataclass(frozen=True)
class AttentionCacheSpec:
    """K and V per token: [num_blocks, block_size, num_kv_heads, head_dim] each."""

    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_kv_heads * self.head_dim * _itemsize(dtype)


@dataclass(frozen=True)
class MambaCacheSpec:
    """Per sequence: conv state [conv_dim, d_conv-1] and SSM state [heads, head_dim, d_state]."""

    conv_shape: tuple[int, int]
    ssm_shape: tuple[int, int, int]

    def bytes_per_seq(self, conv_dtype: torch.dtype, ssm_dtype: torch.dtype) -> int:
        conv = self.conv_shape[0] * self.conv_shape[1] * _itemsize(conv_dtype)
        ssm = self.ssm_shape[0] * self.ssm_shape[1] * self.ssm_shape[2] * _itemsize(ssm_dtype)
        return conv + ssm


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if layer_type == "mamba":
            self.mamba = MambaMixer(args)
        else:
            self.self_attn = Attention(args)
        mlp = MLP(args)
        if args.mlp_style == "granite":
            self.shared_mlp = mlp
        else:
            self.mlp = mlp
        self.residual_multiplier = args.residual_multiplier

    def forward(self, h: torch.Tensor, batch: ForwardBatch, cache) -> torch.Tensor:
        # Submodules' forward called directly, not through nn.Module.__call__ (no hooks are used at
        # inference): at batch 1 a small model's step is short enough for ~90 __call__s to show.
        mods = self._modules
        mixer = mods["mamba"] if self.layer_type == "mamba" else mods["self_attn"]
        mlp = mods["shared_mlp"] if "shared_mlp" in mods else mods["mlp"]
        h = torch.add(h, mixer.forward(mods["input_layernorm"].forward(h), batch, cache),
                      alpha=self.residual_multiplier)
        return torch.add(h, mlp.forward(mods["post_attention_layernorm"].forward(h)), alpha=self.residual_multiplier)


class _Body(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, t) for t in args.layer_types)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """Granite 4.0 (dense or H) or Llama, depending on `args`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = _Body(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args.rope, args.head_dim) if args.rope is not None else None

    def cache_specs(self) -> list[AttentionCacheSpec | MambaCacheSpec]:
        specs: list[AttentionCacheSpec | MambaCacheSpec] = []
        for t in self.args.layer_types:
            if t == "attention":
                specs.append(AttentionCacheSpec(self.args.num_kv_heads, self.args.head_dim))
            else:
                m = self.args.mamba
                specs.append(MambaCacheSpec((m.conv_dim, m.d_conv - 1), (m.num_heads, m.head_dim, m.d_state)))
        return specs

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, caches: list) -> torch.Tensor:
        """Logits [S, vocab] (fp32) of each sequence's last token in `batch`."""
        h = self.model.embed_tokens(batch.input_ids) * self.args.embedding_multiplier  # [T, D]
        if self.rotary is not None:
            batch.rope = self.rotary(batch.positions, h.dtype)
        for layer, cache in zip(self.model.layers, caches):
            h = layer.forward(h, batch, cache)
        h = self.model.norm(h[batch.logits_indices])
        return (self.lm_head(h) / self.args.logits_scaling).float()
