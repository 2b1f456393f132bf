"""A byte-level tokenizer built locally (no downloads), saved in Hugging Face format.

Token id = byte value for the 256 bytes (GPT-2's byte-to-unicode alphabet, no
merges), followed by a few special tokens in Granite's chat format and the
`<think>` / `</think>` reasoning markers. Any text
round-trips exactly; one byte is one token, so a text's UTF-8 length is its
token count — a fact the gateway may rely on for a cheap upper bound.
"""
from __future__ import annotations

from pathlib import Path

EOS_TOKEN = "<|end_of_text|>"
START_ROLE = "<|start_of_role|>"
END_ROLE = "<|end_of_role|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, START_ROLE, END_ROLE, PAD_TOKEN]
EOS_ID, START_ROLE_ID, END_ROLE_ID, PAD_ID = 256, 257, 258, 259
# Reasoning markers: ordinary (visible) added tokens, so thinking shows in the text and the
# engine can force the end marker when a thinking budget runs out.
THINK_START, THINK_END = "<think>", "</think>"
THINK_START_ID, THINK_END_ID = 260, 261
VOCAB_USED = 262

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif -%}"
)


def _byte_alphabet() -> list[str]:
    """Printable stand-in character for each byte 0..255 (the GPT-2 byte-level scheme)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tokenizer():
    """The byte-level tokenizer as a `PreTrainedTokenizerFast` with Granite's chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False, model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(directory: Path) -> None:
    tok = build_tokenizer()
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + [THINK_START, THINK_END]]
    if ids != [EOS_ID, START_ROLE_ID, END_ROLE_ID, PAD_ID, THINK_START_ID, THINK_END_ID]:
        raise RuntimeError(f"special token ids drifted: {ids}")
    tok.save_pretrained(str(directory))
