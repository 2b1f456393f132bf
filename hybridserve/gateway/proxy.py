"""Forward a validated request to a backend and relay its answer, streams byte for byte.

The request body goes upstream exactly as the client sent it (it was parsed only to
validate it) and a stream comes back as raw bytes, chunk by chunk as they arrive: no
re-serialisation on the hot path. One shared `httpx.AsyncClient` keeps connections
to every backend alive between requests.

Failure map: cannot connect (or the pooled connection died before any answer) →
the backend is marked down and `auto`/aliases try the next one, a pinned request
gets 503; a backend that breaks mid-answer → 502 (or an error event inside the
stream); no answer within `gateway.request_timeout_s` → 504. A client that goes
away closes the upstream connection, which makes the worker abort the sequence.
"""
from __future__ import annotations

import asyncio
import logging
import time

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from hybridserve import protocol as P
from hybridserve.errors import BackendUnavailableError, HybridserveError, UpstreamError
from hybridserve.gateway.admission import Admitted
from hybridserve.gateway.metrics import GatewayMetrics
from hybridserve.gateway.registry import BackendState, Registry

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499
_CONNECT_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_DEAD_BEFORE_ANSWER = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class GatewayTimeoutError(HybridserveError):
    """The backend did not answer within the gateway's request timeout (504)."""

    status_code = 504
    error_type = "timeout"


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
    def __init__(self, client: httpx.AsyncClient, registry: Registry, metrics: GatewayMetrics,
                 timeout_s: float):
        self.client = client
        self.registry = registry
        self.metrics = metrics
        self.timeout_s = timeout_s

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
        self.metrics.added.labels(b.name).observe(added)
        self.metrics.upstream.labels(b.name).observe(t_recv - t_send)
        logger.info("%s %s -> %s %d upstream=%.1fms added=%.2fms", request.state.request_id, path,
                    b.name, status, (t_recv - t_send) * 1e3, added * 1e3)

    async def _unary(self, request: Request, b: BackendState, path: str, raw: bytes) -> Response:
        req = self.client.build_request("POST", b.url + path, content=raw,
                                        headers=self._headers(b, request.state.request_id))
        b.inflight += 1
        t_send = time.perf_counter()
        try:
            resp = await self._send_unless_client_leaves(request, req)
        except _ClientGone:
            logger.info("%s client left; upstream %s request closed", request.state.request_id,
                        b.name)
            return Response(status_code=CLIENT_CLOSED)
        finally:
            b.inflight -= 1
        t_recv = time.perf_counter()
        out = Response(resp.content, status_code=resp.status_code,
                       media_type=resp.headers.get("content-type"))
        self._observe(request, b, path, resp.status_code, t_send, t_recv)
        return out

    async def _send_unless_client_leaves(self, request: Request, req: httpx.Request) -> httpx.Response:
        """Send upstream; if the client disconnects first, cancel the upstream call."""
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
                return await self._send(req, stream=False)
        except asyncio.CancelledError:
            if gone:
                task.uncancel()
                raise _ClientGone() from None
            raise
        except TimeoutError:
            raise GatewayTimeoutError(f"the backend did not answer within {self.timeout_s:g}s "
                                      "(gateway.request_timeout_s)") from None
        finally:
            watcher.cancel()

    async def _send(self, req: httpx.Request, stream: bool) -> httpx.Response:
        try:
            try:
                return await self.client.send(req, stream=stream)
            except _DEAD_BEFORE_ANSWER:  # a pooled connection the server had just closed: once more
                return await self.client.send(req, stream=stream)
        except _CONNECT_FAILURES as err:
            raise _Unreachable(f"cannot connect ({type(err).__name__})") from None
        except _DEAD_BEFORE_ANSWER as err:
            raise _Unreachable(f"connection lost before an answer ({type(err).__name__})") from None
        except httpx.TimeoutException:
            raise GatewayTimeoutError(f"the backend did not answer within {self.timeout_s:g}s "
                                      "(gateway.request_timeout_s)") from None
        except httpx.HTTPError as err:
            raise UpstreamError(f"backend request failed: {type(err).__name__}: {err}") from None

    async def _stream(self, request: Request, b: BackendState, path: str, raw: bytes) -> Response:
        req = self.client.build_request("POST", b.url + path, content=raw,
                                        headers=self._headers(b, request.state.request_id))
        b.inflight += 1
        t_send = time.perf_counter()
        try:
            resp = await self._send(req, stream=True)
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
                await resp.aclose()

        if resp.status_code != 200:  # an error answer: relay it whole
            try:
                body = await resp.aread()
            finally:
                await close()
            self._observe(request, b, path, resp.status_code, t_send, t_recv)
            return Response(body, status_code=resp.status_code,
                            media_type=resp.headers.get("content-type"))
        deadline = time.monotonic() + self.timeout_s
        rid = request.state.request_id

        async def relay():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
                    if time.monotonic() > deadline:
                        yield P.sse(GatewayTimeoutError("stream exceeded the gateway's request "
                                                        "timeout").to_openai())
                        return
            except httpx.HTTPError as err:
                logger.warning("%s stream from %s broke: %s", rid, b.name, type(err).__name__)
                yield P.sse(UpstreamError(f"backend stream broke: {type(err).__name__}").to_openai())

        self._observe(request, b, path, 200, t_send, t_recv)
        return RelayResponse(relay(), close, media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})
