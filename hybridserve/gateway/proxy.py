"""Forward a validated request to a backend and relay its answer, streams byte for byte.

The request body goes upstream exactly as the client sent it (it was parsed only to
validate it) and a stream comes back as raw bytes, chunk by chunk as they arrive: no
re-serialisation on the hot path. Each backend has one keep-alive pool
(`upstream.Pool`) shared by all requests.

Failure map: cannot connect (or the connection died before any answer) → the backend
is marked down and `auto`/aliases try the next one, a pinned request gets 503; a
backend that breaks mid-answer → 502 (or an error event inside the stream); no
answer within `gateway.request_timeout_s` → 504. A client that goes away closes the
upstream connection, which makes the worker abort the sequence.
"""
from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from hybridserve import protocol as P
from hybridserve.errors import BackendUnavailableError, GatewayTimeoutError, HybridserveError, UpstreamError
from hybridserve.gateway.admission import Admitted
from hybridserve.gateway.metrics import GatewayMetrics
from hybridserve.gateway.registry import BackendState, Registry
from hybridserve.gateway.upstream import (BrokenResponse, ConnectFailed, ConnectionLost, Pool,
                                          UpstreamResponse)

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499


class _Unreachable(Exception):
    pass


class _ClientGone(Exception):
    pass


class RelayResponse(StreamingResponse):
    """A streaming response that always releases its upstream stream, however it ends."""

    def __init__(self, body, close, **kw):
        super().__init__(body, **kw)
        self._close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


class Proxy:
    def __init__(self, registry: Registry, metrics: GatewayMetrics, timeout_s: float):
        self.registry = registry
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.pools = {name: Pool(b.url) for name, b in registry.backends.items()}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    async def forward(self, request: Request, adm: Admitted, path: str, raw: bytes) -> Response:
        state = request.state
        tried = []
        for b in self.registry.order(adm.candidates, adm.pinned, adm.preferred):
            state.backend = b.name
            try:
                if adm.stream:
                    return await self._stream(request, b, path, raw)
                return await self._unary(request, b, path, raw)
            except _Unreachable as err:
                b.mark_down(str(err))
                tried.append(f"{b.name}: {err}")
                logger.warning("%s backend %s unreachable: %s", state.request_id, b.name, err)
        if adm.pinned:
            raise BackendUnavailableError(f"backend '{adm.model}' is unavailable ({tried[0]}); "
                                          "it may be restarting, retry shortly or use model 'auto'")
        raise BackendUnavailableError("no backend could take the request: " + "; ".join(tried))

    def _headers(self, b: BackendState, request_id: str) -> dict[str, str]:
        h = {"content-type": "application/json", "x-request-id": request_id}
        if b.auth_header:
            h["authorization"] = b.auth_header
        return h

    def _observe(self, request: Request, b: BackendState, path: str, status: int, t_send: float,
                 t_recv: float) -> None:
        added = (t_send - request.state.t0) + (time.perf_counter() - t_recv)
        self.metrics.requests.labels(b.name, path, str(status)).inc()
        if status >= 400:
            self.metrics.errors.labels(b.name, f"upstream_{status}").inc()
        self.metrics.added.labels(b.name).observe(added)
        self.metrics.upstream.labels(b.name).observe(t_recv - t_send)
        logger.info("%s %s -> %s %d upstream=%.1fms added=%.2fms", request.state.request_id, path,
                    b.name, status, (t_recv - t_send) * 1e3, added * 1e3)

    def _timeout(self) -> GatewayTimeoutError:
        return GatewayTimeoutError(f"the backend did not answer within {self.timeout_s:g}s "
                                   "(gateway.request_timeout_s)")

    async def _send(self, b: BackendState, path: str, raw: bytes, request_id: str) -> UpstreamResponse:
        try:
            return await self.pools[b.name].request("POST", path, raw, self._headers(b, request_id))
        except ConnectFailed as err:
            raise _Unreachable(f"cannot connect ({err})") from None
        except ConnectionLost as err:
            raise _Unreachable(f"connection lost before an answer ({err})") from None

    async def _unary(self, request: Request, b: BackendState, path: str, raw: bytes) -> Response:
        b.inflight += 1
        t_send = time.perf_counter()
        try:
            status, ctype, body = await self._exchange_unless_client_leaves(request, b, path, raw)
        except _ClientGone:
            logger.info("%s client left; upstream %s request closed", request.state.request_id,
                        b.name)
            return Response(status_code=CLIENT_CLOSED)
        finally:
            b.inflight -= 1
        t_recv = time.perf_counter()
        out = Response(body, status_code=status, media_type=ctype)
        self._observe(request, b, path, status, t_send, t_recv)
        return out

    async def _exchange(self, b: BackendState, path: str, raw: bytes,
                        request_id: str) -> tuple[int, str | None, bytes]:
        resp = await self._send(b, path, raw, request_id)
        try:
            return resp.status, resp.content_type, await resp.read()
        except BrokenResponse as err:
            raise UpstreamError(f"backend '{b.name}' broke off its answer ({err})") from None

    async def _exchange_unless_client_leaves(self, request: Request, b: BackendState, path: str,
                                             raw: bytes) -> tuple[int, str | None, bytes]:
        """Call upstream; if the client disconnects first, cancel (which closes the connection)."""
        task = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._exchange(b, path, raw, request.state.request_id)
        except asyncio.CancelledError:
            if gone:
                task.uncancel()
                raise _ClientGone() from None
            raise
        except TimeoutError:
            raise self._timeout() from None
        finally:
            watcher.cancel()

    async def _stream(self, request: Request, b: BackendState, path: str, raw: bytes) -> Response:
        b.inflight += 1
        t_send = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self._send(b, path, raw, request.state.request_id)
        except TimeoutError:
            b.inflight -= 1
            raise self._timeout() from None
        except BaseException:
            b.inflight -= 1
            raise
        t_recv = time.perf_counter()
        closed = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                b.inflight -= 1
                resp.aclose_now()

        if resp.status != 200:  # an error answer: relay it whole
            try:
                async with asyncio.timeout(self.timeout_s):
                    body = await resp.read()
            except (BrokenResponse, TimeoutError) as err:
                raise UpstreamError(f"backend '{b.name}' broke off its answer ({err})") from None
            finally:
                await close()
            self._observe(request, b, path, resp.status, t_send, t_recv)
            return Response(body, status_code=resp.status, media_type=resp.content_type)
        deadline = time.monotonic() + self.timeout_s
        rid = request.state.request_id

        async def relay():
            try:
                async for chunk in resp.iter_raw(read_timeout_s=self.timeout_s):
                    yield chunk
                    if time.monotonic() > deadline:
                        yield P.sse(GatewayTimeoutError("stream exceeded the gateway's request "
                                                        "timeout").to_openai())
                        return
            except (BrokenResponse, TimeoutError) as err:
                logger.warning("%s stream from %s broke: %s", rid, b.name, err)
                yield P.sse(UpstreamError(f"backend stream broke: {err}").to_openai())

        self._observe(request, b, path, 200, t_send, t_recv)
        return RelayResponse(relay(), close, media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})
