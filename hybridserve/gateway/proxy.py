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
into its upstream body, each rung escalates below its own threshold, and `usage.tiers`
names every rung tried (`name`, `backend`, `cost_usd`, `mean_logprob`, `threshold`,
`escalated`). Either way each step is asked once, and an unreachable one is marked down,
skipped and recorded (`error`). A stream runs the first tier or rung only.

Failure map: cannot connect (or the connection died before any answer) → the backend
is marked down and `auto`/aliases try the next one, a pinned request gets 503; a
backend that breaks mid-answer → 502 (or an error event inside the stream); no
answer within `gateway.request_timeout_s` → 504. A client that goes away closes the
upstream connection, which makes the worker abort the sequence.

Settlement: every path records what happened in the call's `Outcome` (each call sent, each
usage measured, the tiers tried, each failed-over attempt, the answer's tool calls, a
disconnect, an error), and `forward` settles it once:
after the answer or the exception, or for a stream when its relay closes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.requests import Request
from starlette.responses import Response

from hybridserve import protocol as P
from hybridserve.errors import BackendUnavailableError, GatewayTimeoutError, OverloadedError, UpstreamError
from hybridserve.gateway.call import Call, confidence, question_and_answer
from hybridserve.gateway.metrics import GatewayMetrics
from hybridserve.gateway.registry import BackendState, Registry
from hybridserve.gateway.relay import RelayResponse, Saturated, saturation, tap_usage
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
        """Run the call, then settle its outcome once: here for an answer, an error answer or an
        exception, and for a stream when its relay closes (`_stream`)."""
        call.outcome.request_id = request.state.request_id
        try:
            out = await self._forward(request, call, path)
        except BaseException as err:
            call.outcome.error = type(err).__name__
            self._settle(call)
            raise
        if not isinstance(out, RelayResponse):
            self._settle(call)
        return out

    def _settle(self, call: Call) -> None:
        """Book the call's outcome (once) and count an answered call in the metrics."""
        if call.settled:
            return
        call.settle()
        if call.outcome.answered and not call.outcome.error:
            self.metrics.account(call.outcome.backend, call)

    async def _forward(self, request: Request, call: Call, path: str) -> Response:
        request.state.receipt = call.receipt_headers(final=False)
        if call.route.cascade and not call.adm.stream:
            return await self._cascade(request, path, call)
        tried, full = [], []
        for b in call.route.order:
            request.state.backend = b.name
            try:
                if call.adm.stream:
                    return await self._stream(request, b, path, call)
                return await self._unary(request, b, path, call)
            except _Unreachable as err:
                b.mark_down(str(err))
                tried.append(f"{b.name}: {err}")
                call.outcome.failovers += 1
                logger.warning("%s backend %s unreachable: %s", request.state.request_id, b.name, err)
            except Saturated as err:
                full.append(err)
                tried.append(f"{b.name}: saturated")
                call.outcome.failovers += 1
                self.metrics.errors.labels(b.name, "saturated").inc()
                logger.info("%s backend %s saturated; trying the next", request.state.request_id, b.name)
        if full:
            if call.adm.pinned and len(full) == 1 and len(tried) == 1:
                raise full[0]  # the one backend the client named: its own answer
            raise OverloadedError("every backend that could take the request is saturated ("
                                  + "; ".join(tried) + "); retry later",
                                  min(e.retry_after_s for e in full), code="all_backends_saturated")
        if call.adm.pinned:
            raise BackendUnavailableError(f"backend '{call.adm.model}' is unavailable ({tried[0]}); "
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
        """One upstream exchange (as `rung`, when given), recorded in the outcome; None when the
        client left."""
        b.inflight += 1
        call.outcome.sent()
        call.outcome.backend = b.name
        t_send = time.perf_counter()
        try:
            status, ctype, body = await self._exchange_unless_client_leaves(request, b, path,
                                                                            call.body_for(b, rung))
        except (_Unreachable, Saturated):
            call.outcome.produced_nothing()
            call.outcome.backend = None
            raise
        except _ClientGone:
            logger.info("%s client left; upstream %s request closed", request.state.request_id, b.name)
            call.outcome.disconnected = True
            return None
        finally:
            b.inflight -= 1
        call.outcome.status = status
        if status != 200:
            call.outcome.produced_nothing()
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
        out = Response(body, status_code=status, media_type=ctype)
        self._observe(request, b, path, status, t_send, t_recv)
        return out

    async def _tier_answer(self, request: Request, b: BackendState, path: str, call: Call,
                           rung: RouteRung | None = None) -> tuple[dict, str | None] | Response:
        """One cascade step's answer and content type, or the Response that ends the cascade
        (the client left, or the backend answered with an error)."""
        got = await self._call_once(request, b, path, call, rung)
        if got is None:
            return Response(status_code=CLIENT_CLOSED)
        status, ctype, body, t_send, t_recv = got
        self._observe(request, b, path, status, t_send, t_recv)
        if status != 200:
            return Response(body, status_code=status, media_type=ctype)
        return self._parse(b, body), ctype

    async def _cascade(self, request: Request, path: str, call: Call) -> Response:
        """Step after step (`Call.cascade_steps`: configured rungs, else the tiers cheapest first)
        while the answer's confidence is below the step's threshold: its mean token logprob (the
        winning sample's, for a voting rung), or under parallel_verify the verifier's score. Each
        step is asked once; an unreachable one is marked down, recorded and skipped, and the last
        answer stands."""
        steps, kept = call.cascade_steps(), None
        for j, (b, rung) in enumerate(steps):
            request.state.backend = b.name
            step: dict = {"name": rung.name, "backend": b.name} if rung else {"backend": b.name}
            try:
                got = await self._tier_answer(request, b, path, call, rung)
            except _Unreachable as err:
                b.mark_down(str(err))
                call.outcome.tried.append({**step, "error": f"unreachable: {err}"})
                call.outcome.failovers += 1
                logger.warning("%s cascade step %s unreachable: %s", request.state.request_id, b.name, err)
                continue
            except Saturated as err:
                if kept is None and j + 1 == len(steps):
                    raise
                call.outcome.tried.append({**step, "error": "saturated"})
                call.outcome.failovers += 1
                self.metrics.errors.labels(b.name, "saturated").inc()
                logger.info("%s cascade step %s saturated: %s", request.state.request_id, b.name, err)
                continue
            if isinstance(got, Response):
                return got
            answer, ctype = got
            last, conf = j + 1 == len(steps), None
            step["cost_usd"] = round(call.add_usage(b, answer.get("usage")), 10)
            if rung is not None or call.route.verifier is None:
                conf = confidence(answer, call.adm.chat, call.controls_for(rung).vote)
                step["mean_logprob"] = None if conf is None else round(conf, 4)
            elif not last:
                conf, cost = await self._verify(request, call, answer)
                step.update(verified_by=call.route.verifier.name, verifier_cost_usd=round(cost, 10),
                            verifier_score=None if conf is None else round(conf, 4))
            if rung is not None:
                step["threshold"] = rung.threshold
            up = not last and should_escalate(conf, call.threshold_of(rung))
            step["escalated"] = up
            call.outcome.tried.append(step)
            kept = (b, rung, answer, ctype)
            if not up:
                break
            self.metrics.escalations.labels(b.name, steps[j + 1][0].name).inc()
        if kept is None:
            errors = "; ".join(f"{t.get('name', t['backend'])}: {t['error']}" for t in call.outcome.tried)
            what = "cascade rung" if call.route.rungs else "backend"
            raise BackendUnavailableError(f"no {what} could take the request: {errors}")
        b, rung, answer, ctype = kept   # an unreachable step above it leaves the last answer standing
        request.state.backend = b.name
        return Response(self._finish(request, b, call, answer, rung), media_type=ctype)

    async def _verify(self, request: Request, call: Call, answer: dict) -> tuple[float | None, float]:
        """Ask the verifier to judge a draft: (log P(yes) or None, the verdict's cost). A verdict
        that broke off or timed out stays unmeasured in the outcome (it may have been generated)."""
        v = call.route.verifier
        qa = question_and_answer(call.adm.data, answer, call.adm.chat)
        if qa is None or v is None or not v.healthy:
            return None, 0.0
        body = json.dumps({"model": v.name, "prompt": judge_prompt(*qa), "max_tokens": 1,
                           "temperature": 0.0, "logprobs": 20}).encode()
        call.outcome.sent()
        try:
            async with asyncio.timeout(self.timeout_s):
                status, _, raw = await self._exchange(v, "/v1/completions", body, request.state.request_id)
            verdict = self._parse(v, raw) if status == 200 else None
        except _Unreachable as err:
            call.outcome.produced_nothing()
            logger.warning("%s verifier %s unreachable: %s", request.state.request_id, v.name, err)
            return None, 0.0
        except (UpstreamError, TimeoutError) as err:
            logger.warning("%s verifier %s failed: %s", request.state.request_id, v.name, err)
            return None, 0.0
        if verdict is None:
            call.outcome.produced_nothing()
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
        request.state.receipt = call.receipt_headers(final=True)
        return json.dumps(answer, separators=(",", ":")).encode()

    async def _exchange(self, b: BackendState, path: str, raw: bytes,
                        request_id: str) -> tuple[int, str | None, bytes]:
        resp = await self._send(b, path, raw, request_id)
        try:
            body = await resp.read()
        except BrokenResponse as err:
            raise UpstreamError(f"backend '{b.name}' broke off its answer ({err})") from None
        full = saturation(b, resp.status, resp.headers, body)
        if full is not None:
            raise full
        return resp.status, resp.content_type, body

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
        """Relay a stream; it settles when the relay closes (finished, broken or left by the client)."""
        b.inflight += 1
        call.outcome.sent()
        call.outcome.backend = b.name
        t_send = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self._send(b, path, call.body_for(b), request.state.request_id)
        except _Unreachable:
            b.inflight -= 1
            call.outcome.produced_nothing()
            call.outcome.backend = None
            raise
        except TimeoutError:
            b.inflight -= 1
            raise self._timeout() from None
        except BaseException:
            b.inflight -= 1
            raise
        t_recv = time.perf_counter()
        call.outcome.status = resp.status
        if resp.status != 200:  # an error answer: relay it whole (`forward` settles it)
            call.outcome.produced_nothing()
            try:
                async with asyncio.timeout(self.timeout_s):
                    body = await resp.read()
            except (BrokenResponse, TimeoutError) as err:
                raise UpstreamError(f"backend '{b.name}' broke off its answer ({err})") from None
            finally:
                b.inflight -= 1
                resp.aclose_now()
            self._observe(request, b, path, resp.status, t_send, t_recv)
            full = saturation(b, resp.status, resp.headers, body)
            if full is not None:
                call.outcome.backend = None
                raise full
            return Response(body, status_code=resp.status, media_type=resp.content_type)
        deadline = time.monotonic() + self.timeout_s
        rid = request.state.request_id
        closed = ended = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                b.inflight -= 1
                resp.aclose_now()
                call.outcome.disconnected = call.outcome.disconnected or not (ended or call.outcome.error)
                self._settle(call)

        def on_usage(usage: dict) -> dict:
            call.add_usage(b, usage)
            call.check_exhausted([{"finish_reason": "length"}])
            usage.update(call.usage_extension(b.name))
            return usage

        async def relay():
            nonlocal ended
            try:
                upstream = resp.iter_raw(read_timeout_s=self.timeout_s)
                tapped = tap_usage(upstream, on_usage, call.adm.client_usage,
                                   call.outcome.saw_tool_call_deltas)
                async for chunk in tapped:
                    yield chunk
                    if time.monotonic() > deadline:
                        yield P.sse(GatewayTimeoutError("stream exceeded the gateway's request "
                                                        "timeout").to_openai())
                        break
            except (BrokenResponse, TimeoutError) as err:
                logger.warning("%s stream from %s broke: %s", rid, b.name, err)
                yield P.sse(UpstreamError(f"backend stream broke: {err}").to_openai())
            except Exception as err:
                call.outcome.error = type(err).__name__
                raise
            ended = True

        self._observe(request, b, path, 200, t_send, t_recv)
        return RelayResponse(relay(), close, media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})
