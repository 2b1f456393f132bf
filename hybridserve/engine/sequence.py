"""`Sequence`: one request's tokens, cache holdings, text and finish state inside the engine.

A sequence's tokens are prompt + output. `num_computed` counts the tokens whose
KV entries / Mamba state are already in the cache; the next step feeds tokens
[num_computed, num_computed + n). Text is produced incrementally; stop strings
are searched only in new text, and text that might still turn into a stop
string is held back from the stream until it cannot. A guided sequence carries its
grammar matcher (guided.py), which accepts every appended token and ends the
sequence when the grammar is complete.
"""
from __future__ import annotations

import enum
import logging
import time

import torch

from hybridserve.engine.block_pool import block_hashes
from hybridserve.engine.outputs import FinishReason, RequestMetrics, RequestOutput, TokenLogprob
from hybridserve.engine.params import SamplingParams

log = logging.getLogger(__name__)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class IncrementalDetokenizer:
    """Decodes output tokens a few at a time without splitting multi-byte characters or words."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, ids: list[int]) -> str:
        decode = self.tokenizer.decode
        prefix = decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return full[len(prefix):]

    def flush(self, ids: list[int]) -> str:
        """At finish: whatever is still held back, incomplete characters included (as U+FFFD)."""
        decode = self.tokenizer.decode
        prefix = decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(ids[self.prefix_offset:], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer,
                 eos_ids: tuple[int, ...], arrival_time: float | None = None, salt: bytes = b"",
                 matcher=None):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = SeqStatus.WAITING
        self.num_computed = 0
        self.block_ids: list[int] = []
        self.slot: int | None = None
        self.salt = salt  # names this sequence's blocks in the prefix cache: the model's, maybe a tenant's
        self._block_hashes: list[bytes] = []
        self.num_named_blocks = 0  # leading blocks published in the prefix cache (hashed)
        self.finish_reason: FinishReason | None = None
        self.metrics = RequestMetrics(prompt_tokens=len(prompt_ids), arrival_time=arrival_time or time.time())
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self._detok = IncrementalDetokenizer(tokenizer)
        self._max_stop = max((len(s) for s in params.stop), default=0)
        self.text = ""
        self._emitted_chars = 0
        self._emitted_tokens = 0
        self._pending_logprobs: list[TokenLogprob] = []
        self.in_thinking = params.starts_in_thinking
        self.thinking_tokens = 0
        self.thinking_budget_exhausted = False
        self._forced: list[int] = []
        self.matcher = matcher  # xgr.GrammarMatcher of a guided request; kept across preemption

    # ---- sizes
    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_batch(self) -> bool:
        return self.params.priority == "batch"

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without joining the two lists (a per-step path)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    def block_hashes(self, num_blocks: int, block_size: int) -> list[bytes]:
        """Chained hashes of the first `num_blocks` full blocks of prompt + output (computed once each)."""
        if len(self._block_hashes) < num_blocks:
            block_hashes(self.token_slice(0, num_blocks * block_size), block_size, self.salt, self._block_hashes)
        return self._block_hashes[:num_blocks]

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    # ---- generation
    def override(self, sampled: int) -> int:
        """The token to append: a forced end-of-thinking token while one is pending, else `sampled`."""
        return self._forced.pop(0) if self._forced else sampled

    def _track_thinking(self, token_id: int) -> None:
        p = self.params
        if p.think_start_id is not None and token_id == p.think_start_id:
            self.in_thinking = True
            return
        if p.think_end_ids and token_id == p.think_end_ids[-1]:
            self.in_thinking = False
            return
        if self.in_thinking and not self._forced:
            self.thinking_tokens += 1
            if (p.max_thinking_tokens is not None and self.thinking_tokens >= p.max_thinking_tokens
                    and p.guided is None):  # a forced token could break the grammar
                self.thinking_budget_exhausted = True
                self._forced = list(p.think_end_ids)

    def append_token(self, token_id: int, logprob: TokenLogprob | None, now: float) -> None:
        """Add a sampled token, update text, and decide whether the sequence is done."""
        grammar_done = self._advance_grammar(token_id)
        self._track_thinking(token_id)
        self.output_ids.append(token_id)
        self.metrics.completion_tokens = len(self.output_ids)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        if token_id in self._stop_ids or grammar_done:
            self.finish(FinishReason.STOP, now)
            return
        old_len = len(self.text)
        last = len(self.output_ids) >= self.params.max_tokens
        detok = self._detok.flush if last else self._detok.step  # the last token releases held-back bytes
        self.text += detok(self.output_ids)
        if self._max_stop and len(self.text) > old_len and self._cut_at_stop(old_len):
            self.finish(FinishReason.STOP, now, flush=False)
        elif last:
            self.finish(FinishReason.LENGTH, now, flush=False)

    def _advance_grammar(self, token_id: int) -> bool:
        """Feed the token to the grammar matcher, if any; True when the grammar has ended (a stop
        token taken after a complete output, even with ignore_eos)."""
        if self.matcher is None:
            return False
        if not self.matcher.accept_token(token_id):  # the mask allowed only accepted tokens: a bug
            log.error("request %s: grammar rejected token %d; ending the request", self.request_id, token_id)
            return True
        return self.matcher.is_terminated()

    def _ended_on_stop_id(self) -> bool:
        return bool(self.output_ids) and self.output_ids[-1] in self._stop_ids

    def _cut_at_stop(self, old_len: int) -> bool:
        window_start = max(0, old_len - self._max_stop + 1)
        hits = [i for s in self.params.stop if (i := self.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def finish(self, reason: FinishReason, now: float | None = None, flush: bool = True) -> None:
        """Mark done; `flush` appends text still held back (a trailing partial character)."""
        if flush:
            self.text += self._detok.flush(self.output_ids[:-1] if self._ended_on_stop_id() else self.output_ids)
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason
        self.matcher = None
        self.metrics.finish_time = now or time.time()

    def take_output(self) -> RequestOutput:
        """The delta since the last call (text held back while it could still start a stop string)."""
        safe = len(self.text) if self.finished else max(self._emitted_chars,
                                                        len(self.text) - max(self._max_stop - 1, 0))
        delta_text = self.text[self._emitted_chars:safe]
        delta_ids = self.output_ids[self._emitted_tokens:]
        out = RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_ids, token_ids=list(self.output_ids),
            text=self.text[:safe], delta_token_ids=delta_ids, delta_text=delta_text,
            delta_logprobs=self._pending_logprobs, finished=self.finished,
            finish_reason=self.finish_reason, metrics=self.metrics,
        )
        self._emitted_chars, self._emitted_tokens = safe, len(self.output_ids)
        self._pending_logprobs = []
        return out
