"""Gateway replicas sharing one batch store: each batch runs on the replica holding its lease,
a stalled replica's batch is taken over and finished once, a cancel made on another replica
stops the runner, and a cancel landing while the last lines finish ends the batch cancelled.

Every scenario runs on both stores: the SQLite batch database (each "replica" a BatchRunner
with its own connection to one file, as gateway processes on one host or one volume have) and
Redis (each replica its own client, as replicas sharing `state_url` have; a real
redis-server). The execute function stands in for the gateway's request path and counts what
it was asked to run."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import pytest

from hybridserve.gateway.batch_db import BatchDb
from hybridserve.gateway.batch_redis import redis_stores
from hybridserve.gateway.batch_runner import Answer, BatchRunner
from hybridserve.gateway.batches import BatchRequest, BatchStore
from hybridserve.gateway.files import FileStore

pytestmark = pytest.mark.timeout(60)
OWNER = "tenant-a"


@pytest.fixture(params=["sqlite", "redis"])
def shared(request, tmp_path):
    """(kind, where): the store the replicas share."""
    if request.param == "sqlite":
        return "sqlite", tmp_path
    return "redis", (request.getfixturevalue("redis_url"), f"t{uuid.uuid4().hex[:8]}")


class Replica:
    """One gateway's batch machinery over the shared store."""

    def __init__(self, shared: tuple, name: str, lease_s: float, delay_s: float = 0.02):
        kind, where = shared
        if kind == "sqlite":
            self.db = BatchDb(where / "batches.sqlite")
            self.store, self.files, self.close = BatchStore(self.db), FileStore(self.db, where / "files"), self.db.close
        else:
            self.files, self.store, r = redis_stores(where[0], where[1], "test redis")
            self.close = r.close
        self.ran: Counter = Counter()          # custom_id -> times this replica ran it
        self.delay_s = delay_s
        self.hang = asyncio.Event()            # cleared: lines block (a stalled process)
        self.hang.set()
        self.runner = BatchRunner(self.store, self.files, self.execute, concurrency=2, holder=name,
                                  lease_s=lease_s)

    async def execute(self, endpoint, raw, key_id, owner, rid) -> Answer:
        cid = json.loads(raw)["messages"][0]["content"]
        await self.hang.wait()
        await asyncio.sleep(self.delay_s)
        self.ran[cid] += 1
        return Answer(200, {"id": rid, "object": "chat.completion", "choices": [],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def create(self, n: int) -> tuple[str, list[str]]:
        ids = [f"c{i}" for i in range(n)]
        text = "".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "m", "messages": [{"role": "user", "content": c}]}}) + "\n"
                       for c in ids)
        f = self.files.add(OWNER, "in.jsonl", "batch", text.encode(), n)
        return self.store.create(OWNER, None, BatchRequest(f.id, "/v1/chat/completions", "24h", 86400, None)), ids



def output_ids(replica: Replica, row: dict) -> list[str]:
    f = replica.files.get(row["output_file_id"], OWNER)
    return [json.loads(line)["custom_id"] for line in replica.files.read(f).decode().splitlines()]


async def wait_for(cond, timeout_s: float, what: str) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_replicas_run_each_batch_once(shared):
    async def main():
        a, b = Replica(shared, "a", lease_s=3), Replica(shared, "b", lease_s=3)
        batch, ids = a.create(12)
        assert b.runner.resume() + a.runner.resume() >= 1
        await wait_for(lambda: a.store.status(batch) == "completed", 30, "the batch to complete")
        await asyncio.gather(a.runner.stop(), b.runner.stop())
        ran = a.ran + b.ran
        assert sorted(ran) == sorted(ids) and set(ran.values()) == {1}, ran
        assert not (a.ran and b.ran), "one replica runs a batch, not both"
        assert sorted(output_ids(a, a.store.get(batch))) == sorted(ids)
        assert b.store.lease(batch, "someone-else", 3), "a finished batch gives its lease up"
        a.close(), b.close()
    asyncio.run(main())


def test_a_stalled_replicas_batch_is_taken_over_and_finished_once(shared):
    async def main():
        a, b = Replica(shared, "a", lease_s=0.6), Replica(shared, "b", lease_s=0.6)
        batch, ids = a.create(16)
        a.runner.resume()
        await wait_for(lambda: sum(a.ran.values()) >= 4, 10, "replica a to run four lines")
        a.hang.clear()                        # a stalls: its lines block and its watcher stops renewing
        a.runner.watcher.cancel()
        assert b.runner.resume() == 0, "a live lease is not taken"
        await wait_for(lambda: b.store.status(batch) == "completed", 20, "replica b to finish the batch")
        done_by_a = set(a.ran)
        assert done_by_a and not done_by_a & set(b.ran), "a line a had recorded ran again on b"
        assert sorted(output_ids(b, b.store.get(batch))) == sorted(ids)
        a.hang.set()                          # a wakes up: its late lines are not recorded twice
        await asyncio.sleep(0.3)
        await asyncio.gather(a.runner.stop(), b.runner.stop())
        row = b.store.get(batch)
        assert row["status"] == "completed", "the stale replica must not rewrite a finished batch"
        assert sorted(output_ids(b, row)) == sorted(ids)
        assert set((b.ran).values()) == {1}
        a.close(), b.close()
    asyncio.run(main())


def test_a_cancel_on_another_replica_stops_the_runner(shared):
    async def main():
        a, b = Replica(shared, "a", lease_s=0.6, delay_s=0.1), Replica(shared, "b", lease_s=0.6)
        batch, ids = a.create(40)
        a.runner.resume()
        await wait_for(lambda: sum(a.ran.values()) >= 2, 10, "two lines run")
        assert b.store.cancel(batch, OWNER)["status"] == "cancelling"    # the API on replica b
        await wait_for(lambda: a.store.status(batch) == "cancelled", 10, "the batch to end cancelled")
        await a.runner.stop()
        row = a.store.get(batch)
        counts = a.store.as_openai(row)["request_counts"]
        assert counts["completed"] == sum(a.ran.values()) < len(ids)
        assert counts["failed"] == len(ids) - counts["completed"]
        a.close(), b.close()
    asyncio.run(main())


def test_a_cancel_landing_while_the_last_lines_finish_ends_the_batch_cancelled(shared):
    async def main():
        a = Replica(shared, "a", lease_s=3)
        close = a.store.close_pending

        def close_then_cancel(batch_id, out):
            n = close(batch_id, out)
            a.store.cancel(batch_id, OWNER)        # the client's cancel arrives just now
            return n
        a.store.close_pending = close_then_cancel
        batch, ids = a.create(3)
        a.runner.resume()
        await wait_for(lambda: a.store.status(batch) in ("completed", "cancelled"), 10, "the batch to end")
        await a.runner.stop()
        row = a.store.get(batch)
        assert row["status"] == "cancelled", "the client was told cancelling; the batch must not complete"
        assert sorted(output_ids(a, row)) == sorted(ids), "lines that ran keep their results"
        a.close()
    asyncio.run(main())
