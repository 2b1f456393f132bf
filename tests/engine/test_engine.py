"""Engine behaviour: greedy parity with transformers.generate, batching, cache accounting, bad input."""
import pytest
import torch

from hybridserve.engine import FinishReason, SamplingParams
from hybridserve.errors import ContextLengthExceededError, EngineCapacityError, InvalidRequestError
from tests.engine.conftest import PROMPTS, hf_greedy

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def _encode(tokenizer, texts):
    return [tokenizer.encode(t) for t in texts]


def _all_free(engine):
    s = engine.stats()
    return s.num_free_blocks == s.num_total_blocks and s.num_free_slots == s.num_total_slots


@pytest.mark.parametrize("budget", [512, 16])  # 16 forces chunked prefill of every long prompt
def test_greedy_batch_equals_transformers_generate(make_engine, tokenizer, model_name, budget):
    engine = make_engine(max_num_batched_tokens=budget)
    prompts = _encode(tokenizer, PROMPTS)
    outs = engine.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model_name, tuple(p), 20)
        assert o.finish_reason is FinishReason.LENGTH
    assert _all_free(engine)


def test_requests_joining_a_running_batch(make_engine, tokenizer, model_name):
    engine = make_engine(max_num_batched_tokens=24)
    prompts = _encode(tokenizer, PROMPTS)
    results, pending = {}, list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 0:  # a new request every third step, while others decode
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, GREEDY)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
    for i, p in enumerate(prompts):
        assert results[f"r{i}"] == hf_greedy(model_name, tuple(p), 20)


def test_output_does_not_depend_on_batch_company(make_engine, tokenizer):
    """Sampled with a seed, a request gives the same tokens alone and in a full batch."""
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    target = tokenizer.encode("state slots must not leak")
    alone = make_engine().generate([target], params)[0].token_ids
    engine = make_engine()
    others = _encode(tokenizer, PROMPTS * 2)
    crowd = engine.generate(others[:3] + [target] + others[3:],
                            [SamplingParams(max_tokens=16, temperature=1.0, seed=i) for i in range(3)]
                            + [params] + [SamplingParams(max_tokens=16, temperature=1.0)] * 7)
    assert crowd[3].token_ids == alone
    assert _all_free(engine)


def test_short_memory_queues_and_preempts_without_corruption(make_engine, tokenizer, model_name):
    lay = make_engine(block_size=4).cache.layout
    budget = lay.num_slots * lay.bytes_per_slot + 42 * lay.bytes_per_block  # 42 blocks = 168 tokens
    engine = make_engine(block_size=4, cache_memory_gb=budget / 2**30)
    prompts = _encode(tokenizer, PROMPTS)  # 263 prompt tokens + 100 generated: cannot all fit
    outs = engine.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model_name, tuple(p), 20)
    assert engine.stats().num_preemptions_total > 0
    assert _all_free(engine)


def test_abort_mid_decode_frees_cache_at_once(make_engine, tokenizer):
    engine = make_engine()
    engine.add_request("a", tokenizer.encode("abort me"), SamplingParams(max_tokens=200, ignore_eos=True))
    engine.add_request("b", tokenizer.encode("keep me"), GREEDY)
    for _ in range(5):
        engine.step()
    assert not _all_free(engine)
    out = engine.abort_request("a")
    assert out.finished and out.finish_reason is FinishReason.ABORT
    assert engine.stats().num_running == 1
    while engine.has_unfinished():
        engine.step()
    assert _all_free(engine)


def test_bad_input_is_refused_and_engine_keeps_serving(make_engine, tokenizer, model_name):
    engine = make_engine(max_context=64)
    cases = [
        ([], GREEDY, InvalidRequestError),
        ([1, 2, 999], GREEDY, InvalidRequestError),
        ([1, -1], GREEDY, InvalidRequestError),
        (list(range(60)), GREEDY, ContextLengthExceededError),
        ([1, 2], SamplingParams(max_tokens=-1), InvalidRequestError),
        ([1, 2], SamplingParams(top_p=0.0), InvalidRequestError),
        ([1, 2], SamplingParams(stop_token_ids=[5000]), InvalidRequestError),
    ]
    for prompt, params, exc in cases:
        with pytest.raises(exc):
            engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished() and _all_free(engine)
    p = tokenizer.encode("still fine")
    assert engine.generate([p], GREEDY)[0].token_ids == hf_greedy(model_name, tuple(p), 20)


