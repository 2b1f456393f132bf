"""Tiny GGUF files written with the `gguf` package, for conversion and serving tests.

`write_tiny_llama_gguf` writes a 2-layer Llama (fp32 tensors under llama.cpp's names) with
a byte-level BPE tokenizer in its metadata: the 256 byte symbols, a few merges, and the
control tokens `<|im_start|>`/`<|im_end|>` — what transformers' GGUF reader needs to build
both the model and the tokenizer. `chat_template=None` leaves the template out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 128, 2, 2, 1, 512
HEAD_DIM = HIDDEN // HEADS
MERGES = ["h e", "l l", "Ġ t", "Ġt he"]
SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = byte_symbols() + [m.replace(" ", "") for m in MERGES] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 3: control
    return tokens, types


def _tensors(vocab: int, seed: int, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape: int, std: float | None = None) -> np.ndarray:
        return (rng.standard_normal(shape) * (std or 1.0 / np.sqrt(shape[-1]))).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    t = {"token_embd.weight": w(vocab, HIDDEN, std=0.5), "output_norm.weight": norm()}
    if not tied:
        t["output.weight"] = w(vocab, HIDDEN, std=4.0 / np.sqrt(HIDDEN))
    for i in range(LAYERS):
        t |= {f"blk.{i}.attn_norm.weight": norm(), f"blk.{i}.ffn_norm.weight": norm(),
              f"blk.{i}.attn_q.weight": w(HEADS * HEAD_DIM, HIDDEN),
              f"blk.{i}.attn_k.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
              f"blk.{i}.attn_v.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
              f"blk.{i}.attn_output.weight": w(HIDDEN, HEADS * HEAD_DIM),
              f"blk.{i}.ffn_gate.weight": w(FFN, HIDDEN), f"blk.{i}.ffn_up.weight": w(FFN, HIDDEN),
              f"blk.{i}.ffn_down.weight": w(HIDDEN, FFN)}
    return t


def write_tiny_llama_gguf(path: Path, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE,
                          tied: bool = False, name: str = "tiny test llama") -> Path:
    import gguf

    tokens, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for tname, arr in _tensors(len(tokens), seed, tied).items():
        w.add_tensor(tname, arr)
    _finish(w)
    return path


def write_metadata_only_gguf(path: Path, arch: str) -> Path:
    """A GGUF file with only an architecture and a name (enough for validation to refuse it)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(CONTEXT)
    _finish(w)
    return path


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
