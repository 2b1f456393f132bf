"""Load a local Hugging Face checkpoint directory into the native `CausalLM`.

Reads config.json, maps the architecture to `ModelArgs` (refusing what the
native engine cannot compute exactly), builds the module and loads every
safetensors shard with strict key checking: a missing or extra weight is an error.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hybridserve.errors import UnsupportedModelError
from hybridserve.models.cpu_linear import prepack_available, prepack_linears
from hybridserve.models.decoder import CausalLM
from hybridserve.models.layers import rope_inv_freq
from hybridserve.models.registry import model_args, read_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights found")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def load_model(directory: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
               prepack: bool | None = None) -> CausalLM:
    """The native model for an HF directory, weights in `dtype` on `device`, in eval mode.

    On CPU in fp32 the linears get oneDNN-packed weights (`models.cpu_linear`) unless
    `prepack=False` or `HYBRIDSERVE_CPU_PREPACK=0`; `prepack=True` insists on it.
    """
    directory = Path(directory)
    args = model_args(read_config(directory))
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if prepack is None:
        prepack = prepack_available(device, torch_dtype)
    elif prepack and not prepack_available(device, torch_dtype):
        raise ValueError(f"prepack=True needs fp32 on CPU with oneDNN (got {torch_dtype} on {device}, "
                         "or HYBRIDSERVE_CPU_PREPACK=0)")
    with torch.device("meta"):
        model = CausalLM(args)
    weights = _read_weights(directory)
    if args.tie_word_embeddings and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        raise UnsupportedModelError(f"{directory}: weights do not match the {args.architecture} layout "
                                    f"(missing {missing[:5]}, unexpected {extra[:5]})")
    state = {k: weights[k].to(device=device, dtype=torch_dtype) for k in expected}
    model.load_state_dict(state, assign=True, strict=True)
    del state, weights  # the model holds the tensors now; packing below can free them one by one
    if model.rotary is not None:  # a non-persistent buffer: not in the state dict, still on meta
        model.rotary.inv_freq = rope_inv_freq(args.rope, args.head_dim).to(device)
    if device == "cpu" and torch_dtype == torch.float32 and any(t == "attention" for t in args.layer_types):
        from hybridserve.kernels import cpu_attention

        cpu_attention.available()   # build (or load) the C++ decode kernel now, not at the first token
    if device == "cpu" and torch_dtype == torch.float32:
        from hybridserve.kernels import cpu_ops

        cpu_ops.available()         # the C++ norm and rotary, likewise
        if any(t == "mamba" for t in args.layer_types):
            from hybridserve.kernels import cpu_mamba, cpu_ssd

            cpu_mamba.available()   # the Mamba mixer's decode/conv/norm and the SSD scan, likewise
            cpu_ssd.available()
    if prepack:
        prepack_linears(model)
        # What is left (embedding, norms, conv, A/D) still points into the safetensors file's
        # mapping, whose pages the packing read in; own copies let that mapping go.
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.device.type == "cpu" and not t.is_mkldnn:
                    t.data = t.data.clone()
    return model.eval()