def test_request_larger_than_cache_is_refused(make_engine):
    lay = make_engine(block_size=4).cache.layout
    budget = lay.num_slots * lay.bytes_per_slot + 20 * lay.bytes_per_block
    engine = make_engine(block_size=4, cache_memory_gb=budget / 2**30, max_context=4096)
    with pytest.raises(EngineCapacityError):
        engine.add_request("big", [1] * 10, SamplingParams(max_tokens=engine.capacity_tokens))


@pytest.mark.parametrize("model_name", ["tiny-hybrid"])
def test_hybrid_decode_rows_come_in_seat_order(make_engine, tokenizer, model_name, monkeypatch):
    """A seat freed mid-batch goes to the next request (lowest free seat first), and the decode rows
    reach the Mamba state update in seat order, one run of seats the CPU path updates in place,
    with the same tokens as without company."""
    from hybridserve.kernels import cpu_mamba, dispatch

    seen = []
    real_update, real_fused = dispatch.selective_state_update, cpu_mamba.mamba_decode

    def spy_update(*args, state_indices=None, **kw):   # the torch path (and Triton on CUDA)
        seen.append(state_indices.tolist())
        return real_update(*args, state_indices=state_indices, **kw)

    def spy_fused(zxbcdt, conv_states, ssm_states, state_indices, *args, **kw):   # the C++ step on CPU
        seen.append(state_indices.tolist())
        return real_fused(zxbcdt, conv_states, ssm_states, state_indices, *args, **kw)

    monkeypatch.setattr(dispatch, "selective_state_update", spy_update)
    monkeypatch.setattr(cpu_mamba, "mamba_decode", spy_fused)
    engine = make_engine(max_num_seqs=4)
    short, long_ = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), GREEDY
    prompts = _encode(tokenizer, PROMPTS)
    engine.add_request("a", prompts[0], short)
    engine.add_request("b", prompts[1], long_)
    engine.add_request("c", prompts[2], long_)
    done = {}
    while "a" not in done:
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert engine.seqs["b"].slot == 1 and engine.seqs["c"].slot == 2
    engine.add_request("d", prompts[3], long_)
    seen.clear()
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert [0, 1, 2] in seen  # d took seat 0, a's, and decodes first in the batch
    assert seen and all(s == sorted(s) for s in seen)
    assert done["d"] == hf_greedy(model_name, tuple(prompts[3]), 20)
    assert done["b"] == hf_greedy(model_name, tuple(prompts[1]), 20)


def test_a_cpu_engine_tunes_malloc_for_every_caller(make_engine, monkeypatch):
    """The worker, `hybridserve bench` and the benchmarks all build engines this way."""
    import hybridserve.engine.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "tune_malloc", lambda: calls.append(1))
    make_engine()
    assert calls == [1]


def test_a_decode_only_step_packs_the_same_batch_as_the_general_path(make_engine, tokenizer):
    """prepare_decode (host lists) builds the batch prepare_mixed (torch ops) builds, field for field,
    for decodes at different positions that cross block boundaries."""
    import dataclasses

    engine = make_engine(max_num_seqs=4, block_size=4)
    for i, p in enumerate(_encode(tokenizer, PROMPTS[:3])):
        engine.add_request(f"r{i}", p, GREEDY)
    for _ in range(6):
        engine.step()
    sched = engine.scheduler.schedule()            # the next step, its blocks allocated
    seqs = [seq for seq, n in sched.entries][::-1]
    assert len(seqs) == 3 and all(n == 1 for _, n in sched.entries)
    assert all(s.num_computed > 0 for s in seqs) and len({s.num_computed for s in seqs}) > 1
    fast = engine.runner.prepare_decode(seqs)
    slow = engine.runner.prepare_mixed([(s, 1) for s in seqs])
    assert fast.num_decodes == 3 and fast.block_tables.shape[1] > 1
    for f in dataclasses.fields(fast):
        a, b = getattr(fast, f.name), getattr(slow, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name
