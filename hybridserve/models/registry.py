"""Architecture name → `ModelArgs` parser; torch-free so routers and harnesses can use it."""
from __future__ import annotations

import json
from pathlib import Path

from hybridserve.errors import UnsupportedModelError
from hybridserve.models.args import ModelArgs
from hybridserve.models.granite_hybrid import granite_args
from hybridserve.models.llama import llama_args

ARCHITECTURES = {"GraniteMoeHybridForCausalLM": granite_args, "LlamaForCausalLM": llama_args}


def read_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


def model_args(cfg: dict) -> ModelArgs:
    for arch in cfg.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch](cfg)
    raise UnsupportedModelError(
        f"architecture {cfg.get('architectures') or cfg.get('model_type')} is not supported by the native "
        f"engine (supported: {', '.join(ARCHITECTURES)}); use engine: vllm")
