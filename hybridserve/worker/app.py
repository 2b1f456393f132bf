"""The worker's HTTP server: OpenAI endpoints, /health and /metrics over one AsyncEngine.

Its OpenAPI document is at /openapi.json (Swagger UI at /docs; `hybridserve.openapi`).

The engine knows nothing of HTTP and this module knows nothing of scheduling: it
validates the request (`protocol`), hands it to `serving`, and streams or returns
the result. Errors raised on purpose (`HybridserveError`) become OpenAI error JSON
here, in one place; an unexpected one becomes a 500 in the same shape that keeps the
connection open (`errors.ContainErrors`). A client that goes away aborts its engine
requests: streams are cancelled by Starlette, non-streaming requests race a
disconnect watcher.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybridserve import openapi as O
from hybridserve import protocol as P
from hybridserve.cpu_binding import available_cores, format_cores
from hybridserve.errors import (ContainErrors, HybridserveError, InvalidRequestError, error_bytes,
                                http_error_body, params_error_body)
from hybridserve.worker import serving as S
from hybridserve.worker import tools as T
from hybridserve.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's convention: the client went away before the answer


def json_error(body: dict, status: int, headers: dict[str, str] | None = None) -> Response:
    """An OpenAI error body as ASCII JSON (`errors.error_bytes`)."""
    return Response(error_bytes(body), status_code=status, headers=headers, media_type="application/json")


def error_response(err: HybridserveError, headers: dict[str, str] | None = None) -> Response:
    return json_error(err.to_openai(), err.status_code, {**err.headers(), **(headers or {})})


def log_unexpected(scope: dict, err: Exception) -> None:
    rid = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "-")
    logger.error("%s unexpected error", rid, exc_info=err)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI error JSON for our errors, unknown routes and anything unexpected (a 500 that
    leaves the client's connection open)."""

    @app.exception_handler(HybridserveError)
    async def _typed(_: Request, err: HybridserveError) -> Response:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> Response:
        return json_error(http_error_body(err.status_code, str(err.detail)), err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _params(_: Request, err: RequestValidationError) -> Response:
        return json_error(params_error_body(err.errors()), 400)

    app.add_middleware(ContainErrors, on_error=log_unexpected)


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def refuse_unsupported(data: dict) -> None:
    """OpenAI fields the native engine cannot honour: a clear 400 rather than silence."""
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        if data.get(name) not in (None, 0, 0.0, 1.0 if name == "repetition_penalty" else 0):
            raise InvalidRequestError(f"`{name}` is not supported by the native engine", param=name)
    if data.get("logit_bias"):
        raise InvalidRequestError("`logit_bias` is not supported by the native engine", param="logit_bias")


def refuse_chat_only(data: dict) -> None:
    """Tools and structured outputs are served on /v1/chat/completions only."""
    fmt = data.get("response_format")
    structured = isinstance(fmt, dict) and fmt.get("type") not in (None, "text")
    for name in ("tools", "functions", "tool_choice", "response_format"):
        if data.get(name) and (name != "response_format" or structured):
            raise InvalidRequestError(f"`{name}` is served on /v1/chat/completions, not on /v1/completions",
                                      param=name)


class Worker:
    """Serves OpenAI requests from one engine."""

    def __init__(self, engine: Any, params_cls: Any):
        self.engine = engine
        self.params_cls = params_cls
        self.model = engine.model_name
        self.renderer = S.Renderer(engine.tokenizer, engine.max_context)
        self.metrics = WorkerMetrics(self.model, engine.stats)
        self._seq = itertools.count()
        self.ready = False

    def request_id(self, request: Request) -> str:
        given = request.headers.get("x-request-id")
        return f"{given}.{next(self._seq)}" if given else uuid.uuid4().hex[:16]

    def plan_completion(self, rid: str, data: dict) -> S.RequestPlan:
        req = P.validate_request(P.CompletionRequest, data)
        refuse_unsupported(data)
        refuse_chat_only(data)
        prompts = [self.renderer.encode_text(p) if isinstance(p, str) else p for p in req.prompts()]
        choices = S.build_choices(rid, prompts, req, self.renderer, self.params_cls, req.logprobs)
        return S.RequestPlan(rid, self.model, choices, req.logprobs, req.include_usage(), chat=False)

    def plan_chat(self, rid: str, data: dict) -> S.RequestPlan:
        req = P.validate_request(P.ChatCompletionRequest, data)
        refuse_unsupported(data)
        ids = self.renderer.encode_chat(req.messages, req.tools)
        n_lp = req.num_logprobs()
        tool_plan = T.plan_tools(req)
        choices = S.build_choices(rid, [ids], req, self.renderer, self.params_cls, n_lp, tool_plan)
        return S.RequestPlan(rid, self.model, choices, n_lp, req.include_usage(), chat=True,
                             tool_names=tool_plan.tool_names)

    def on_output(self, plan: S.RequestPlan, choice: S.Choice, out: Any) -> None:
        if plan.num_logprobs is not None and out.delta_logprobs:
            choice.logprobs.extend(out.delta_logprobs)
        if out.finished:
            choice.final = out
            self.metrics.observe_finished(getattr(out, "metrics", None), out.finish_reason)
            logger.info("%s finished choice=%d prompt=%d completion=%d reason=%s", plan.request_id,
                        choice.index, len(choice.prompt_ids), len(out.token_ids), out.finish_reason)

    def count_aborted(self, plan: S.RequestPlan) -> int:
        aborted = [c for c in plan.choices if c.final is None]
        for _ in aborted:
            self.metrics.observe_finished(None, "abort")
        return len(aborted)

    async def serve(self, request: Request, chat: bool) -> Response:
        rid = self.request_id(request)
        data = P.parse_body(await P.read_body(request))
        plan = self.plan_chat(rid, data) if chat else self.plan_completion(rid, data)
        headers = {"x-request-id": rid}
        if data.get("stream"):
            return await self.stream(plan, headers)
        return await self.complete(request, plan, headers)

    async def complete(self, request: Request, plan: S.RequestPlan, headers: dict) -> Response:
        async def collect() -> dict:
            async for choice, out in S.merge(self.engine, plan.choices):
                self.on_output(plan, choice, out)
            return S.full_body(plan, self.renderer)

        work = asyncio.create_task(collect())
        watch = asyncio.create_task(wait_for_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            self.count_aborted(plan)
            logger.info("%s client disconnected; aborted", plan.request_id)
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(work.result(), headers=headers)

    async def stream(self, plan: S.RequestPlan, headers: dict) -> Response:
        outputs = S.merge(self.engine, plan.choices)
        try:  # the first output surfaces engine-side validation errors as a plain 400
            first = await outputs.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await outputs.aclose()
            raise
        chunks = S.ChunkRenderer(plan, self.renderer)

        async def body():
            try:
                for b in chunks.opening():
                    yield b
                item = first
                while item is not None:
                    self.on_output(plan, *item)
                    b = chunks.delta(*item)
                    if b is not None:
                        yield b
                    item = await anext(outputs, None)
                for b in chunks.closing():
                    yield b
            except HybridserveError as err:  # headers are out: report it inside the stream
                logger.warning("%s failed mid-stream: %s", plan.request_id, err.message)
                yield P.sse(err.to_openai())
            finally:
                await outputs.aclose()
                if self.count_aborted(plan):
                    logger.info("%s stream closed early; aborted", plan.request_id)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})


