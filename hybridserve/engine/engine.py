"""`LLMEngine`: the synchronous step loop — schedule → run → postprocess.

The engine knows nothing of HTTP or asyncio (see async_engine.py for that). It
validates requests on entry (typed errors, nothing half-admitted), measures each
step's wall time and splits it across the step's sequences by tokens processed,
so every request leaves with its own device-seconds. A guided request's grammar is
compiled in `validate` and its matcher made at admission (guided.py).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import torch

from hybridserve.cpu_malloc import tune_malloc
from hybridserve.engine.cache import CacheManager, plan_layout
from hybridserve.engine.guided import Guide
from hybridserve.engine.model_runner import ModelRunner
from hybridserve.engine.outputs import FinishReason, RequestOutput
from hybridserve.engine.params import SamplingParams
from hybridserve.engine.scheduler import Scheduler
from hybridserve.engine.sequence import Sequence
from hybridserve.errors import ContextLengthExceededError, EngineCapacityError, InvalidRequestError, OverloadedError

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of cache bytes (KV blocks + state slots) in use, 0..1
    num_free_blocks: int
    num_total_blocks: int
    num_free_slots: int
    num_total_slots: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions_total: int
    num_cached_blocks: int = 0       # full KV blocks findable by hash (held or evictable)
    num_cached_snapshots: int = 0    # Mamba state snapshots findable by hash
    num_total_snapshots: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0     # of which were found cached
    num_waiting_batch: int = 0
    num_running_batch: int = 0
    batch_tokens_total: int = 0          # tokens computed for batch-priority requests
    interactive_tokens_total: int = 0
    requests_shed_total: int = 0         # refused with 429: the waiting queue was full
    guided_requests_total: int = 0       # admitted with a grammar (structured output)
    guided_mask_seconds_total: float = 0.0  # spent filling and applying grammar masks


@dataclass
class EngineConfig:
    max_context: int
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    cache_memory_gb: float = 1.0
    device: str = "cpu"
    seed: int = 0
    enable_prefix_caching: bool = True
    mamba_snapshot_interval: int | None = None  # default: the Mamba chunk size, rounded up to whole blocks
    snapshot_memory_share: float = 0.25  # of the cache left after the seats, for Mamba snapshots
    max_num_waiting: int = 256  # more waiting requests than this: a new one gets 429 + Retry-After


def snapshot_interval(config: EngineConfig, args) -> int:
    """Tokens between a hybrid's periodic snapshots: as configured (the scheduler checks it is whole
    blocks), else the model's Mamba chunk size rounded up to whole blocks."""
    if config.mamba_snapshot_interval is not None:
        return config.mamba_snapshot_interval
    bs = config.block_size
    chunk = args.mamba.chunk_size if args.mamba is not None else bs
    return -(-chunk // bs) * bs


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, name: str = "model"):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        if config.device == "cpu":  # the worker, `hybridserve bench` and the benchmarks alike
            tune_malloc()
        args = model.args
        self.vocab_size = args.vocab_size
        self.max_context = min(config.max_context, args.max_position)
        self.eos_ids = args.eos_token_ids or tuple(
            [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else [])
        dtype = next(model.parameters()).dtype
        specs = model.cache_specs()
        share = config.snapshot_memory_share if config.enable_prefix_caching else 0.0
        layout = plan_layout(specs, dtype, config.block_size, config.max_num_seqs,
                             int(config.cache_memory_gb * 2**30), snapshot_share=share)
        self.cache = CacheManager(specs, layout, dtype, config.device)
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_num_batched_tokens,
                                   prefix_caching=config.enable_prefix_caching,
                                   snapshot_interval=snapshot_interval(config, args))
        self.salt = hashlib.blake2b(f"{name}:{args.architecture}:{args.vocab_size}".encode(),
                                    digest_size=16).digest()
        self.runner = ModelRunner(model, self.cache, config.device, config.seed)
        self.guide = Guide(tokenizer, self.vocab_size, self.eos_ids)
        self.seqs: dict[str, Sequence] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._preemptions_total = 0
        self._tokens_by_priority = {"interactive": 0, "batch": 0}
        self._shed_total = 0
        self._guided_total = 0
        self._tok_s = 0.0  # recent computed tokens per second (an EMA over steps), for Retry-After
        log.info("%s: %d KV blocks x %d tokens, %d state slots, %d snapshot slots, %.1f MiB cache, "
                 "prefix caching %s", name, layout.num_blocks, layout.block_size, layout.num_slots,
                 layout.num_snapshots, layout.total_bytes / 2**20,
                 "on" if config.enable_prefix_caching else "off")

    @classmethod
    def from_backend(cls, backend) -> "LLMEngine":
        """Build from a `BackendConfig` (engine: native)."""
        from transformers import AutoTokenizer

        from hybridserve.models.builtin import resolve_checkpoint
        from hybridserve.models.loader import load_model

        path = resolve_checkpoint(backend.checkpoint)
        model = load_model(path, backend.dtype, backend.device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        opts = backend.native
        cfg = EngineConfig(max_context=backend.max_context, max_num_seqs=opts.max_num_seqs,
                           max_num_batched_tokens=opts.max_num_batched_tokens, block_size=opts.block_size,
                           cache_memory_gb=opts.cache_memory_gb, device=backend.device,
                           enable_prefix_caching=opts.enable_prefix_caching,
                           mamba_snapshot_interval=opts.mamba_snapshot_interval,
                           snapshot_memory_share=opts.snapshot_memory_share,
                           max_num_waiting=opts.max_num_waiting)
        return cls(model, tokenizer, cfg, name=backend.name)

    # ---- requests
    @property
    def capacity_tokens(self) -> int:
        lay = self.cache.layout
        return lay.num_blocks * lay.block_size if self.cache.uses_blocks else self.max_context

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise a typed error if this request can never be served; admits nothing."""
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty; send at least one token", param="prompt")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                                      param="prompt")
        params.validate(self.vocab_size)
        if params.guided is not None:
            self.guide.compile(params.guided)  # cached: admission's matcher reuses it
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_context:
            raise ContextLengthExceededError(
                f"this model's maximum context is {self.max_context} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens asks for {params.max_tokens} more ({total})")
        if total > self.capacity_tokens:
            raise EngineCapacityError(f"prompt + max_tokens ({total}) exceed the cache capacity of "
                                      f"{self.capacity_tokens} tokens; lower max_tokens", param="max_tokens")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue a request; `params.cache_salt` (e.g. a tenant) keeps its prefix-cache entries its own."""
        if request_id in self.seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        self.validate(prompt_ids, params)
        if self.scheduler.num_waiting >= self.config.max_num_waiting:
            self._shed_total += 1
            raise OverloadedError(f"{self.name}: {self.scheduler.num_waiting} requests are already waiting "
                                  f"(native.max_num_waiting); retry later", self.retry_after_s())
        salt = self.salt if not params.cache_salt else hashlib.blake2b(
            self.salt + params.cache_salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        matcher = self.guide.matcher(params.guided) if params.guided is not None else None
        seq = Sequence(request_id, prompt_ids, params, self.tokenizer, self.eos_ids, arrival_time, salt=salt,
                       matcher=matcher)
        self._guided_total += matcher is not None
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        self._prompt_tokens_total += len(prompt_ids)

    def retry_after_s(self) -> float:
        """When the queue should next have room: one waiting request's mean work (prompt left + tokens to
        generate) at the recent token rate, about the time the head of the queue takes to move (1-300 s)."""
        work = sum(s.num_uncomputed + s.params.max_tokens - len(s.output_ids)
                   for q in (self.scheduler.waiting, self.scheduler.waiting_batch) for s in q)
        work //= max(1, len(self.scheduler.waiting) + len(self.scheduler.waiting_batch))  # the next one's wait
        return min(300.0, max(1.0, work / self._tok_s if self._tok_s > 0 else 1.0))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks and slot now; returns its final output, if it existed."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish(FinishReason.ABORT)
        return seq.take_output()

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the loop
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self._preemptions_total += sched.num_preempted
        if not sched:
            return []
        t0 = time.perf_counter()
        results = self.runner.run(sched)
        if self.config.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        self.scheduler.update_from_output(sched)
        total = sched.num_tokens
        rate = total / max(elapsed, 1e-6)
        self._tok_s = rate if self._tok_s == 0 else 0.9 * self._tok_s + 0.1 * rate
        for seq, n in sched.entries:
            seq.metrics.device_seconds += elapsed * n / total
            self._tokens_by_priority[seq.params.priority] += n
        now = time.time()
        outputs = []
        for seq, token, record in results:
            token = seq.override(token)
            if record is not None and record.token_id != token:
                record = type(record)(token_id=token, logprob=0.0, top=record.top)  # forced, not sampled
            seq.append_token(token, record, now)
            self._generation_tokens_total += 1
            if seq.finished:
                self.scheduler.finish(seq)
                self.seqs.pop(seq.request_id, None)
            outputs.append(seq.take_output())
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion (batch convenience for tests and benchmarks)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{id(self)}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while any(r not in final for r in ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in ids]

    def stats(self) -> EngineStats:
        lay = self.cache.layout
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.cache.usage(), num_free_blocks=self.cache.num_free_blocks,
            num_total_blocks=lay.num_blocks, num_free_slots=self.cache.num_free_slots,
            num_total_slots=lay.num_slots, prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_preemptions_total=self._preemptions_total,
            num_cached_blocks=self.cache.num_cached_blocks, num_cached_snapshots=self.cache.num_cached_snapshots,
            num_total_snapshots=lay.num_snapshots, prefix_cache_queries_total=self.scheduler.prefix_queries,
            prefix_cache_hits_total=self.scheduler.prefix_hits,
            num_waiting_batch=len(self.scheduler.waiting_batch),
            num_running_batch=sum(1 for s in self.scheduler.running if s.is_batch),
            batch_tokens_total=self._tokens_by_priority["batch"],
            interactive_tokens_total=self._tokens_by_priority["interactive"],
            requests_shed_total=self._shed_total, guided_requests_total=self._guided_total,
            guided_mask_seconds_total=self.runner.sampler.mask_seconds)
