"""`AsyncEngine`: the engine's step loop on a background thread, with asyncio streams per request.

The worker's event loop never runs model code: `generate()` posts the request to
the engine thread and awaits its outputs on an asyncio queue. Leaving the stream
early (client disconnect, task cancel, `aclose`) aborts the request, which frees
its KV blocks and state slot before the next step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from hybridserve.engine.engine import EngineStats, LLMEngine
from hybridserve.engine.outputs import RequestOutput
from hybridserve.engine.params import SamplingParams
from hybridserve.errors import HybridserveError, UpstreamError

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.name
        self.max_context = engine.max_context
        self.vocab_size = engine.vocab_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue] = {}

    @classmethod
    def from_backend(cls, backend) -> "AsyncEngine":
        return cls(LLMEngine.from_backend(backend))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.model_name}", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; raises typed errors for bad input before the first output."""
        if self._loop is None:
            raise RuntimeError("AsyncEngine.start() was not awaited")
        if params.guided is None:
            self.engine.validate(prompt_token_ids, params)
        else:  # compiling a grammar can take a while: off the event loop
            await asyncio.to_thread(self.engine.validate, prompt_token_ids, params)
        if request_id in self._streams:
            raise HybridserveError(f"request id {request_id!r} is already in flight")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._post(("add", request_id, list(prompt_token_ids), params, time.time(), stream))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    # ---- engine thread
    def _post(self, cmd: tuple) -> None:
        self._inbox.put(cmd)
        self._wake.set()

    def _deliver(self, stream: asyncio.Queue, item) -> None:
        self._loop.call_soon_threadsafe(stream.put_nowait, item)

    def _deliver_all(self, items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
        """A step's outputs in one hand-over: one wake-up of the event loop per step, not one
        per sequence (each wake-up is a self-pipe write and a loop turn that competes with
        the next step's Python for the GIL)."""
        if items:
            self._loop.call_soon_threadsafe(_put_all, items)

    def _run(self) -> None:
        streams: dict[str, asyncio.Queue] = {}
        while not self._stop.is_set():
            self._drain(streams)
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug must not take the worker down: fail in-flight requests
                log.exception("engine step failed; failing %d in-flight requests", len(streams))
                for rid, stream in list(streams.items()):
                    self.engine.abort_request(rid)
                    self._deliver(stream, UpstreamError(f"engine step failed: {exc}"))
                streams.clear()
                continue
            ready = []
            for out in outputs:
                stream = streams.get(out.request_id)
                if stream is not None:
                    ready.append((stream, out))
                    if out.finished:
                        streams.pop(out.request_id, None)
            self._deliver_all(ready)
        for rid in list(streams):
            self.engine.abort_request(rid)

    def _drain(self, streams: dict[str, asyncio.Queue]) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params, arrival, stream = cmd
                try:
                    self.engine.add_request(rid, prompt, params, arrival)
                    streams[rid] = stream
                except HybridserveError as exc:
                    self._deliver(stream, exc)
            elif cmd[0] == "abort":
                streams.pop(cmd[1], None)
                if self.engine.abort_request(cmd[1]) is not None:
                    log.info("request %s aborted; cache freed", cmd[1])


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)
