"""Priority classes and the bounded queue: batch work runs on what interactive work leaves, yields
seats and memory to it, still finishes with the same tokens, and a full queue is a 429 with Retry-After."""
import pytest

from hybridserve.engine import SamplingParams
from hybridserve.errors import InvalidRequestError, OverloadedError

P = [list(range(10, 10 + n)) for n in (20, 30, 25, 15, 35)]


def params(n=12, priority="interactive"):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, priority=priority)


def run(engine, limit=10_000):
    done = {}
    for _ in range(limit):
        if not engine.has_unfinished():
            return done
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    raise AssertionError("the engine did not finish")


def test_interactive_work_is_admitted_before_waiting_batch_work(make_engine):
    engine = make_engine(max_num_seqs=2)
    for i in range(3):
        engine.add_request(f"b{i}", P[i], params(priority="batch"))
    engine.add_request("i0", P[3], params())
    first = {s.request_id for s, _ in engine.scheduler.schedule().entries}
    assert "i0" in first and len(first) == 2


def test_batch_yields_seats_to_interactive_work_and_still_finishes_the_same(make_engine):
    engine = make_engine(max_num_seqs=2)
    engine.add_request("b0", P[0], params(40, "batch"))
    engine.add_request("b1", P[1], params(40, "batch"))
    for _ in range(3):
        engine.step()
    assert {s.request_id for s in engine.scheduler.running} == {"b0", "b1"}
    engine.add_request("i0", P[2], params(8))
    engine.step()
    running = {s.request_id for s in engine.scheduler.running}
    assert "i0" in running and len(running) == 2, "a batch sequence should have given up its seat"
    assert engine.stats().num_preemptions_total == 1
    done = run(engine)
    ref = make_engine(max_num_seqs=8).generate([P[0], P[1], P[2]], [params(40), params(40), params(8)])
    assert [done[r].token_ids for r in ("b0", "b1", "i0")] == [r.token_ids for r in ref]
    assert done["i0"].metrics.finish_time < min(done["b0"].metrics.finish_time, done["b1"].metrics.finish_time)


def test_memory_pressure_preempts_batch_before_interactive(make_engine):
    lay = make_engine().cache.layout
    gb = (lay.num_slots * lay.bytes_per_slot + 13 * lay.bytes_per_block + 1) / 2**30
    engine = make_engine(cache_memory_gb=gb, snapshot_memory_share=0.0, enable_prefix_caching=False)
    assert engine.cache.layout.num_blocks == 13  # 104 tokens; the three requests need 3 x 6 blocks
    engine.add_request("b0", P[4], params(13, "batch"))
    engine.step()  # the batch request is the oldest running one: newest-first alone would spare it
    engine.add_request("i0", P[0], params(28))
    engine.add_request("i1", P[1], params(18))
    done, preempted = {}, []
    while engine.has_unfinished():
        sched_before = {s.request_id for s in engine.scheduler.running}
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        after = {s.request_id for s in engine.scheduler.running} | set(done)
        preempted += sorted(sched_before - after)
    assert preempted and set(preempted) == {"b0"}, f"only the batch request may be preempted, got {preempted}"
    ref = make_engine().generate([P[0], P[4], P[1]], [params(28), params(13), params(18)])
    assert [done[r].token_ids for r in ("i0", "b0", "i1")] == [r.token_ids for r in ref]


def test_batch_alone_runs_at_full_width(make_engine):
    engine = make_engine(max_num_seqs=4)
    for i in range(4):
        engine.add_request(f"b{i}", P[i], params(6, "batch"))
    assert len(engine.scheduler.schedule().entries) == 4


def test_a_full_queue_is_a_429_with_retry_after(make_engine):
    engine = make_engine(max_num_seqs=1, max_num_waiting=2)
    for i in range(2):
        engine.add_request(f"r{i}", P[i], params())
    with pytest.raises(OverloadedError) as err:
        engine.add_request("r2", P[2], params())
    assert err.value.status_code == 429 and err.value.code == "queue_full"
    assert int(err.value.headers()["Retry-After"]) >= 1
    assert engine.stats().requests_shed_total == 1 and "r2" not in engine.seqs
    run(engine)
    engine.add_request("r3", P[3], params())  # room again
    assert set(run(engine)) == {"r3"}


def test_an_unknown_priority_is_a_400(make_engine):
    with pytest.raises(InvalidRequestError) as err:
        make_engine().add_request("x", P[0], params(priority="urgent"))
    assert err.value.param == "hybridserve_priority"
