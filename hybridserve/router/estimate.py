"""A starting economics table from config arithmetic, for backends no profile has measured.

Decoding one token reads every weight once (plus the attention layers' KV cache), so
    decode tok/s ≈ memory bandwidth / (weight bytes + KV bytes per token × context);
prefill is compute-bound:
    prefill tok/s ≈ FLOP/s / (2 × params + 2 × attention layers × hidden × context).

Parameters are counted exactly from a checkpoint's safetensors headers when it has any,
else from its config.json shape (hidden size, layers, vocabulary, MLP and Mamba widths);
a single-file checkpoint (GGUF) from its size and the quantisation its name states
(`file_params`, default 2 bytes a parameter).
The device figures are deliberately rough, the order of magnitude of one machine:

    cpu   15 GB/s memory bandwidth, 1e11 FLOP/s (a few cores, fp32 FMA)
    cuda  2 TB/s (an H100-class HBM), 2e14 FLOP/s (dense bf16 at realistic utilisation)

The table only needs the backends' *ratios* right to rank them, and every finished
request corrects it (see table.py), so an error of 2x here fades within minutes of
traffic. `hybridserve bench` measures instead: prefer its economics_profile.
Pure: reads JSON and file headers, never imports torch or the engine.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from hybridserve.router.economics import context_bucket
from hybridserve.router.table import Entry

DEVICE_FIGURES = {"cpu": (15e9, 1e11), "cuda": (2e12, 2e14)}   # (bytes/s, FLOP/s)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FIRST_BUCKET = 512
MAX_HEADER_BYTES = 100 << 20


def device_figures(device: str) -> tuple[float, float]:
    """(memory bytes/s, FLOP/s) for 'cpu', 'cuda' or 'cuda:N'."""
    return DEVICE_FIGURES["cuda" if device.startswith("cuda") else "cpu"]


def safetensors_params(directory: str | Path) -> int | None:
    """Exact parameter count from the headers of a directory's *.safetensors (None: no files)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > MAX_HEADER_BYTES:
                return None
            header = json.loads(fh.read(size))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


_QUANT_BYTES = (("f32", 4.0), ("bf16", 2.0), ("f16", 2.0), ("q8", 1.06), ("q6", 0.82), ("q5", 0.69),
                ("q4", 0.56), ("q3", 0.43), ("q2", 0.33))


def file_params(path: str | Path) -> int | None:
    """Rough parameter count of a single-file checkpoint: its size over the bytes a parameter
    takes in the quantisation its name states (e.g. `model-Q8_0.gguf`); None: no such file."""
    p = Path(path)
    if not p.is_file():
        return None
    name = p.name.lower().replace("_", "")
    per = next((b for tag, b in _QUANT_BYTES if tag in name), 2.0)
    return int(p.stat().st_size / per)


def _layer_kinds(cfg: dict[str, Any]) -> list[str]:
    n = int(cfg.get("num_hidden_layers") or 0)
    kinds = cfg.get("layer_types") or ["attention"] * n
    return ["mamba" if "mamba" in str(k) else "attention" for k in kinds]


def _head_dim(cfg: dict[str, Any]) -> int:
    h, heads = int(cfg["hidden_size"]), int(cfg.get("num_attention_heads") or 1)
    return int(cfg.get("head_dim") or h // heads)


def config_params(cfg: dict[str, Any]) -> int:
    """Parameter count from a config.json's shape (Llama-, Granite- and Granite-hybrid-style)."""
    h, v = int(cfg["hidden_size"]), int(cfg.get("vocab_size") or 0)
    heads = int(cfg.get("num_attention_heads") or 1)
    kv, hd = int(cfg.get("num_key_value_heads") or heads), _head_dim(cfg)
    inter = int(cfg.get("shared_intermediate_size") or cfg.get("intermediate_size") or 4 * h)
    attn = 2 * h * heads * hd + 2 * h * kv * hd
    mlp = 3 * h * inter
    d_inner = int(cfg.get("mamba_n_heads", 0) * cfg.get("mamba_d_head", 0)) or int(cfg.get("mamba_expand", 2) * h)
    groups_state = 2 * int(cfg.get("mamba_n_groups", 1)) * int(cfg.get("mamba_d_state", 0))
    mamba = (h * (2 * d_inner + groups_state + int(cfg.get("mamba_n_heads", 0))) + d_inner * h
             + (d_inner + groups_state) * int(cfg.get("mamba_d_conv", 4)))
    layers = sum(attn if k == "attention" else mamba for k in _layer_kinds(cfg)) + len(_layer_kinds(cfg)) * mlp
    embed = v * h * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return layers + embed


def kv_bytes_per_token(cfg: dict[str, Any], dtype_bytes: int) -> int:
    """KV-cache bytes one token of context adds (attention layers only; Mamba state is constant)."""
    heads = int(cfg.get("num_attention_heads") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)
    attn_layers = _layer_kinds(cfg).count("attention")
    return 2 * attn_layers * kv * _head_dim(cfg) * dtype_bytes


def seed_entries(params: int, cfg: dict[str, Any] | None, dtype: str, device: str,
                 max_context: int) -> list[Entry]:
    """Estimated (context, concurrency 1) rows, one per power-of-4 bucket from 512 up to max_context."""
    bw, flops = device_figures(device)
    nbytes = DTYPE_BYTES.get(dtype, 4)
    kv = kv_bytes_per_token(cfg, nbytes) if cfg else 0
    attn_width = (_layer_kinds(cfg).count("attention") * int(cfg["hidden_size"])) if cfg else 0
    top = context_bucket(max_context)
    buckets, c = [], FIRST_BUCKET
    while c < top:
        buckets.append(c)
        c *= 4
    out = []
    for ctx in [*buckets, top]:
        decode = bw / (params * nbytes + kv * ctx)
        prefill = flops / (2 * params + 2 * attn_width * ctx)
        out.append(Entry(ctx, 1, prefill, decode, kv * ctx))
    return out
