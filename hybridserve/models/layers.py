"""Building blocks of the native decoder: norms, rotary embedding, attention, Mamba-2, MLP.

Parameter names match Hugging Face's so checkpoints load without renaming.
Every op that a Triton kernel can replace goes through `hybridserve.kernels.dispatch`
(torch reference on CPU, Triton on CUDA); the layers know nothing of scheduling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.kernels import cpu_mamba, cpu_ops
from hybridserve.kernels import dispatch as K
from hybridserve.models.args import ModelArgs, RopeArgs
from hybridserve.models.batch import ForwardBatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D]
        return cpu_ops.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(rope: RopeArgs, head_dim: int) -> torch.Tensor:
    """[head_dim/2] inverse frequencies, with Llama 3 scaling when configured."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind != "llama3":
        return inv
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of a step's positions, computed once per step and shared by every attention layer."""

    def __init__(self, rope: RopeArgs, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] -> cos, sin [T, 1, Dh]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [T, Hq, Dh] and k [T, Hkv, Dh] by position (HF's rotate_half convention; on CPU
    in fp32 one C++ call, in place, see kernels/cpu_ops.py)."""
    return cpu_ops.rotary(q, k, cos, sin)


class Attention(nn.Module):
    """GQA self-attention over a paged KV cache (decode and chunked-prefill paths)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, hq, hkv, dh = args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, dh
        self.scale = args.attention_scale
        self.q_proj = nn.Linear(d, hq * dh, bias=args.attention_bias)
        self.k_proj = nn.Linear(d, hkv * dh, bias=args.attention_bias)
        self.v_proj = nn.Linear(d, hkv * dh, bias=args.attention_bias)
        self.o_proj = nn.Linear(hq * dh, d, bias=args.attention_bias)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: tuple[torch.Tensor, torch.Tensor]):
        t = x.shape[0]
        q = self.q_proj.forward(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj.forward(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj.forward(x).view(t, self.num_kv_heads, self.head_dim)
        if batch.rope is not None:
            q, k = apply_rotary(q, k, *batch.rope)
        k_cache, v_cache = cache  # [num_blocks, block_size, Hkv, Dh] each
        K.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        nd = batch.num_decodes
        parts = []
        if nd:
            parts.append(K.paged_attention_decode(q[:nd], k_cache, v_cache, batch.block_tables[:nd],
                                                  batch.context_lens[:nd], self.scale,
                                                  max_context_len=batch.max_context_len or None))
        if t > nd:
            parts.append(K.paged_attention_prefill(q[nd:], k_cache, v_cache, batch.block_tables[nd:],
                                                   batch.prefill_cu_seqlens(), batch.context_lens[nd:],
                                                   self.scale))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.o_proj.forward(out.reshape(t, self.num_heads * self.head_dim))


class MambaMixer(nn.Module):
    """Mamba-2 mixer: in_proj → causal conv1d → SSD (scan or one-step update) → gated norm → out_proj."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        m = args.mamba
        assert m is not None
        self.m = m
        self.in_proj = nn.Linear(args.hidden_size, m.d_inner + m.conv_dim + m.num_heads, bias=m.proj_bias)
        self.conv1d = nn.Conv1d(m.conv_dim, m.conv_dim, m.d_conv, groups=m.conv_dim, bias=m.conv_bias,
                                padding=m.d_conv - 1)
        self.dt_bias = nn.Parameter(torch.ones(m.num_heads))
        self.A_log = nn.Parameter(torch.zeros(m.num_heads))
        self.D = nn.Parameter(torch.ones(m.num_heads))
        self.norm = RMSNorm(m.d_inner, args.rms_norm_eps)
        self.out_proj = nn.Linear(m.d_inner, args.hidden_size, bias=m.proj_bias)

    def _split_xbc(self, xbc: torch.Tensor):
        m = self.m
        x, b, c = xbc.split([m.d_inner, m.n_groups * m.d_state, m.n_groups * m.d_state], dim=-1)
        t = xbc.shape[0]
        return (x.reshape(t, m.num_heads, m.head_dim), b.reshape(t, m.n_groups, m.d_state),
                c.reshape(t, m.n_groups, m.d_state))

    def forward(self, h: torch.Tensor, batch: ForwardBatch, cache: tuple[torch.Tensor, torch.Tensor]):
        m = self.m
        conv_states, ssm_states = cache  # [slots, conv_dim, d_conv-1], [slots, H, P, N]
        zxbcdt = self.in_proj.forward(h)  # [T, d_inner + conv_dim + H]: gate | xBC | dt
        A = -torch.exp(self.A_log.float())
        w = self.conv1d.weight.squeeze(1)  # [conv_dim, d_conv]
        nd, t = batch.num_decodes, h.shape[0]
        ys = []
        if nd:
            ys.append(self._decode(zxbcdt[:nd], A, w, batch, conv_states, ssm_states))
        if t > nd:
            gate, xbc, dt = zxbcdt[nd:].split([m.d_inner, m.conv_dim, m.num_heads], dim=-1)
            y = self._prefill(xbc, dt, A, w, batch, conv_states, ssm_states)
            ys.append(K.gated_rms_norm(y.reshape(t - nd, m.d_inner), gate, self.norm.weight, self.norm.eps))
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=0)
        return self.out_proj.forward(y.to(h.dtype))

    def _decode(self, zxbcdt, A, w, batch: ForwardBatch, conv_states, ssm_states) -> torch.Tensor:
        """[nd, d_inner]: conv, state update and gated norm of the decode rows (one C++ call on CPU fp32)."""
        m, nd = self.m, zxbcdt.shape[0]
        slots = batch.state_indices[:nd]
        if cpu_mamba.usable(zxbcdt, conv_states, ssm_states):
            return cpu_mamba.mamba_decode(zxbcdt, conv_states, ssm_states, slots, w, self.conv1d.bias,
                                          self.dt_bias, A, self.D, self.norm.weight, n_groups=m.n_groups,
                                          eps=self.norm.eps)
        gate, xbc, dt = zxbcdt.split([m.d_inner, m.conv_dim, m.num_heads], dim=-1)
        xbc = K.causal_conv1d_update(xbc, conv_states, w, self.conv1d.bias, state_indices=slots, activation="silu")
        x, b, c = self._split_xbc(xbc)
        y = K.selective_state_update(ssm_states, x, dt, A, b, c, self.D, dt_bias=self.dt_bias, dt_softplus=True,
                                     state_indices=slots)
        return K.gated_rms_norm(y.reshape(nd, m.d_inner), gate, self.norm.weight, self.norm.eps)

    def _prefill(self, xbc, dt, A, w, batch: ForwardBatch, conv_states, ssm_states):
        m, nd = self.m, batch.num_decodes
        slots, has_init = batch.state_indices[nd:], batch.has_initial_state[nd:]
        cu = batch.prefill_cu_seqlens()
        keep = bool(batch.snapshot_slots)
        if keep:  # the conv windows of the snapshots need the inputs before the conv overwrites its state
            conv_keep = self._conv_windows(xbc, conv_states, slots, has_init, cu, batch)
        xbc = K.causal_conv1d(xbc, w, self.conv1d.bias, conv_states=conv_states, cu_seqlens=cu,
                              state_indices=slots, has_initial_state=has_init, activation="silu")
        x, b, c = self._split_xbc(xbc)
        init = ssm_states.index_select(0, slots).float() * has_init[:, None, None, None]  # [P, H, hd, N]
        y, final, *kept = K.ssd_scan(x, dt, A, b, c, self.D, chunk_size=m.chunk_size, dt_bias=self.dt_bias,
                                     dt_softplus=True, dt_limit=m.dt_limit, initial_states=init, cu_seqlens=cu,
                                     state_offsets=batch.snapshot_offsets if keep else None)
        ssm_states.index_copy_(0, slots, final.to(ssm_states.dtype))
        if keep:
            dst = torch.tensor(batch.snapshot_slots, dtype=torch.int64, device=ssm_states.device)
            ssm_states.index_copy_(0, dst, kept[0].to(ssm_states.dtype))
            conv_states.index_copy_(0, dst, conv_keep)
        return y

    @staticmethod
    def _conv_windows(xbc, conv_states, slots, has_init, cu, batch: ForwardBatch) -> torch.Tensor:
        """[K, conv_dim, d_conv-1]: the conv state after each snapshot offset (the last inputs before it)."""
        width = conv_states.shape[-1]
        rows = torch.tensor(batch.snapshot_rows, dtype=torch.int64, device=xbc.device)
        prev = conv_states.index_select(0, slots.index_select(0, rows))  # [K, Dc, width]
        prev = prev * has_init.index_select(0, rows)[:, None, None]
        starts = cu.tolist()
        out = []
        for k, (row, end) in enumerate(zip(batch.snapshot_rows, batch.snapshot_offsets)):
            recent = xbc[max(starts[row], end - width):end].t()  # [Dc, <= width]
            out.append(torch.cat([prev[k], recent], dim=1)[:, -width:] if width else prev[k])
        return torch.stack(out).to(conv_states.dtype)


class MLP(nn.Module):
    """SwiGLU MLP under Granite's names (fused gate|up `input_linear`) or Llama's (gate/up/down)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, i = args.hidden_size, args.intermediate_size
        self.style = args.mlp_style
        if self.style == "granite":
            self.input_linear = nn.Linear(d, 2 * i, bias=False)
            self.output_linear = nn.Linear(i, d, bias=False)
        else:
            self.gate_proj = nn.Linear(d, i, bias=False)
            self.up_proj = nn.Linear(d, i, bias=False)
            self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "granite":
            gate, up = self.input_linear.forward(x).chunk(2, dim=-1)
            return self.output_linear.forward(F.silu(gate).mul_(up))
        return self.down_proj.forward(F.silu(self.gate_proj.forward(x), inplace=True).mul_(self.up_proj.forward(x)))
