"""Guided decoding (structured outputs): a request's grammar compiled once, each step's logits masked to it.

The worker turns `response_format` / `tools` into a `GuidedSpec` on `SamplingParams.guided`; the
engine does the rest with xgrammar, in four places:

* validate (`LLMEngine.validate`, before anything is admitted): `Guide.compile` turns the spec into
  an `xgr.CompiledGrammar` for this engine's vocabulary, kept in a small LRU keyed by the spec. A
  grammar the library refuses is an `InvalidRequestError` naming `spec.param`.
* admission (`add_request`): one `xgr.GrammarMatcher` per sequence (`Sequence.matcher`, CPU state).
  Preemption keeps it (the tokens it accepted stay generated); finish and abort drop it.
* each step (`Sampler`): a `TokenMasker` fills one reused int32 bitmask [rows, ceil(V / 32)] on
  CPU, for the guided rows only, moves it to the logits' device and sets forbidden logits to -inf
  before greedy, top-k, top-p, sampling and logprobs. A step without guided rows does none of it.
* after the token is chosen (`Sequence.append_token`): the matcher accepts it; once the matcher
  has terminated (grammar complete, then a stop token) the sequence ends with "stop".

JSON is compact, with no free whitespace between tokens: a model that favours spaces (a random-weight
one may) could otherwise emit them until max_tokens. Inside structural tags, where xgrammar has no
compact mode, at most one whitespace character may follow another token. The vocabulary is the
model's (`args.vocab_size`, which may exceed the tokenizer's): ids the tokenizer lacks are always
masked. Thinking budgets do not apply: the grammar constrains from the first generated token, so
the engine never forces a token into a guided sequence. xgrammar is imported on first use, so an
engine that never sees a guided request never loads it.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from hybridserve.errors import InvalidRequestError

KINDS = ("json_object", "json_schema", "structural_tag")
_TAG_WHITESPACE = 1  # most whitespace characters in a row inside a structural tag's JSON
_CPP_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: .*? is false:\s*)?")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


@dataclass(frozen=True)
class GuidedSpec:
    """What the output must match. `value` is JSON text: for json_schema the schema; for
    structural_tag {"structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}: free text
    in which every trigger starts one of the structures (tool_choice "auto"), or, with no triggers,
    exactly one structure and nothing else. `param` is the request field an error names."""

    kind: str
    value: str = ""
    param: str = "response_format"

    @classmethod
    def json_schema(cls, schema: dict, param: str = "response_format") -> "GuidedSpec":
        return cls("json_schema", _dumps(schema), param)

    @classmethod
    def json_object(cls) -> "GuidedSpec":
        return cls("json_object")

    @classmethod
    def structural_tag(cls, structures: list[dict], triggers: list[str], param: str = "tools") -> "GuidedSpec":
        return cls("structural_tag", _dumps({"structures": structures, "triggers": triggers}), param)


def _library_message(err: Exception) -> str:
    """xgrammar's message without its C++ timestamp, source location and check text."""
    return _CPP_PREFIX.sub("", str(err)).strip() or type(err).__name__


def _structural_tag(spec: GuidedSpec) -> str:
    """The spec's structures and triggers as xgrammar's structural-tag JSON."""
    try:
        value = json.loads(spec.value)
        tags = [{"type": "tag", "begin": s["begin"], "end": s["end"],
                 "content": {"type": "json_schema", "json_schema": s["schema"],
                             "max_whitespace_cnt": _TAG_WHITESPACE}} for s in value["structures"]]
        triggers = list(value.get("triggers") or [])
    except (ValueError, TypeError, KeyError) as err:
        raise InvalidRequestError(f"malformed structural tag ({type(err).__name__}: {err}): expected "
                                  f'{{"structures": [{{"begin", "schema", "end"}}], "triggers": [...]}}',
                                  param=spec.param) from None
    if not tags:
        raise InvalidRequestError("a structural tag needs at least one structure", param=spec.param)
    fmt = ({"type": "triggered_tags", "triggers": triggers, "tags": tags} if triggers
           else {"type": "or", "elements": tags})
    return _dumps({"type": "structural_tag", "format": fmt})


class Guide:
    """One engine's grammar compiler and its cache of compiled grammars (thread-safe: the worker
    validates on its event loop, the engine admits on its own thread)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...], cache_size: int = 64):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: the width of its logits
        self.stop_ids = list(stop_ids)
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._compiler = None
        self._cache: OrderedDict[GuidedSpec, Any] = OrderedDict()

    def compile(self, spec: GuidedSpec):
        """The spec's `xgr.CompiledGrammar`; InvalidRequestError(param=spec.param) if it cannot be."""
        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
                return grammar
        grammar = self._compile(spec)  # outside the lock: at worst two threads compile one spec
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: GuidedSpec):
        """A fresh `xgr.GrammarMatcher` for one sequence (stop tokens: the engine's eos ids)."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))

    def _compile(self, spec: GuidedSpec):
        import xgrammar as xgr

        grammar = _grammar(spec)
        try:
            return self._get_compiler().compile_grammar(_json_safe(xgr, grammar))
        except (RuntimeError, ValueError) as err:
            raise InvalidRequestError(f"cannot compile the grammar of this {spec.kind.replace('_', ' ')}: "
                                      f"{_library_message(err)}", param=spec.param) from None

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = _tokenizer_info(xgr, self.tokenizer, self.vocab_size, self.stop_ids)
                # our own LRU keeps compiled grammars; the library's cache would hold them twice
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler


def _grammar(spec: GuidedSpec):
    """The spec as an `xgr.Grammar` (no vocabulary needed yet); InvalidRequestError if it is not one."""
    import xgrammar as xgr

    if spec.kind not in KINDS:
        raise InvalidRequestError(f"unknown guided decoding kind {spec.kind!r}; use one of {', '.join(KINDS)}",
                                  param=spec.param)
    source = _structural_tag(spec) if spec.kind == "structural_tag" else None
    if spec.kind == "json_schema":
        try:
            json.loads(spec.value)
        except ValueError as err:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {err}", param=spec.param) from None
    try:
        if spec.kind == "json_object":  # any object: strict mode would allow only {}
            return xgr.Grammar.from_json_schema('{"type":"object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "json_schema":
            return xgr.Grammar.from_json_schema(spec.value, any_whitespace=False)
        return xgr.Grammar.from_structural_tag(source)
    except (RuntimeError, ValueError, TypeError) as err:
        raise InvalidRequestError(f"cannot build a grammar for this {spec.kind.replace('_', ' ')}: "
                                  f"{_library_message(err)}", param=spec.param) from None


# xgrammar 0.2.9 writes a JSON string with minLength/maxLength as a run of [^"\\\r\n], so raw control
# characters, which JSON forbids, would pass. Such a grammar is rewritten to exclude U+0000-U+001F as
# its other JSON strings do (escapes stay unavailable there, as in the library).
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def _json_safe(xgr, grammar):
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


def _tokenizer_info(xgr, tokenizer, vocab_size: int, stop_ids: list[int]):
    """xgrammar's view of the model's vocabulary. The ids the detokenizer skips (special tokens) are
    blanked, which xgrammar never allows inside an output, so the text a grammar matched is the text
    the client receives; ids past the tokenizer's (padding up to the model's vocab_size) are blank too."""
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stop_ids or None)
    skipped = set(tokenizer.all_special_ids)
    vocab = [""] * vocab_size
    for token, idx in tokenizer.get_vocab().items():
        if idx < vocab_size and idx not in skipped:
            vocab[idx] = token
    return xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=vocab_size,
                             stop_token_ids=detected.stop_token_ids, add_prefix_space=detected.add_prefix_space)


class TokenMasker:
    """Sets to -inf the logits of tokens that guided sequences' grammars forbid, one step at a time."""

    def __init__(self):
        import xgrammar as xgr

        self._xgr = xgr
        self._bitmask: torch.Tensor | None = None  # int32 [rows, ceil(V / 32)] on CPU, reused across steps
        self.seconds = 0.0  # time spent filling and applying masks, for EngineStats

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list) -> None:
        """logits [S, V] fp32 on any device, masked in place at `rows` (row i by matchers[i]'s grammar)."""
        t0 = time.perf_counter()
        bitmask = self._buffer(logits.shape[0], logits.shape[1], logits.device)
        # one matcher at a time: xgr.BatchGrammarMatcher measured no faster on 1 thread and 6x slower
        # on 2 (8 rows of SmolLM2's 49,152-token vocabulary, in a JSON string: 0.11 ms as a loop)
        for row, matcher in zip(rows, matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        mask = bitmask[:logits.shape[0]]
        if logits.device.type != "cpu":  # from pinned memory; the step's sampling syncs before the next fill
            mask = mask.to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=logits.shape[1], indices=rows)
        self.seconds += time.perf_counter() - t0

    def _buffer(self, num_rows: int, vocab_size: int, device: torch.device) -> torch.Tensor:
        shape = self._xgr.get_bitmask_shape(num_rows, vocab_size)
        buf = self._bitmask
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1] != shape[1]:
            buf = torch.empty(max(shape[0], 8), shape[1], dtype=torch.int32,
                              pin_memory=device.type == "cuda")
            self._bitmask = buf
        return buf
