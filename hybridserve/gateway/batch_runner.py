"""Run batches: validate the input, send every line through the gateway, write the result files.

One task per active batch (`launch`); at startup `resume` relaunches every batch the store
holds as validating, in progress, finalizing or cancelling, so a restart picks up where the
last process stopped. The phases: validate (the input file's lines, in a worker thread, then
stored with the move to in_progress in one transaction), execute, finalize.

Execute sends each pending line through `execute` (the gateway's own request path,
in-process: admission, routing, budgets, proxy; see gateway.app) as the key that created the
batch, with `"hybridserve_priority": "batch"` in the body and `model` defaulting to
`auto:cheapest`. At most `concurrency` lines are in flight over all batches together. A
line's result is recorded the moment it ends and only then counts as done, so a line that
finished never runs again; one in flight when the process died runs again after the
restart (it may have been answered once, unrecorded). A line refused as transient (429
other than a spent budget, 503) is tried again after its Retry-After (else 1, 2, 4, ... s)
while the window allows, at most MAX_ATTEMPTS times; its last answer is its result. A
refusal for a spent budget is final: its 429 body is the line's error line.

Cancel and expiry stop new lines from starting; lines in flight finish (they are paid for).
So does a shutdown (`stop`): no new line starts, those in flight get DRAIN_S seconds to end
and be recorded, and the batch stays unfinished in the store for the next process.
Finalize gives every line still pending its error (batch_cancelled or batch_expired), writes
the output and error files under ids derived from the batch id (a second finalize after a
crash rewrites the same files) and sets the final status. A cancel that lands while the last
lines finish wins: the batch ends cancelled, never completed after the client heard
"cancelling".

Replicas sharing the store: a batch runs only where its lease is held (`holder`, renewed
every few seconds for LEASE_S). A watcher task renews this runner's leases, passes a cancel
made on another replica to the local task, and claims batches whose lease is free or has run
out (a replica that died), so every batch finishes somewhere. A stopped runner gives its
leases up at once; one that died is replaced after LEASE_S. The gateway names its holder by
host and port, so a gateway restarted in place takes its own batches back at once. A runner
that loses a lease (stalled past LEASE_S) starts no more lines and leaves the batch to the
new holder; a line that was in flight then may run twice, but is recorded once.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

from hybridserve.errors import StateUnavailableError, internal_error_body
from hybridserve.gateway.batches import (ACTIVE, DEFAULT_MODEL, BatchStore, Line, LineResult, output_line,
                                         unrun, validate_lines)
from hybridserve.gateway.files import FileStore

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 6
MAX_BACKOFF_S = 30.0
DRAIN_S = 10.0                   # at shutdown, how long lines in flight may finish
PAGE = 256
BUDGET_CODES = ("budget_exceeded", "session_budget_exceeded")
LEASE_S = 30.0                   # a dead replica's batches are taken over after this long


@dataclass(frozen=True)
class Answer:
    """What the gateway answered one request: status, JSON body, Retry-After seconds if any."""

    status: int
    body: dict
    retry_after_s: float | None = None


# (path, raw body, key id, tenant, request id) -> the answer
Execute = Callable[[str, bytes, str | None, str, str], Awaitable[Answer]]


def transient(a: Answer) -> bool:
    """Worth asking again later: overload (429 other than a spent budget) or nothing available (503)."""
    if a.status == 503:
        return True
    err = a.body.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    return a.status == 429 and code not in BUDGET_CODES


def line_body(line: Line) -> bytes:
    body = json.loads(line.body)
    if body.get("model") is None:
        body["model"] = DEFAULT_MODEL
    body["hybridserve_priority"] = "batch"
    return json.dumps(body, separators=(",", ":")).encode()


class BatchRunner:
    def __init__(self, store: BatchStore, files: FileStore, execute: Execute, concurrency: int,
                 clock=time.time, on_line=None, holder: str | None = None, lease_s: float = LEASE_S):
        self.on_line = on_line      # told each line's final status (the gateway's metrics)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s = lease_s
        self.lost: set[str] = set()  # batches whose lease another replica took over
        self.watcher: asyncio.Task | None = None
        self.store = store
        self.files = files
        self.execute = execute
        self.clock = clock
        self.slots = asyncio.Semaphore(concurrency)
        self.tasks: dict[str, asyncio.Task] = {}
        self.stops: dict[str, asyncio.Event] = {}
        self.draining = False       # shutting down: start no line, finalize nothing

    # ---------------------------------------------------------------- lifecycle

    def resume(self) -> int:
        """Relaunch every unfinished batch of the store no other replica holds, and start the
        watcher (leases, remote cancels, takeovers); how many batches."""
        ids = self._claim()
        if ids:
            logger.info("resuming %d unfinished batch(es): %s", len(ids), ", ".join(ids))
        if self.watcher is None:
            self.watcher = asyncio.create_task(self._watch(), name="batch leases")
        return len(ids)

    def _claim(self) -> list[str]:
        ids = [b for b in self.store.claimable(self.holder) if b not in self.tasks]
        for batch_id in ids:
            self.launch(batch_id)
        return ids

    async def _watch(self) -> None:
        tick = min(2.0, self.lease_s / 3)
        while not self.draining:
            await asyncio.sleep(tick)
            try:
                for batch_id in list(self.tasks):
                    if not self.store.lease(batch_id, self.holder, self.lease_s):
                        logger.warning("batch %s: lease lost to another replica; starting no more lines",
                                       batch_id)
                        self.lost.add(batch_id)
                        self.cancel(batch_id)
                    elif self.store.status(batch_id) == "cancelling":
                        self.cancel(batch_id)
                if not self.draining and (ids := self._claim()):
                    logger.info("taking over %d batch(es) with no live lease: %s", len(ids), ", ".join(ids))
            except Exception:   # noqa: BLE001 - a busy database now is tried again next tick
                logger.exception("batch lease check failed")

    def launch(self, batch_id: str) -> None:
        if batch_id not in self.tasks:
            self.stops.setdefault(batch_id, asyncio.Event())
            self.tasks[batch_id] = asyncio.create_task(self._run(batch_id), name=f"batch {batch_id}")

    def cancel(self, batch_id: str) -> None:
        """The store says cancelling: stop starting its lines."""
        if batch_id in self.stops:
            self.stops[batch_id].set()

    async def stop(self, grace_s: float = DRAIN_S) -> None:
        """At shutdown: start no more lines, let those in flight finish for up to `grace_s`
        (each is paid for once, and recorded), then cancel what is left; whatever is
        unrecorded runs after the restart."""
        self.draining = True
        if self.watcher is not None:
            self.watcher.cancel()
            await asyncio.gather(self.watcher, return_exceptions=True)
        for stop in self.stops.values():
            stop.set()
        tasks = list(self.tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for t in late:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------- phases

    async def _run(self, batch_id: str) -> None:
        if not self.store.lease(batch_id, self.holder, self.lease_s):
            logger.info("batch %s is run by another replica", batch_id)
            self.tasks.pop(batch_id, None)
            self.stops.pop(batch_id, None)
            return
        try:
            row = self.store.get(batch_id)
            if row is not None and row["status"] == "validating":
                row = await self._validate(row)
            if row is not None and row["status"] in ("in_progress", "cancelling"):
                await self._execute(row)
            if (row is not None and row["status"] in ACTIVE and not self.draining and batch_id not in self.lost
                    and self.store.lease(batch_id, self.holder, self.lease_s)):
                await self._finalize(batch_id)
        except asyncio.CancelledError:
            raise
        except StateUnavailableError as err:   # the shared store is away: the watcher relaunches it later
            logger.warning("batch %s paused: %s", batch_id, err.message)
        except Exception as err:   # noqa: BLE001 - a batch never takes the gateway down
            logger.exception("batch %s: unexpected error", batch_id)
            await self._finalize(batch_id, unrun("server_error", f"the batch stopped on an internal error "
                                                           f"({type(err).__name__})"))
        finally:
            self.tasks.pop(batch_id, None)
            self.stops.pop(batch_id, None)
            self.lost.discard(batch_id)
            with contextlib.suppress(StateUnavailableError):   # else the lease runs out by itself
                self.store.release(batch_id, self.holder)      # a no-op where another replica took it over

    async def _validate(self, row: dict) -> dict | None:
        f = self.files.get(row["input_file_id"], row["owner"])
        if f is None:
            self.store.fail(row["id"], [{"code": "file_not_found", "line": None, "param": "input_file_id",
                                         "message": f"input file {row['input_file_id']} no longer exists"}])
            return self.store.get(row["id"])
        text = (await asyncio.to_thread(self.files.read, f)).decode("utf-8")
        lines, errors = await asyncio.to_thread(validate_lines, text, row["endpoint"])
        if errors:
            logger.info("batch %s failed validation: %d error(s), first: line %s %s", row["id"], len(errors),
                        errors[0]["line"], errors[0]["message"])
            self.store.fail(row["id"], errors)
        else:
            await asyncio.to_thread(self.store.start, row["id"], lines)
            logger.info("batch %s: %d line(s) in progress", row["id"], len(lines))
        return self.store.get(row["id"])

    async def _execute(self, row: dict) -> None:
        stop = self.stops.setdefault(row["id"], asyncio.Event())
        if row["status"] == "cancelling":
            stop.set()
        inflight: set[asyncio.Task] = set()
        try:
            for line in self._pending(row["id"]):
                if not await self._take_slot(row, stop):
                    break
                t = asyncio.create_task(self._line(row, line))
                inflight.add(t)
                t.add_done_callback(self._line_done(inflight))
            await asyncio.gather(*inflight)
        except BaseException:
            for t in inflight:
                t.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            raise

    def _pending(self, batch_id: str):
        """The lines without a result, in file order, a page at a time (lines in flight are
        still pending in the store: the pages move on by line number)."""
        after = 0
        while page := self.store.pending(batch_id, after, PAGE):
            yield from page
            after = page[-1].no

    def _line_done(self, inflight: set[asyncio.Task]):
        def done(t: asyncio.Task) -> None:
            inflight.discard(t)
            self.slots.release()
        return done

    async def _take_slot(self, row: dict, stop: asyncio.Event) -> bool:
        """A concurrency slot before the window closes and unless the batch is cancelled."""
        left = row["expires_at"] - self.clock()
        if left <= 0 or stop.is_set():
            return False
        try:
            await asyncio.wait_for(self.slots.acquire(), left)
        except TimeoutError:
            return False
        if stop.is_set() or self.clock() >= row["expires_at"]:
            self.slots.release()
            return False
        return True

    async def _line(self, row: dict, line: Line) -> None:
        raw = line_body(line)
        for attempt in range(MAX_ATTEMPTS):
            rid = uuid.uuid4().hex[:16]
            try:
                a = await self.execute(row["endpoint"], raw, row["key_id"], row["owner"], rid)
            except Exception as err:   # noqa: BLE001 - the line gets an error line, the batch goes on
                logger.exception("%s batch %s line %d: unexpected error", rid, row["id"], line.no)
                a = Answer(500, internal_error_body(err))
            wait = a.retry_after_s if a.retry_after_s is not None else 2.0 ** attempt
            wait = min(MAX_BACKOFF_S, max(0.0, wait))
            if not transient(a) or attempt + 1 == MAX_ATTEMPTS or self.clock() + wait >= row["expires_at"]:
                break
            logger.info("%s batch %s line %d: %d, trying again in %.1fs", rid, row["id"], line.no, a.status, wait)
            await asyncio.sleep(wait)
        self.store.record(row["id"], line.no, LineResult(a.status, rid, a.body))
        if self.on_line is not None:
            self.on_line(a.status)

    async def _finalize(self, batch_id: str, reason: LineResult | None = None) -> None:
        row = self.store.get(batch_id)
        if row is None or row["status"] not in ACTIVE:
            return   # another replica finished it (this one stalled past its lease)
        cancelled = row["status"] in ("cancelling", "cancelled")
        if reason is None:
            reason = (unrun("batch_cancelled", "the batch was cancelled before this request ran") if cancelled
                      else unrun("batch_expired", "the completion window closed before this request ran"))
        left = self.store.close_pending(batch_id, reason)
        if not cancelled and not left and row["status"] != "finalizing" and not self.store.advance(
                batch_id, row["status"], "finalizing", "finalizing_at"):
            cancelled = True   # a cancel came in after the status was read: it is answered as asked
        ids = {f"{kind}_file_id": await asyncio.to_thread(self._write_results, row, ok, kind)
               for ok, kind in ((True, "output"), (False, "error"))}
        code = reason.error["code"]
        if code == "server_error" and left:
            final = ("failed", "failed_at")
            ids["errors"] = json.dumps({"object": "list", "data": [{**reason.error, "param": None, "line": None}]})
        elif cancelled:
            final = ("cancelled", "cancelled_at")
        elif left:
            final = ("expired", "expired_at")
        else:
            final = ("completed", "completed_at")
        self.store.set_status(batch_id, *final, **ids)
        logger.info("batch %s %s (%d line(s) left unrun)", batch_id, final[0], left)

    def _write_results(self, row: dict, ok: bool, kind: str) -> str | None:
        results = self.store.results(row["id"], ok)
        if not results:
            return None
        text = "".join(json.dumps(output_line(row["id"], r), separators=(",", ":")) + "\n" for r in results)
        f = self.files.add(row["owner"], f"{row['id']}_{kind}.jsonl", "batch_output", text.encode(), len(results),
                           file_id=f"file-{row['id'].removeprefix('batch_')}-{kind}")
        return f.id