def cpu_report() -> dict:
    """The cores this worker may run on and its torch compute threads (see cpu_binding)."""
    report: dict = {"cpu_cores": format_cores(available_cores())}
    torch = sys.modules.get("torch")
    if torch is not None:
        report["cpu_threads"] = torch.get_num_threads()
    return report


def prefix_cache_health(s: Any) -> dict[str, Any]:
    """/health's view of the engine's prefix cache (EngineStats)."""
    queries = getattr(s, "prefix_cache_queries_total", 0)
    hits = getattr(s, "prefix_cache_hits_total", 0)
    return {"cached_blocks": getattr(s, "num_cached_blocks", 0), "total_blocks": s.num_total_blocks,
            "cached_snapshots": getattr(s, "num_cached_snapshots", 0),
            "snapshot_slots": getattr(s, "num_total_snapshots", 0),
            "queried_tokens": queries, "hit_tokens": hits,
            "hit_rate": round(hits / queries, 4) if queries else None}


def create_app(engine: Any, params_cls: Any = None) -> FastAPI:
    """The worker app; the engine is started and shut down with the app's lifespan."""
    if params_cls is None:
        from hybridserve.engine import SamplingParams as params_cls  # noqa: N813
    worker = Worker(engine, params_cls)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await engine.start()
        worker.ready = True
        logger.info("worker for %s ready (pid %d, cores %s, %s compute threads)", worker.model,
                    os.getpid(), cpu["cpu_cores"], cpu.get("cpu_threads", "?"))
        try:
            yield
        finally:
            worker.ready = False
            await engine.shutdown()

    app = FastAPI(title=f"hybridserve worker: {worker.model}", lifespan=lifespan, redoc_url=None,
                  description="OpenAI's completions and chat over one native engine.")
    app.state.worker = worker
    install_error_handlers(app)
    O.install(app, [O.CompletionBody, O.ChatCompletionBody])
    started = time.time()
    cpu = cpu_report()

    @app.post("/v1/completions", responses=O.answers(O.Completion, 400, 413, 500),
              openapi_extra=O.request_body(O.CompletionBody))
    async def completions(request: Request) -> Response:
        """Complete a prompt (text, token ids, or a batch of either)."""
        return await worker.serve(request, chat=False)

    @app.post("/v1/chat/completions", responses=O.answers(O.ChatCompletion, 400, 413, 500),
              openapi_extra=O.request_body(O.ChatCompletionBody))
    async def chat_completions(request: Request) -> Response:
        """Answer a chat through the model's chat template."""
        return await worker.serve(request, chat=True)

    @app.get("/v1/models", responses={200: {"model": O.ModelList, "description": "this worker's model"}})
    async def models() -> dict:
        """The one model this worker serves, with its context length (`max_model_len`)."""
        card = P.model_card(worker.model, max_model_len=engine.max_context)
        return {"object": "list", "data": [card]}

    @app.get("/health", responses={503: {"description": "the engine is still starting"}})
    async def health() -> Response:
        """Liveness and readiness: the model, pid, uptime, the cores this worker runs on, and what its
        prefix cache holds."""
        body = {"status": "ok" if worker.ready else "starting", "model": worker.model,
                "pid": os.getpid(), "uptime_s": round(time.time() - started, 3), **cpu}
        if worker.ready:
            body["prefix_cache"] = prefix_cache_health(engine.stats())
        return JSONResponse(body, status_code=200 if worker.ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus text exposition of the engine's counters and histograms."""
        return Response(worker.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
