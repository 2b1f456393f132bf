"""The prefix cache's pools on their own: reference counts, LRU eviction, snapshot naming."""
import pytest

from hybridserve.engine.block_pool import BlockPool, block_hashes
from hybridserve.engine.state_pool import StatePool


def test_block_hashes_chain_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2, b"salt", [])
    b = block_hashes([9, 2, 3, 4, 5, 6], 2, b"salt", [])
    assert len(a) == 3 and len(b) == 3  # full blocks only
    assert a[1] != b[1] and a[2] != b[2], "equal blocks after different prefixes must differ"
    assert block_hashes([1, 2], 2, b"other", [])[0] != a[0], "the salt names the cache"
    known = a[:1]
    assert block_hashes([1, 2, 3, 4, 5, 6], 2, b"salt", known) == a and known is not a


def test_freed_blocks_stay_findable_until_reused_least_recent_first():
    pool = BlockPool(4)
    x, y = pool.allocate(2), pool.allocate(2)
    for i, b in enumerate(x + y):
        pool.commit(b, bytes([i]))
    pool.release(x)
    pool.release(y)
    assert pool.num_free == 4 and pool.num_cached == 4
    assert pool.cached(bytes([0])) == x[0]
    pool.share([x[0]])  # a hit takes it out of the free queue
    assert pool.num_free == 3 and pool.ref_count[x[0]] == 1
    fresh = pool.allocate(1)  # x's tail was freed first, so it goes first
    assert fresh == [x[1]] and pool.cached(bytes([1])) is None and pool.cached(bytes([2])) == y[0]
    with pytest.raises(RuntimeError):
        pool.allocate(3)


def test_a_duplicate_block_keeps_the_first_name_and_double_release_is_caught():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.commit(a, b"h")
    pool.commit(b, b"h")
    assert pool.cached(b"h") == a and pool.hash_of[b] is None
    pool.release([a, b])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([a])


def test_snapshots_are_recycled_least_recently_used():
    states = StatePool(num_seats=2, num_snapshots=2)
    s1, s2 = states.claim(), states.claim()
    assert {s1, s2} == {2, 3}, "snapshot rows follow the seats"
    states.name(s1, b"one")
    states.name(s2, b"two")
    assert states.lookup(b"one") == s1  # now the most recently used
    s3 = states.claim()
    assert s3 == s2 and states.lookup(b"two") is None and states.lookup(b"one") == s1
    states.name(s3, b"one")  # an equal snapshot exists: this slot stays unnamed and goes first
    assert states.lookup(b"one") == s1 and states.claim() == s3
    assert StatePool(1, 0).claim() is None
    seat = states.allocate_seat()
    states.free_seat(seat)
    with pytest.raises(RuntimeError):
        states.free_seat(seat)


def test_seats_are_handed_out_lowest_first():
    """So the running sequences keep seats 0..n-1: one run of rows the CPU decode updates in place."""
    states = StatePool(num_seats=4, num_snapshots=0)
    assert [states.allocate_seat() for _ in range(3)] == [0, 1, 2]
    states.free_seat(1)
    states.free_seat(0)
    assert states.allocate_seat() == 0 and states.allocate_seat() == 1 and states.allocate_seat() == 3
