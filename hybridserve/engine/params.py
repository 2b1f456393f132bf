"""`SamplingParams`: what a request asks of generation, validated against the model."""
from __future__ import annotations

from dataclasses import dataclass, field

from hybridserve.engine.guided import GuidedSpec
from hybridserve.errors import InvalidRequestError
from hybridserve.protocol import PRIORITIES


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None    # None = off; k >= 0 → chosen token's logprob and the top k
    # Budget forcing: once this many tokens were generated inside <think>…</think>, the engine
    # emits `think_end_ids` itself (the answer follows). None = no cap.
    max_thinking_tokens: int | None = None
    think_start_id: int | None = None
    think_end_ids: list[int] = field(default_factory=list)
    starts_in_thinking: bool = False   # the prompt already opened <think> (chat templates that do)
    cache_salt: str | None = None      # prefix-cache namespace (vLLM's `cache_salt`): equal salts share
    priority: str = "interactive"      # or "batch": runs on what interactive work leaves, preempted first
    guided: GuidedSpec | None = None   # structured output: every token must keep the output in this grammar;
    #                                    thinking budgets are not enforced on a guided request (see guided.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens}",
                                      param="max_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature}",
                                      param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}", param="top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError(f"logprobs must be in [0, 20], got {self.logprobs}", param="logprobs")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings", param="stop")
        if self.max_thinking_tokens is not None:
            if self.max_thinking_tokens < 0:
                raise InvalidRequestError("max_thinking_tokens must be >= 0", param="max_thinking_tokens")
            if not self.think_end_ids:
                raise InvalidRequestError("this model has no end-of-thinking token, so max_thinking_tokens "
                                          "cannot be enforced", param="max_thinking_tokens")
        if self.priority not in PRIORITIES:
            raise InvalidRequestError(f"hybridserve_priority must be one of {', '.join(PRIORITIES)}",
                                      param="hybridserve_priority")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})",
                                      param="stop_token_ids")
