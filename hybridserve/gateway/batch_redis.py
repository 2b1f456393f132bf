"""The Batch API's files, batches and lines in Redis, for gateway replicas that share `state_url`.

Replicas behind a load balancer that share only Redis (each with its own disk) must see the
same files and batches: a batch created through one replica is read, cancelled and
downloaded through any other, and runs on exactly one. With `gateway.state_url` set, the
gateway keeps the Batch API here instead of in the SQLite batch database; `RedisBatchStore`
and `RedisFileStore` keep `batches.BatchStore`'s and `files.FileStore`'s contracts, and the
runner's lease (batch_runner) is a key with a time to live.

Keys, under `gateway.state_prefix` (`{p}`):

    {p}:file:{id}            hash: the file's metadata      {p}:file:{id}:data   its bytes
    {p}:files:{owner}        zset of the tenant's file ids by creation order
    {p}:batch:{id}           hash: the batch row (the SQLite columns; absent fields are NULL)
    {p}:batches:{owner}      zset of the tenant's batch ids by creation order
    {p}:batches:active       set of unfinished batch ids
    {p}:batch:{id}:lines     hash line number -> {"custom_id", "body"}
    {p}:batch:{id}:pending   zset of the line numbers without a result (score: the number)
    {p}:batch:{id}:results   hash line number -> the line's result
    {p}:batch:{id}:totals    hash "<state>:<figure>" -> running sums of the results
    {p}:batch:{id}:lease     the holder running the batch (expires: LEASE)

Every compare-and-set (record a line once, close what is pending, move a status unless a
cancel came first, take a lease) is one Lua script, so replicas never interleave inside one.
Calls are synchronous with a socket timeout, like the SQLite store's disk writes; a Redis
that does not answer is a 503 `state_unavailable` (StateUnavailableError).
"""
from __future__ import annotations

import json
import time
import uuid
from functools import wraps
from typing import Any, Iterator

import redis

from hybridserve.errors import StateUnavailableError
from hybridserve.gateway.batches import (ACTIVE, BatchNotCancellable, BatchRequest, Line, LineResult,
                                         batch_object)
from hybridserve.gateway.files import _ID_OK, CONTENT_CHUNK, StoredFile

SOCKET_TIMEOUT_S = 10.0       # one command; storing 50,000 lines is one command
_FLOATS = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
           "expired_at", "cancelling_at", "cancelled_at")
_COLUMNS = ("id", "owner", "key_id", "endpoint", "input_file_id", "completion_window", "status", *_FLOATS,
            "output_file_id", "error_file_id", "errors", "metadata", "total", "seq")
_FIGURES = ("n", "usd", "prompt", "completion", "cached", "tokens", "device_s")

# KEYS: pending, results, totals. ARGV: line, result, state, usd, prompt, completion, cached, tokens, device_s.
_RECORD = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local s = ARGV[3]
redis.call('HINCRBY', KEYS[3], s .. ':n', 1)
redis.call('HINCRBYFLOAT', KEYS[3], s .. ':usd', ARGV[4])
redis.call('HINCRBY', KEYS[3], s .. ':prompt', ARGV[5])
redis.call('HINCRBY', KEYS[3], s .. ':completion', ARGV[6])
redis.call('HINCRBY', KEYS[3], s .. ':cached', ARGV[7])
redis.call('HINCRBY', KEYS[3], s .. ':tokens', ARGV[8])
redis.call('HINCRBYFLOAT', KEYS[3], s .. ':device_s', ARGV[9])
return 1
"""
# KEYS: pending, results, totals. ARGV: the result every pending line gets.
_CLOSE = """
local left = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, no in ipairs(left) do redis.call('HSET', KEYS[2], no, ARGV[1]) end
redis.call('DEL', KEYS[1])
if #left > 0 then redis.call('HINCRBY', KEYS[3], 'failed:n', #left) end
return #left
"""
# KEYS: batch. ARGV: before, status, stamp field, now.
_ADVANCE = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4])
return 1
"""
# KEYS: batch, active set. ARGV: owner, now, batch id. Returns the status before ('' = no such batch).
_CANCEL = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return '' end
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'validating' or s == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[2])
end
return s
"""
# KEYS: batch. ARGV: now, total. In progress unless a cancel came during validation.
_START = """
if redis.call('HGET', KEYS[1], 'status') ~= 'cancelling' then redis.call('HSET', KEYS[1], 'status', 'in_progress') end
redis.call('HSET', KEYS[1], 'in_progress_at', ARGV[1], 'total', ARGV[2])
return 1
"""
# KEYS: lease. ARGV: holder, ttl ms.
_LEASE = """
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


