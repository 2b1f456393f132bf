"""Prefix caching: with it on, greedy output equals caching off (and transformers) for both architectures,
`cached_tokens` is the reused length, and every reference comes back after any workload."""
import random

import pytest

from hybridserve.engine import SamplingParams
from tests.engine.conftest import hf_greedy

BS = 8  # the fixture's block size


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def ids(tokenizer, text):
    return tokenizer.encode(text)


def assert_clean(engine):
    """No reference, seat or waiting sequence is left; every hash points back at its holder."""
    c = engine.cache
    assert not engine.has_unfinished()
    assert all(r == 0 for r in c.blocks.ref_count), "a KV block kept a reference"
    assert c.num_free_blocks == c.layout.num_blocks
    assert c.num_free_slots == c.layout.num_slots
    assert all(c.blocks.hash_of[b] == h for h, b in c.blocks.by_hash.items())
    assert all(c.states._lru[s] == h for h, s in c.states._by_hash.items())


def random_ids(rng, tokenizer, n):
    """n random ordinary token ids (no pad/eos/added tokens: transformers would mask a pad it sees)."""
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(tokenizer.vocab_size) if i not in special]
    return [rng.choice(pool) for _ in range(n)]


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def expected_hit(engine, earlier: list[list[int]], prompt: list[int]) -> int:
    """The documented reuse: whole cached blocks; a hybrid's hit must also end at a snapshot
    (every `snapshot_interval` tokens, or the last block boundary of an earlier prompt)."""
    best = 0
    for e in earlier:
        full = min(common_prefix(e, prompt), len(prompt) - 1) // BS * BS
        if not engine.cache.uses_slots:
            best = max(best, full)
            continue
        points = set(range(engine.scheduler.snapshot_interval, len(e) + 1, engine.scheduler.snapshot_interval))
        points.add(len(e) // BS * BS)
        best = max([best] + [p for p in points if p <= full])
    return best


def test_shared_system_prompt_with_different_suffixes(make_engine, tokenizer, model_name):
    system = ids(tokenizer, "You are a careful assistant. Tools: search(query), calc(expr), weather(city). " * 2)
    suffixes = ["What is 2+2?", "Tell me a joke about cats, please", "x", "Summarise the tools you have in a list."]
    prompts = [system + ids(tokenizer, s) for s in suffixes]
    assert len({len(p) % BS for p in prompts}) > 1, "prompts should end at different offsets in a block"
    on, off = make_engine(), make_engine(enable_prefix_caching=False)
    for i, p in enumerate(prompts):
        got, ref = on.generate([p], greedy(12))[0], off.generate([p], greedy(12))[0]
        assert got.token_ids == ref.token_ids == hf_greedy(model_name, tuple(p), 12)
        assert got.metrics.cached_tokens == expected_hit(on, prompts[:i], p)
        assert ref.metrics.cached_tokens == 0
    s = on.stats()
    assert s.prefix_cache_queries_total == sum(map(len, prompts))
    assert s.prefix_cache_hits_total >= 3 * (len(system) // on.scheduler.snapshot_interval
                                             * on.scheduler.snapshot_interval)
    assert_clean(on)


@pytest.mark.parametrize("system_len", [37, 53])  # the shared part ends mid-block and mid-Mamba-chunk
def test_multi_turn_conversation_reuses_all_but_one_block(make_engine, tokenizer, model_name, system_len):
    rng = random.Random(system_len)
    conv = random_ids(rng, tokenizer, system_len)
    on, off = make_engine(), make_engine(enable_prefix_caching=False)
    for turn in range(4):
        got, ref = on.generate([conv], greedy(10))[0], off.generate([conv], greedy(10))[0]
        assert got.token_ids == ref.token_ids, f"turn {turn}"
        if turn:
            # the previous turn computed every token of prev prompt + its answer but the last one
            assert got.metrics.cached_tokens >= (prev_len - 1) // BS * BS, f"turn {turn}"
            assert got.metrics.cached_tokens % BS == 0
        prev_len = len(conv) + len(got.token_ids)
        conv = conv + got.token_ids + random_ids(rng, tokenizer, rng.randrange(3, 20))
    assert got.token_ids == hf_greedy(model_name, tuple(conv[:prev_len - len(got.token_ids)]), 10)
    assert_clean(on)


def test_hit_while_the_first_request_still_runs(make_engine, tokenizer):
    system = ids(tokenizer, "Shared instructions for every agent step, long enough for several blocks. " * 2)
    a, b = system + ids(tokenizer, "first question"), system + ids(tokenizer, "second, different question")
    on = make_engine()
    on.add_request("a", a, greedy(30))
    outs = {}
    for _ in range(4):  # a's prompt is done and its blocks published; it is still decoding
        for o in on.step():
            outs[o.request_id] = o
    assert "a" in on.seqs
    on.add_request("b", b, greedy(12))
    while on.has_unfinished():
        for o in on.step():
            outs[o.request_id] = o
    off = make_engine(enable_prefix_caching=False)
    assert outs["b"].metrics.cached_tokens >= 16
    assert outs["b"].token_ids == off.generate([b], greedy(12))[0].token_ids
    assert outs["a"].token_ids == off.generate([a], greedy(30))[0].token_ids
    assert_clean(on)


def _small(make_engine, num_blocks: int, num_snapshots: int = 12, **kw):
    """An engine with `num_blocks` KV blocks and, for a hybrid, `num_snapshots` snapshot slots."""
    lay = make_engine(**kw).cache.layout
    snaps = num_snapshots * lay.bytes_per_slot if lay.bytes_per_slot else 0
    blocks = num_blocks * lay.bytes_per_block
    share = (snaps + 0.5 * lay.bytes_per_slot) / (snaps + blocks) if snaps else 0.0
    gb = (lay.num_slots * lay.bytes_per_slot + snaps + blocks + lay.bytes_per_block / 2) / 2**30
    engine = make_engine(cache_memory_gb=gb, snapshot_memory_share=share, **kw)
    assert engine.cache.layout.num_blocks == num_blocks
    assert engine.cache.layout.num_snapshots == (num_snapshots if lay.bytes_per_slot else 0)
    return engine


def test_eviction_under_pressure_then_a_re_hit(make_engine, tokenizer):
    rng = random.Random(7)
    x = random_ids(rng, tokenizer, 70)
    others = [random_ids(rng, tokenizer, 70) for _ in range(6)]
    on = _small(make_engine, 40)
    off = make_engine(enable_prefix_caching=False)
    first = on.generate([x], greedy(8))[0]
    assert first.metrics.cached_tokens == 0
    for o in others:  # each needs 10 of the 40 blocks: x's cached blocks are evicted
        assert on.generate([o], greedy(8))[0].token_ids == off.generate([o], greedy(8))[0].token_ids
    again = on.generate([x], greedy(8))[0]
    assert again.metrics.cached_tokens == 0, "x should have been evicted"
    third = on.generate([x], greedy(8))[0]
    assert third.metrics.cached_tokens >= 48
    want = off.generate([x], greedy(8))[0].token_ids
    assert first.token_ids == again.token_ids == third.token_ids == want
    assert_clean(on)


def test_preemption_of_sequences_holding_shared_blocks(make_engine, tokenizer):
    rng = random.Random(3)
    system = random_ids(rng, tokenizer, 64)
    prompts = [system + random_ids(rng, tokenizer, 8) for _ in range(4)]
    on = _small(make_engine, 30)
    on.generate([prompts[0]], greedy(2))  # publish the shared blocks first
    outs = on.generate(prompts, greedy(40))  # 8 shared + 4 x 6 own blocks do not fit in 30
    assert on.stats().num_preemptions_total > 0
    off = make_engine(enable_prefix_caching=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in off.generate(prompts, greedy(40))]
    assert all(o.metrics.cached_tokens >= 56 for o in outs)
    assert_clean(on)


def test_abort_releases_shared_blocks(make_engine, tokenizer):
    system = ids(tokenizer, "A long shared system prompt that both requests start with, then differ. " * 2)
    a, b = system + ids(tokenizer, "alpha"), system + ids(tokenizer, "beta gamma")
    on = make_engine()
    on.generate([a], greedy(2))
    on.add_request("a", a, greedy(50))
    on.add_request("b", b, greedy(12))
    for _ in range(3):
        on.step()
    held = [blk for blk in on.seqs["a"].block_ids if blk in on.seqs["b"].block_ids]
    assert held, "a and b should share cached blocks"
    assert all(on.cache.blocks.ref_count[blk] == 2 for blk in held)
    on.abort_request("a")
    assert all(on.cache.blocks.ref_count[blk] == 1 for blk in held)
    outs = {}
    while on.has_unfinished():
        for o in on.step():
            outs[o.request_id] = o
    off = make_engine(enable_prefix_caching=False)
    assert outs["b"].token_ids == off.generate([b], greedy(12))[0].token_ids
    assert_clean(on)


def test_a_few_hundred_mixed_requests_leak_nothing(make_engine, tokenizer):
    """Shared prefixes, several salts, aborts, preemption: outputs match caching off; all references return."""
    rng = random.Random(11)
    systems = [random_ids(rng, tokenizer, rng.randrange(20, 60)) for _ in range(3)]
    on = _small(make_engine, 36, max_num_seqs=6, max_num_batched_tokens=64)
    off = make_engine(enable_prefix_caching=False, max_num_batched_tokens=256)
    pending = []
    for i in range(240):
        prompt = rng.choice(systems) + random_ids(rng, tokenizer, rng.randrange(1, 30))
        salt = rng.choice([None, None, "tenant-b"])
        pending.append((f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0.0,
                                                         ignore_eos=True, cache_salt=salt)))
    done, aborted, step = {}, set(), 0
    queue = list(pending)
    while queue or on.has_unfinished():
        for _ in range(rng.randrange(0, 5)):
            if queue:
                rid, p, sp = queue.pop(0)
                on.add_request(rid, p, sp)
        if on.seqs and rng.random() < 0.05:
            victim = rng.choice(sorted(on.seqs))
            on.abort_request(victim)
            aborted.add(victim)
        for o in on.step():
            if o.finished:
                done[o.request_id] = o
        step += 1
    assert len(done) + len(aborted) == len(pending)
    assert on.stats().num_preemptions_total > 0
    assert on.stats().prefix_cache_hits_total > 0
    finished = [(rid, p, sp) for rid, p, sp in pending if rid in done]
    refs = off.generate([p for _, p, _ in finished], [sp for _, _, sp in finished])
    assert [done[rid].token_ids for rid, _, _ in finished] == [r.token_ids for r in refs]
    assert_clean(on)


def test_salts_keep_prefixes_apart(make_engine, tokenizer):
    prompt = ids(tokenizer, "the same long prompt sent by two tenants who must not share a cache " * 2)
    on = make_engine()
    salted = lambda s: SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, cache_salt=s)
    assert on.generate([prompt], salted("a"))[0].metrics.cached_tokens == 0
    assert on.generate([prompt], salted("b"))[0].metrics.cached_tokens == 0
    assert on.generate([prompt], salted(None))[0].metrics.cached_tokens == 0
    assert on.generate([prompt], salted("a"))[0].metrics.cached_tokens > 0


def test_caching_off_keeps_nothing(make_engine, tokenizer):
    prompt = ids(tokenizer, "caching is off for this engine, so nothing is kept " * 2)
    off = make_engine(enable_prefix_caching=False)
    off.generate([prompt], greedy(4))
    assert off.generate([prompt], greedy(4))[0].metrics.cached_tokens == 0
    s = off.stats()
    assert s.num_cached_blocks == s.num_cached_snapshots == s.prefix_cache_queries_total == 0
