"""GGUF files as checkpoints: converted once into a plain Hugging Face directory in the cache.

Contract:

* `read_metadata(path, keys)` reads metadata from a GGUF header, stopping as soon as it has
  them (`general.architecture` is the first key llama.cpp writes). It skips over the vocabulary
  arrays and never reads tensor data, so config validation stays cheap even for multi-GB files
  (`gguf.GGUFReader` parses every field, ~2.5 s for a 49k-token vocabulary).
  `header_config(path)` builds a config.json-shaped dict from the header (torch-free; what the
  gateway and the bench harness use for shape estimates before any conversion).
* `check_gguf(path, engine)` is models.yaml validation: the file exists, ends in `.gguf`, is
  GGUF, and for `engine: native` its architecture is one the native engine serves
  (`NATIVE_ARCHITECTURES`). Anything else raises `ValueError` naming the architecture and
  suggesting `engine: vllm`.
* `convert(path, engine)` returns `cache_root()/gguf/<stem>-<sha256[:16]>-v<N>`: model.safetensors
  (fp32, dequantized by transformers' GGUF reader), config.json, tokenizer.json +
  tokenizer_config.json (with the chat template) and generation_config.json, so the native
  engine, transformers and vLLM load the same directory. The directory is keyed by the file's
  content hash and written once: a lock makes concurrent processes convert once, the files go
  to a temp directory that is renamed into place, and later calls reuse it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from hybridserve.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

CONVERT_VERSION = 1   # bump when the written directory changes: cache directories are keyed by it
GGUF_MAGIC = b"GGUF"
# GGUF `general.architecture` -> the HF class the native engine serves (models/registry.py).
# transformers reads llama GGUFs as LlamaForCausalLM; Granite 4.0 H has no GGUF reader there.
NATIVE_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
HASH_CHUNK = 1 << 22
# Keys transformers' GGUF reader leaves behind that describe the source, not the model.
_CONFIG_DROP = ("quantization_config", "_model_name_or_path", "_name_or_path")
_TOKENIZER_DROP = ("is_local", "local_files_only", "name_or_path")

# GGUF value types (gguf.GGUFValueType): fixed-size scalars as struct codes.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


# ------------------------------------------------------------------ header


def _unpack(fh: BinaryIO, order: str, code: str) -> Any:
    size = struct.calcsize(code)
    raw = fh.read(size)
    if len(raw) != size:
        raise GGUFFormatError(f"{fh.name}: truncated GGUF header")
    return struct.unpack(order + code, raw)[0]


def _read_string(fh: BinaryIO, order: str) -> str:
    n = _unpack(fh, order, "Q")
    return fh.read(n).decode("utf-8", errors="replace")


def _skip_value(fh: BinaryIO, order: str, vtype: int) -> None:
    if vtype in _SCALARS:
        fh.seek(struct.calcsize(_SCALARS[vtype]), os.SEEK_CUR)
    elif vtype == _STRING:
        fh.seek(_unpack(fh, order, "Q"), os.SEEK_CUR)
    elif vtype == _ARRAY:
        etype, count = _unpack(fh, order, "I"), _unpack(fh, order, "Q")
        if etype in _SCALARS:
            fh.seek(count * struct.calcsize(_SCALARS[etype]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(fh, order, etype)
    else:
        raise GGUFFormatError(f"{fh.name}: unknown GGUF value type {vtype}")


def _read_value(fh: BinaryIO, order: str, vtype: int) -> Any:
    """A scalar or string as its value; an array as its element count (its items are skipped)."""
    if vtype in _SCALARS:
        return _unpack(fh, order, _SCALARS[vtype])
    if vtype == _STRING:
        return _read_string(fh, order)
    if vtype != _ARRAY:
        raise GGUFFormatError(f"{fh.name}: unknown GGUF value type {vtype}")
    start = fh.tell()
    _unpack(fh, order, "I")
    count = _unpack(fh, order, "Q")
    fh.seek(start)
    _skip_value(fh, order, vtype)
    return count


def _byte_order(fh: BinaryIO) -> str:
    if fh.read(4) != GGUF_MAGIC:
        raise GGUFFormatError(f"{fh.name}: not a GGUF file (no 'GGUF' magic at the start)")
    raw = fh.read(4)
    version = struct.unpack("<I", raw)[0]
    order = "<" if version < 0x10000 else ">"   # a big-endian file reads as a huge version
    if struct.unpack(order + "I", raw)[0] not in (2, 3):
        raise GGUFFormatError(f"{fh.name}: GGUF version {struct.unpack(order + 'I', raw)[0]} "
                              "is not supported (2 or 3)")
    return order


def read_metadata(path: str | Path, keys: tuple[str, ...] = ("general.architecture",)) -> dict[str, Any]:
    """The metadata `keys` a GGUF file has: scalars and strings as values, arrays as their length."""
    wanted, found = set(keys), {}
    with open(path, "rb") as fh:
        order = _byte_order(fh)
        _tensors, kv_count = _unpack(fh, order, "Q"), _unpack(fh, order, "Q")
        for _ in range(kv_count):
            key, vtype = _read_string(fh, order), _unpack(fh, order, "I")
            if key in wanted:
                found[key] = _read_value(fh, order, vtype)
                if len(found) == len(wanted):
                    break
            else:
                _skip_value(fh, order, vtype)
    return found


def tensor_names(path: str | Path) -> list[str]:
    """Names of the tensors a GGUF file holds (walks the header, reads no tensor data)."""
    names = []
    with open(path, "rb") as fh:
        order = _byte_order(fh)
        n_tensors, kv_count = _unpack(fh, order, "Q"), _unpack(fh, order, "Q")
        for _ in range(kv_count):
            _read_string(fh, order)
            _skip_value(fh, order, _unpack(fh, order, "I"))
        for _ in range(n_tensors):
            names.append(_read_string(fh, order))
            n_dims = _unpack(fh, order, "I")
            fh.seek(8 * n_dims + 4 + 8, os.SEEK_CUR)   # dims (u64 each), type (u32), offset (u64)
    return names


# llama.cpp's metadata key (after "<arch>.") -> HF config field, for `header_config`
_LLAMA_FIELDS = {
    "context_length": "max_position_embeddings", "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
    "rope.dimension_count": "head_dim", "vocab_size": "vocab_size",
}


def header_config(path: str | Path) -> dict[str, Any]:
    """A config.json-shaped dict of a GGUF file's model from its header alone (torch-free, no
    conversion): enough for shape estimates (parameters, KV bytes per token) of llama files."""
    arch = gguf_architecture(path)
    keys = tuple(f"{arch}.{k}" for k in _LLAMA_FIELDS) + (
        "tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id")
    meta = read_metadata(path, keys)
    cfg: dict[str, Any] = {"model_type": arch, "architectures": [NATIVE_ARCHITECTURES.get(arch, arch)]}
    cfg.update({hf: meta[f"{arch}.{k}"] for k, hf in _LLAMA_FIELDS.items() if f"{arch}.{k}" in meta})
    cfg.setdefault("vocab_size", meta.get("tokenizer.ggml.tokens"))
    if "tokenizer.ggml.eos_token_id" in meta:
        cfg["eos_token_id"] = meta["tokenizer.ggml.eos_token_id"]
    if "tokenizer.ggml.bos_token_id" in meta:
        cfg["bos_token_id"] = meta["tokenizer.ggml.bos_token_id"]
    cfg["tie_word_embeddings"] = "output.weight" not in tensor_names(path)
    return cfg


def gguf_architecture(path: str | Path) -> str:
    arch = read_metadata(path).get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFFormatError(f"{path}: GGUF file has no `general.architecture` metadata")
    return arch


# ------------------------------------------------------------------ validation


def is_gguf_ref(ref: str) -> bool:
    return ref.lower().endswith(".gguf")


def _refuse_native(path: Path, arch: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{path}: GGUF architecture '{arch}' is not served by the native engine (it serves GGUF "
        f"architectures: {', '.join(NATIVE_ARCHITECTURES)}); set `engine: vllm` for this backend")


def check_gguf(path: str | Path, engine: str) -> str:
    """Validate a `.gguf` checkpoint for `engine`; returns its architecture. Raises ValueError."""
    path = Path(os.path.expanduser(str(path)))
    if not is_gguf_ref(str(path)):
        raise ValueError(f"checkpoint '{path}' is a file but not a .gguf file; point `checkpoint` "
                         "at a .gguf file or a local HF directory with config.json")
    if not path.is_file():
        raise ValueError(f"GGUF checkpoint '{path}' does not exist; fix the path")
    arch = gguf_architecture(path)
    if engine == "native" and arch not in NATIVE_ARCHITECTURES:
        raise ValueError(str(_refuse_native(path, arch)))
    return arch


# ------------------------------------------------------------------ conversion


def file_sha256(path: str | Path, chunk: int = HASH_CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def converted_dir(path: str | Path, sha256: str | None = None) -> Path:
    """Where the HF directory of this GGUF file lives (keyed by the file's content)."""
    from hybridserve.models.builtin import cache_root

    path = Path(path)
    digest = sha256 or file_sha256(path)
    return cache_root() / "gguf" / f"{path.stem}-{digest[:16]}-v{CONVERT_VERSION}"


def _is_complete(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (released by the OS if the holder dies)."""
    import fcntl

    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_dequantized(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise UnsupportedModelError(f"{path}: transformers cannot read this GGUF file "
                                    f"(architecture '{gguf_architecture(path)}'): {err}") from err
    return model, tokenizer


def _write_weights(model, directory: Path) -> None:
    """fp32 safetensors; a tied lm_head is left out (every loader re-ties it from the config)."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _write_config(model, directory: Path) -> None:
    """config.json of the model without the GGUF quantization_config (the weights are plain fp32)."""
    data = model.config.to_dict()
    for key in _CONFIG_DROP:
        data.pop(key, None)
    data["architectures"] = [type(model).__name__]
    data["dtype"] = "float32"
    type(model.config).from_dict(data).save_pretrained(str(directory))
    model.generation_config.save_pretrained(str(directory))


def _write_tokenizer(tokenizer, directory: Path, max_length: int | None) -> None:
    """tokenizer.json + tokenizer_config.json, the chat template inside the latter too."""
    tokenizer.save_pretrained(str(directory))
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in _TOKENIZER_DROP:  # where the GGUF was read from, not what the tokenizer is
        cfg.pop(key, None)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        cfg.setdefault("chat_template", template)
    if max_length:
        cfg["model_max_length"] = max_length
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def write_hf_directory(path: str | Path, directory: str | Path) -> Path:
    """Dequantize the GGUF file at `path` into a complete HF directory `directory`."""
    path, directory = Path(path), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_dequantized(path)
    _write_weights(model, directory)
    _write_config(model, directory)
    _write_tokenizer(tokenizer, directory, getattr(model.config, "max_position_embeddings", None))
    return directory


def convert(path: str | Path, engine: str = "native") -> Path:
    """The HF directory of a GGUF file, converting it on first use (safe across processes)."""
    path = Path(os.path.expanduser(str(path))).resolve()
    arch = check_gguf(path, engine="any")
    if engine == "native" and arch not in NATIVE_ARCHITECTURES:
        raise _refuse_native(path, arch)
    digest = file_sha256(path)
    target = converted_dir(path, digest)
    if _is_complete(target):
        logger.info("GGUF %s: reusing its HF directory %s", path.name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        _convert_into(path, target, digest)
    return target


def _convert_into(path: Path, target: Path, digest: str) -> None:
    logger.info("converting %s to an HF directory (once) ...", path.name)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_hf_directory(path, tmp)
        (tmp / "hybridserve_source.json").write_text(json.dumps(
            {"gguf": str(path), "sha256": digest, "convert_version": CONVERT_VERSION}, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # a complete copy is already there (written without our lock)
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converting %s to an HF directory (once) ... done in %.0f s: %s",
                path.name, time.monotonic() - t0, target)
