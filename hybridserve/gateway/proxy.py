"""Forward a routed request to a backend and relay its answer, with its cost receipt.

The request body goes upstream as the client sent it unless the `Call` must change
it (governor controls, a session cut, a cascade's logprobs, or the usage a stream
needs for its receipt). A stream comes back as raw bytes, chunk by chunk as they
arrive; only the event that carries `usage` is parsed and amended (`tap_usage`). A
non-streaming answer is parsed once to read its usage and add the receipt. Each
backend has one keep-alive pool (`upstream.Pool`) shared by all requests.

Cascade (policy `cascade`, non-streaming): the cheapest tier answers first with
logprobs; while its mean token logprob is below `gateway.cascade_threshold` the next
tier answers; `usage.tiers` lists every tier tried with its cost. `parallel_verify`
runs the same loop but scores each draft by asking `gateway.verifier` whether it is
right (log P("yes"), see router/policies/verify.py); the verdict's cost is booked too.
With `gateway.cascade` the loop runs the configured rungs instead: each rung's params go
into its upstream body, each rung escalates below its own threshold, an unreachable rung
is skipped (and recorded), and `usage.tiers` names every rung tried (`name`, `backend`,
`cost_usd`, `mean_logprob`, `threshold`, `escalated`). A stream runs the first rung only.

Failure map: cannot connect (or the connection died before any answer) → the backend
is marked down and `auto`/aliases try the next one, a pinned request gets 503; a
backend that breaks mid-answer → 502 (or an error event inside the stream); no
answer within `gateway.request_timeout_s` → 504. A client that goes away closes the
upstream connection, which makes the worker abort the sequence.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from hybridserve import protocol as P
from hybridserve.errors import BackendUnavailableError, GatewayTimeoutError, UpstreamError
from hybridserve.gateway.call import Call, confidence, question_and_answer
from hybridserve.gateway.metrics import GatewayMetrics
from hybridserve.gateway.registry import BackendState, Registry
from hybridserve.gateway.routing import RouteRung
from hybridserve.router.policies import should_escalate
from hybridserve.router.policies.verify import judge_prompt, verdict_score
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


_USAGE = b'"usage":{'
_NULL_USAGE = b',"usage":null'


async def tap_usage(chunks, on_usage, keep_usage: bool):
    """Relay SSE bytes as they come; the event that carries `usage` goes through `on_usage`
    (which returns it amended with the receipt). With `keep_usage` false (the gateway asked
    for usage, not the client) that event and the `"usage":null` of other chunks are dropped.
    Whole events without usage pass as they are; only a usage event is parsed."""
    buf = b""
    async for chunk in chunks:
        if not buf and chunk.endswith(b"\n\n") and _USAGE not in chunk:
            yield chunk if keep_usage else chunk.replace(_NULL_USAGE, b"")
            continue
        buf += chunk
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            continue
        done, buf = buf[:cut + 2], buf[cut + 2:]
        out = []
        for event in done.split(b"\n\n")[:-1]:
            if _USAGE in event and event.startswith(b"data: {"):
                obj = json.loads(event[6:])
                if isinstance(obj.get("usage"), dict):
                    obj["usage"] = on_usage(obj["usage"])
                if keep_usage:
                    out.append(P.sse(obj))
                elif obj.get("choices"):
                    obj.pop("usage", None)
                    out.append(P.sse(obj))
            else:
                out.append(event + b"\n\n" if keep_usage else event.replace(_NULL_USAGE, b"") + b"\n\n")
        if out:
            yield b"".join(out)
    if buf:
        yield buf


class Proxy:
    def __init__(self, registry: Registry, metrics: GatewayMetrics, timeout_s: float):
        self.registry = registry
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.pools = {name: Pool(b.url) for name, b in registry.backends.items()}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    async def forward(self, request: Request, call: Call, path: str) -> Response:
        try:
            return await self._forward(request, call, path)
        except BaseException:
            call.settle(None, ok=False)
            raise

    async def _forward(self, request: Request, call: Call, path: str) -> Response:
        state = request.state
        adm = call.adm
        state.receipt = call.receipt_headers(final=False)
        if call.route.rungs and not adm.stream:
            return await self._rungs(request, path, call)
        tried = []
        order = call.route.order
        for i, b in enumerate(order):
            state.backend = b.name
            try:
                if adm.stream:
                    return await self._stream(request, b, path, call)
                if call.route.cascade:
                    return await self._cascade(request, order[i:], path, call)
                return await self._unary(request, b, path, call)
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

    async def _call_once(self, request: Request, b: BackendState, path: str, call: Call,
                         rung: RouteRung | None = None) -> tuple[int, str | None, bytes, float, float] | None:
        """One upstream exchange (as `rung`, when given); None when the client left (the call is
        settled then)."""
        b.inflight += 1
        t_send = time.perf_counter()
        try:
            status, ctype, body = await self._exchange_unless_client_leaves(request, b, path,
                                                                            call.body_for(b, rung))
        except _ClientGone:
            logger.info("%s client left; upstream %s request closed", request.state.request_id,
                        b.name)
            call.settle(b.name)
            return None
        finally:
            b.inflight -= 1
        return status, ctype, body, t_send, time.perf_counter()

    async def _unary(self, request: Request, b: BackendState, path: str, call: Call) -> Response:
        got = await self._call_once(request, b, path, call)
        if got is None:
            return Response(status_code=CLIENT_CLOSED)
        status, ctype, body, t_send, t_recv = got
        if status == 200:
            answer = self._parse(b, body)
            call.add_usage(b, answer.get("usage"))
            body = self._finish(request, b, call, answer)
        else:
            call.settle(b.name, ok=False)
        out = Response(body, status_code=status, media_type=ctype)
        self._observe(request, b, path, status, t_send, t_recv)
        return out

    async def _tier_answer(self, request: Request, b: BackendState, path: str, call: Call,
                           rung: RouteRung | None = None) -> tuple[dict, str | None] | Response:
        """One cascade step's answer and content type, or the Response that ends the cascade
        (the client left, or the backend answered with an error, which the call settles)."""
        got = await self._call_once(request, b, path, call, rung)
        if got is None:
            return Response(status_code=CLIENT_CLOSED)
        status, ctype, body, t_send, t_recv = got
        self._observe(request, b, path, status, t_send, t_recv)
        if status != 200:
            call.settle(b.name, ok=False)
            return Response(body, status_code=status, media_type=ctype)
        return self._parse(b, body), ctype

    async def _cascade(self, request: Request, order: list[BackendState], path: str,
                       call: Call) -> Response:
        """Cheapest tier first; the next tier while mean token logprob is below the threshold."""
        for j, b in enumerate(order):
            request.state.backend = b.name
            got = await self._tier_answer(request, b, path, call)
            if isinstance(got, Response):
                return got
            answer, ctype = got
            tier = {"backend": b.name, "cost_usd": round(call.add_usage(b, answer.get("usage")), 10)}
            last = j + 1 == len(order)
            if call.route.verifier is None:
                conf = confidence(answer, call.adm.chat, call.controls.vote)
                tier["mean_logprob"] = None if conf is None else round(conf, 4)
            elif not last:
                conf, cost = await self._verify(request, call, answer)
                tier.update(verified_by=call.route.verifier.name, verifier_cost_usd=round(cost, 10),
                            verifier_score=None if conf is None else round(conf, 4))
            up = not last and should_escalate(conf, call.route.threshold)
            tier["escalated"] = up
            call.tried.append(tier)
            if not up:
                return Response(self._finish(request, b, call, answer), media_type=ctype)
            self.metrics.escalations.labels(b.name, order[j + 1].name).inc()
        raise AssertionError("unreachable: the last tier never escalates")

    async def _rungs(self, request: Request, path: str, call: Call) -> Response:
        """Configured cascade: rung after rung while the answer's mean token logprob (the winning
        sample's, for a voting rung) is below that rung's threshold."""
        rungs, kept = call.route.rungs, None
        for j, rung in enumerate(rungs):
            b = rung.backend
            request.state.backend = b.name
            try:
                got = await self._tier_answer(request, b, path, call, rung)
            except _Unreachable as err:
                b.mark_down(str(err))
                call.tried.append({"name": rung.name, "backend": b.name, "error": f"unreachable: {err}"})
                logger.warning("%s rung %s (%s) unreachable: %s", request.state.request_id, rung.name, b.name, err)
                continue
            if isinstance(got, Response):
                return got
            answer, ctype = got
            conf = confidence(answer, call.adm.chat, call.controls_for(rung).vote)
            up = j + 1 < len(rungs) and should_escalate(conf, rung.threshold)
            call.tried.append({"name": rung.name, "backend": b.name,
                               "cost_usd": round(call.add_usage(b, answer.get("usage")), 10),
                               "mean_logprob": None if conf is None else round(conf, 4),
                               "threshold": rung.threshold, "escalated": up})
            kept = (b, rung, answer, ctype)
            if not up:
                break
            self.metrics.escalations.labels(b.name, rungs[j + 1].backend.name).inc()
        if kept is None:
            errors = "; ".join(f"{t['name']}: {t['error']}" for t in call.tried)
            raise BackendUnavailableError(f"no cascade rung could take the request: {errors}")
        b, rung, answer, ctype = kept   # an unreachable rung above it leaves the last answer standing
        request.state.backend = b.name
        return Response(self._finish(request, b, call, answer, rung), media_type=ctype)

    async def _verify(self, request: Request, call: Call, answer: dict) -> tuple[float | None, float]:
        """Ask the verifier to judge a draft: (log P(yes) or None, the verdict's cost)."""
        v = call.route.verifier
        qa = question_and_answer(call.adm.data, answer, call.adm.chat)
        if qa is None or v is None or not v.healthy:
            return None, 0.0
        body = json.dumps({"model": v.name, "prompt": judge_prompt(*qa), "max_tokens": 1,
                           "temperature": 0.0, "logprobs": 20}).encode()
        try:
            async with asyncio.timeout(self.timeout_s):
                status, _, raw = await self._exchange(v, "/v1/completions", body, request.state.request_id)
            verdict = self._parse(v, raw) if status == 200 else {}
        except (_Unreachable, UpstreamError, TimeoutError) as err:
            logger.warning("%s verifier %s failed: %s", request.state.request_id, v.name, err)
            return None, 0.0
        cost = call.add_usage(v, verdict.get("usage"), answer=False)
        choices = verdict.get("choices") or [{}]
        tops = (choices[0].get("logprobs") or {}).get("top_logprobs") or [None]
        return verdict_score(tops[0]), cost

    @staticmethod
    def _parse(b: BackendState, body: bytes) -> dict:
        try:
            answer = json.loads(body)
        except ValueError:
            raise UpstreamError(f"backend '{b.name}' answered with invalid JSON") from None
        if not isinstance(answer, dict):
            raise UpstreamError(f"backend '{b.name}' answered with a non-object")
        return answer

    def _finish(self, request: Request, b: BackendState, call: Call, answer: dict,
                rung: RouteRung | None = None) -> bytes:
        answer = call.finish_body(b, answer, rung)
        call.settle(b.name)
        self.metrics.account(b.name, call)
        request.state.receipt = call.receipt_headers(final=True)
        return json.dumps(answer, separators=(",", ":")).encode()

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

    async def _stream(self, request: Request, b: BackendState, path: str, call: Call) -> Response:
        b.inflight += 1
        t_send = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self._send(b, path, call.body_for(b), request.state.request_id)
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
                if resp.status == 200:
                    call.settle(b.name)
                    self.metrics.account(b.name, call)

        if resp.status != 200:  # an error answer: relay it whole
            try:
                async with asyncio.timeout(self.timeout_s):
                    body = await resp.read()
            except (BrokenResponse, TimeoutError) as err:
                raise UpstreamError(f"backend '{b.name}' broke off its answer ({err})") from None
            finally:
                await close()
                call.settle(b.name, ok=False)
            self._observe(request, b, path, resp.status, t_send, t_recv)
            return Response(body, status_code=resp.status, media_type=resp.content_type)
        deadline = time.monotonic() + self.timeout_s
        rid = request.state.request_id

        def on_usage(usage: dict) -> dict:
            call.add_usage(b, usage)
            call.complete = True
            call.check_exhausted([{"finish_reason": "length"}])
            usage.update(call.usage_extension(b.name))
            call.settle(b.name)
            return usage

        async def relay():
            try:
                upstream = resp.iter_raw(read_timeout_s=self.timeout_s)
                async for chunk in tap_usage(upstream, on_usage, call.adm.client_usage):
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