def _answering(method):
    """Redis errors as the 503 every Redis-backed store gives (budgets fail closed likewise)."""
    @wraps(method)
    def call(self, *args, **kw):
        try:
            return method(self, *args, **kw)
        except redis.RedisError as err:
            raise StateUnavailableError(f"the batch store at {self.where} did not answer ({type(err).__name__}); "
                                        "retry shortly") from None
    return call


class _RedisStore:
    def __init__(self, r: redis.Redis, prefix: str, where: str, clock=time.time):
        self.r, self.p, self.where, self.clock = r, prefix, where, clock

    def _hgetall_all(self, keys: list[str]) -> list[dict]:
        """HGETALL of each key, in one round trip (a page of a listing)."""
        with self.r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            return pipe.execute()

    def _owned_page(self, zkey: str, after: str | None, limit: int, desc: bool = True) -> list[str]:
        """Up to `limit` ids of a creation-ordered zset after the id `after` (none when `after`
        is not in it)."""
        if after is None:
            return (self.r.zrevrange if desc else self.r.zrange)(zkey, 0, limit - 1)
        score = self.r.zscore(zkey, after)
        if score is None:
            return []
        if desc:
            return self.r.zrevrangebyscore(zkey, f"({score}", "-inf", start=0, num=limit)
        return self.r.zrangebyscore(zkey, f"({score}", "+inf", start=0, num=limit)


