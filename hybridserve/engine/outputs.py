"""What the engine hands back per request: token deltas, text deltas, logprobs, metrics."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    """Serialises to OpenAI's `finish_reason` values."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"

    def __str__(self) -> str:
        return self.value


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class RequestMetrics:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    device_seconds: float = 0.0  # share of each step's wall time, split by tokens processed
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not computed)

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot_s(self) -> float | None:
        if self.finish_time is None or self.first_token_time is None or self.completion_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.completion_tokens - 1)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    delta_logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: FinishReason | None
    metrics: RequestMetrics
