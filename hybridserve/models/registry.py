"""Architecture name → `ModelArgs` parser; torch-free so routers and harnesses can use it.

`read_config` reads config.json as transformers 5's `save_pretrained` writes it: non-finite
floats come as `{"__float__": "Infinity" | "-Infinity" | "NaN"}` (e.g. Granite's
`time_step_limit: [0.0, inf]`) and are decoded back to floats; bare `Infinity`/`NaN` (older
writers) parse too. `model_args` also accepts `rope_parameters` nested per layer type
(`{"full_attention": {...}}`), taking the attention layers' entry.
"""
from __future__ import annotations

import json
from pathlib import Path

from hybridserve.errors import UnsupportedModelError
from hybridserve.models.args import ModelArgs
from hybridserve.models.granite_hybrid import granite_args
from hybridserve.models.llama import llama_args

ARCHITECTURES = {"GraniteMoeHybridForCausalLM": granite_args, "LlamaForCausalLM": llama_args}
_NON_FINITE = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}
_ATTENTION_ROPE_KEYS = ("full_attention", "attention", "default")


def _decode_non_finite(obj: dict):
    """json object_hook: transformers 5's `{"__float__": "Infinity"}` → float('inf')."""
    if len(obj) == 1 and "__float__" in obj:
        raw = obj["__float__"]
        if raw not in _NON_FINITE:
            raise ValueError(f"config.json: unknown non-finite float {raw!r} (expected one of "
                             f"{', '.join(_NON_FINITE)})")
        return _NON_FINITE[raw]
    return obj


def parse_config_text(text: str) -> dict:
    return json.loads(text, object_hook=_decode_non_finite)


def read_config(directory: str | Path) -> dict:
    return parse_config_text((Path(directory) / "config.json").read_text())


def _flat_rope(cfg: dict) -> dict:
    """`rope_parameters` as one dict: the attention layers' entry when it is nested per layer type."""
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or not rope or not all(isinstance(v, dict) for v in rope.values()):
        return cfg
    for key in _ATTENTION_ROPE_KEYS:
        if key in rope:
            return {**cfg, "rope_parameters": rope[key]}
    if len(rope) == 1:
        return {**cfg, "rope_parameters": next(iter(rope.values()))}
    raise UnsupportedModelError(f"rope_parameters per layer type {sorted(rope)} are not supported by the "
                                "native engine (one set for attention layers only); use engine: vllm")


def model_args(cfg: dict) -> ModelArgs:
    for arch in cfg.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch](_flat_rope(cfg))
    raise UnsupportedModelError(
        f"architecture {cfg.get('architectures') or cfg.get('model_type')} is not supported by the native "
        f"engine (supported: {', '.join(ARCHITECTURES)}); use engine: vllm")