def _text(v: Any) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class RedisBatchStore(_RedisStore):
    """Batch rows and their lines in Redis (the contract of batches.BatchStore)."""

    def __init__(self, r: redis.Redis, prefix: str, where: str, clock=time.time):
        super().__init__(r, prefix, where, clock)
        self._record, self._close = r.register_script(_RECORD), r.register_script(_CLOSE)
        self._advance, self._cancel = r.register_script(_ADVANCE), r.register_script(_CANCEL)
        self._start, self._lease = r.register_script(_START), r.register_script(_LEASE)
        self._release = r.register_script(_RELEASE)

    def _k(self, batch_id: str, part: str = "") -> str:
        return f"{self.p}:batch:{batch_id}" + (f":{part}" if part else "")

    @_answering
    def create(self, owner: str, key_id: str | None, req: BatchRequest) -> str:
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = self.clock()
        seq = self.r.incr(f"{self.p}:batch-seq")
        row = {"id": batch_id, "owner": owner, "key_id": key_id, "endpoint": req.endpoint,
               "input_file_id": req.input_file_id, "completion_window": req.completion_window,
               "status": "validating", "created_at": now, "expires_at": now + req.window_s, "total": 0, "seq": seq,
               "metadata": json.dumps(req.metadata) if req.metadata is not None else None}
        with self.r.pipeline() as pipe:
            pipe.hset(self._k(batch_id), mapping={k: v for k, v in row.items() if v is not None})
            pipe.zadd(f"{self.p}:batches:{owner}", {batch_id: seq})
            pipe.sadd(f"{self.p}:batches:active", batch_id)
            pipe.execute()
        return batch_id

    def _row(self, raw: dict) -> dict | None:
        if not raw:
            return None
        got = {_text(k): _text(v) for k, v in raw.items()}
        row: dict[str, Any] = {c: got.get(c) for c in _COLUMNS}
        for c in _FLOATS:
            row[c] = float(row[c]) if row[c] is not None else None
        row["total"], row["seq"] = int(row["total"] or 0), int(row["seq"] or 0)
        return row

    @_answering
    def get(self, batch_id: str, owner: str | None = None) -> dict | None:
        row = self._row(self.r.hgetall(self._k(batch_id)))
        return row if row is not None and (owner is None or row["owner"] == owner) else None

    @_answering
    def list(self, owner: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        ids = self._owned_page(f"{self.p}:batches:{owner}", after, limit + 1)
        raw = self._hgetall_all([self._k(_text(i)) for i in ids])
        rows = [r for r in map(self._row, raw) if r is not None and r["owner"] == owner]
        return rows[:limit], len(rows) > limit

    @_answering
    def claimable(self, holder: str) -> list[str]:
        ids = sorted(_text(i) for i in self.r.smembers(f"{self.p}:batches:active"))
        with self.r.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.get(self._k(batch_id, "lease"))
                pipe.hget(self._k(batch_id), "seq")
            got = pipe.execute()
        free = [(int(seq or 0), b) for b, lease, seq in zip(ids, got[::2], got[1::2])
                if lease is None or _text(lease) == holder]
        return [b for _, b in sorted(free)]

    @_answering
    def lease(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        return self._lease(keys=[self._k(batch_id, "lease")], args=[holder, max(1, int(ttl_s * 1000))]) == 1

    @_answering
    def release(self, batch_id: str, holder: str) -> None:
        self._release(keys=[self._k(batch_id, "lease")], args=[holder])

    @_answering
    def status(self, batch_id: str) -> str | None:
        return _text(self.r.hget(self._k(batch_id), "status"))

    @_answering
    def advance(self, batch_id: str, before: str, status: str, stamp: str) -> bool:
        return self._advance(keys=[self._k(batch_id)], args=[before, status, stamp, self.clock()]) == 1

    @_answering
    def set_status(self, batch_id: str, status: str, stamp: str | None = None, **fields: Any) -> None:
        sets = {"status": status, **fields, **({stamp: self.clock()} if stamp else {})}
        with self.r.pipeline() as pipe:
            pipe.hset(self._k(batch_id), mapping={k: v for k, v in sets.items() if v is not None})
            gone = [k for k, v in sets.items() if v is None]
            if gone:
                pipe.hdel(self._k(batch_id), *gone)
            active = f"{self.p}:batches:active"
            pipe.sadd(active, batch_id) if status in ACTIVE else pipe.srem(active, batch_id)
            pipe.execute()

    def fail(self, batch_id: str, errors: list[dict]) -> None:
        self.set_status(batch_id, "failed", "failed_at", errors=json.dumps({"object": "list", "data": errors}))

    @_answering
    def start(self, batch_id: str, lines: list[Line]) -> None:
        with self.r.pipeline() as pipe:
            pipe.delete(*(self._k(batch_id, part) for part in ("lines", "pending", "results", "totals")))
            if lines:
                pipe.hset(self._k(batch_id, "lines"), mapping={
                    x.no: json.dumps({"custom_id": x.custom_id, "body": x.body}) for x in lines})
                pipe.zadd(self._k(batch_id, "pending"), {str(x.no): x.no for x in lines})
            self._start(keys=[self._k(batch_id)], args=[self.clock(), len(lines)], client=pipe)
            pipe.execute()

    @_answering
    def cancel(self, batch_id: str, owner: str) -> dict | None:
        before = _text(self._cancel(keys=[self._k(batch_id), f"{self.p}:batches:active"],
                                    args=[owner, self.clock(), batch_id]))
        if not before:
            return None
        if before in ("completed", "failed", "expired", "finalizing"):
            raise BatchNotCancellable(f"batch {batch_id} is {before}: only a validating or in-progress "
                                      "batch can be cancelled")
        return self.get(batch_id, owner)

    @_answering
    def pending(self, batch_id: str, after: int, limit: int) -> list[Line]:
        nos = [int(n) for n in self.r.zrangebyscore(self._k(batch_id, "pending"), f"({after}", "+inf",
                                                    start=0, num=limit)]
        if not nos:
            return []
        raw = self.r.hmget(self._k(batch_id, "lines"), nos)
        return [Line(no, (d := json.loads(v))["custom_id"], d["body"]) for no, v in zip(nos, raw) if v is not None]

    @_answering
    def record(self, batch_id: str, no: int, out: LineResult) -> bool:
        usd, prompt, completion, cached, tokens, device_s = out.counts()
        result = json.dumps({"state": "ok" if out.ok else "failed", "status_code": out.status_code,
                             "request_id": out.request_id,
                             "response": json.dumps(out.body, separators=(",", ":")) if out.body is not None else None,
                             "error": json.dumps(out.error) if out.error is not None else None})
        return self._record(keys=[self._k(batch_id, "pending"), self._k(batch_id, "results"),
                                  self._k(batch_id, "totals")],
                            args=[no, result, "ok" if out.ok else "failed", repr(float(usd)), int(prompt),
                                  int(completion), int(cached), int(tokens), repr(float(device_s))]) == 1

    @_answering
    def close_pending(self, batch_id: str, out: LineResult) -> int:
        result = json.dumps({"state": "failed", "status_code": None, "request_id": None, "response": None,
                             "error": json.dumps(out.error)})
        return int(self._close(keys=[self._k(batch_id, "pending"), self._k(batch_id, "results"),
                                     self._k(batch_id, "totals")], args=[result]))

    @_answering
    def results(self, batch_id: str, ok: bool) -> list[dict]:
        want = "ok" if ok else "failed"
        got = {int(k): json.loads(v) for k, v in self.r.hgetall(self._k(batch_id, "results")).items()}
        nos = sorted(n for n, v in got.items() if v["state"] == want)
        if not nos:
            return []
        cids = self.r.hmget(self._k(batch_id, "lines"), nos)
        return [{"line": n, "custom_id": json.loads(c)["custom_id"] if c else None,
                 **{k: got[n][k] for k in ("status_code", "request_id", "response", "error")}}
                for n, c in zip(nos, cids)]

    @_answering
    def as_openai(self, row: dict) -> dict:
        raw = {_text(k): float(v) for k, v in self.r.hgetall(self._k(row["id"], "totals")).items()}
        by_state = {s: tuple(raw.get(f"{s}:{f}", 0) for f in _FIGURES) for s in ("ok", "failed")}
        by_state = {s: (int(v[0]), v[1], *map(int, v[2:6]), v[6]) for s, v in by_state.items()}
        return batch_object(row, by_state)


class RedisFileStore(_RedisStore):
    """Files' metadata and bytes in Redis (the contract of files.FileStore)."""

    def _k(self, file_id: str, part: str = "") -> str:
        return f"{self.p}:file:{file_id}" + (f":{part}" if part else "")

    @_answering
    def add(self, owner: str, filename: str, purpose: str, content: bytes, lines: int,
            file_id: str | None = None) -> StoredFile:
        """The bytes and the metadata together; a replaced id keeps its place in the listing."""
        f = StoredFile(file_id or f"file-{uuid.uuid4().hex[:24]}", owner, filename, purpose, len(content),
                       lines, self.clock())
        seq = self.r.incr(f"{self.p}:file-seq")
        with self.r.pipeline() as pipe:
            pipe.set(self._k(f.id, "data"), content)
            pipe.hset(self._k(f.id), mapping={"id": f.id, "owner": owner, "filename": filename, "purpose": purpose,
                                               "bytes": f.bytes, "lines": lines, "created_at": f.created_at})
            pipe.zadd(f"{self.p}:files:{owner}", {f.id: seq}, nx=True)
            pipe.execute()
        return f

    @_answering
    def get(self, file_id: str, owner: str) -> StoredFile | None:
        if not _ID_OK.match(file_id):
            return None
        return self._file(self.r.hgetall(self._k(file_id)), owner)

    @staticmethod
    def _file(raw: dict, owner: str) -> StoredFile | None:
        got = {_text(k): _text(v) for k, v in raw.items()}
        if not got or got["owner"] != owner:
            return None
        return StoredFile(got["id"], got["owner"], got["filename"], got["purpose"], int(got["bytes"]),
                          int(got["lines"]), float(got["created_at"]))

    @_answering
    def list(self, owner: str, after: str | None, limit: int, order: str,
             purpose: str | None) -> tuple[list[StoredFile], bool]:
        out: list[StoredFile] = []
        cursor = after
        while len(out) <= limit:
            ids = self._owned_page(f"{self.p}:files:{owner}", cursor, limit + 1, desc=order != "asc")
            if not ids:
                break
            for raw in self._hgetall_all([self._k(_text(i)) for i in ids]):
                f = self._file(raw, owner)
                if f is not None and (purpose is None or f.purpose == purpose):
                    out.append(f)
            cursor = _text(ids[-1])
        return out[:limit], len(out) > limit

    @_answering
    def read(self, f: StoredFile) -> bytes:
        data = self.r.get(self._k(f.id, "data"))
        if data is None:
            raise FileNotFoundError(f.id)
        return data

    @_answering
    def content(self, f: StoredFile, chunk: int = CONTENT_CHUNK) -> Iterator[bytes] | None:
        key = self._k(f.id, "data")
        size = self.r.strlen(key)
        if not self.r.exists(key):
            return None

        def chunks() -> Iterator[bytes]:
            for start in range(0, size, chunk):
                yield self.r.getrange(key, start, min(size, start + chunk) - 1)
        return chunks()

    @_answering
    def delete(self, file_id: str, owner: str) -> bool:
        if self.get(file_id, owner) is None:
            return False
        with self.r.pipeline() as pipe:
            pipe.delete(self._k(file_id), self._k(file_id, "data"))
            pipe.zrem(f"{self.p}:files:{owner}", file_id)
            pipe.execute()
        return True


def redis_stores(url: str, prefix: str, where: str, clock=time.time) -> tuple[RedisFileStore, RedisBatchStore,
                                                                               redis.Redis]:
    """The files and batches stores on one client (closed by the caller at shutdown)."""
    r = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S)
    return RedisFileStore(r, prefix, where, clock), RedisBatchStore(r, prefix, where, clock), r
