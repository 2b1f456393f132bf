"""A stand-in engine with the AsyncEngine interface, for serving-layer checks without a model.

Byte tokenizer (ids 0..255, eos 256), deterministic "sampling" from the seed, a short
sleep per token so streams and disconnects are observable. Used only by tests that
pin the HTTP layer; behaviour of the real engine is tested against the real engine.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from hybridserve.errors import ContextLengthExceededError, InvalidRequestError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None


class ByteTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=list(text.encode()))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


class FakeEngine:
    def __init__(self, name="fake", max_context=512, delay_s=0.01):
        self.model_name, self.max_context, self.vocab_size = name, max_context, 257
        self.tokenizer = ByteTokenizer()
        self.delay_s = delay_s
        self.running: set[str] = set()
        self.prompt_total = self.gen_total = 0

    async def start(self):
        pass

    async def shutdown(self):
        pass

    def stats(self):
        return SimpleNamespace(num_running=len(self.running), num_waiting=0,
                               kv_cache_usage=len(self.running) / 16,
                               prompt_tokens_total=self.prompt_total,
                               generation_tokens_total=self.gen_total)

    async def abort(self, request_id):
        self.running.discard(request_id)

    async def generate(self, request_id, prompt_token_ids, params):
        if not prompt_token_ids:
            raise InvalidRequestError("empty prompt")
        if len(prompt_token_ids) + params.max_tokens > self.max_context:
            raise ContextLengthExceededError("too long")
        rng = random.Random(params.seed if params.seed is not None else
                            0 if params.temperature == 0 else time.time_ns())
        self.running.add(request_id)
        self.prompt_total += len(prompt_token_ids)
        t0 = time.perf_counter()
        ids, text, ttft = [], "", None
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.delay_s)
                tok = rng.randrange(97, 123)
                ids.append(tok)
                ttft = ttft or time.perf_counter() - t0
                delta = chr(tok)
                hit = [s for s in params.stop if s in text + delta]
                if hit:  # OpenAI semantics: the stop string is not part of the output
                    cut = (text + delta).index(hit[0])
                    delta = (text + delta)[len(text):cut] if cut > len(text) else ""
                text += delta
                self.gen_total += 1
                done = i + 1 == params.max_tokens or bool(hit)
                lp = [SimpleNamespace(token_id=tok, logprob=-1.0,
                                      top=[(tok, -1.0)] * (params.logprobs or 0))]
                e2e = time.perf_counter() - t0
                yield SimpleNamespace(
                    request_id=request_id, prompt_token_ids=prompt_token_ids, token_ids=list(ids),
                    text=text, delta_token_ids=[tok], delta_text=delta,
                    delta_logprobs=lp if params.logprobs is not None else None, finished=done,
                    finish_reason=("stop" if hit else "length") if done else None,
                    metrics=SimpleNamespace(prompt_tokens=len(prompt_token_ids), completion_tokens=len(ids),
                                            ttft_s=ttft, device_seconds=e2e / 2, queue_s=0.0, e2e_s=e2e,
                                            tpot_s=e2e / len(ids)))
                if done:
                    return
        finally:
            self.running.discard(request_id)


def make(backend):
    """Engine factory for `hybridserve worker --engine-factory tests.serving.fake_engine:make`."""
    return FakeEngine(backend.name, backend.max_context), SamplingParams
