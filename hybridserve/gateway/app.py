"""The gateway app: auth → validation → route + budgets → proxy, plus the read-only endpoints.

Read-only: /v1/models, /v1/economics (the live economics table and each backend's
load), /v1/sessions/{id} (an agent session's calls, tokens, $, escalations, budget
hits and its trajectory: a breakdown by step kind, tool calls, wall time, retries; see
`governor`; only the key that opened a session can read it), /v1/budgets (the caller's key
budgets), /health, /metrics, and the OpenAPI document (/openapi.json, Swagger UI at /docs;
both open without a key, see `hybridserve.openapi`).

The Batch API (/v1/files, /v1/batches; routes in gateway.batch_api): a batch's lines go through
`serve`, the very function behind /v1/completions and /v1/chat/completions, in process.

Every malformed body is a 400 in OpenAI's error shape naming the field (protocol.parse_body
bounds depth, sizes and text before validation); an unexpected exception is a 500 in the
same shape that leaves the client's kept-alive connection usable (errors.ContainErrors).

Every response (errors included) carries `x-hybridserve-request-id` and
`x-hybridserve-backend` (the backend that served it, or `gateway` when none did);
a client may choose the request id with `x-request-id`. The id goes upstream in
`x-request-id` and starts every log line about the request.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
import uuid
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybridserve.config import GatewayConfig, HybridserveConfig
from hybridserve import openapi as O
from hybridserve import protocol as P
from hybridserve.errors import (ContainErrors, HybridserveError, error_bytes, http_error_body,
                                params_error_body)
from hybridserve.gateway import batch_api
from hybridserve.gateway.admission import admit
from hybridserve.gateway.batch_runner import BatchRunner
from hybridserve.gateway.call import Calls, store_io
from hybridserve.gateway.governor import Sessions
from hybridserve.gateway.ledger import Ledger
from hybridserve.gateway.routing import Router
from hybridserve.gateway.auth import KeyChecker
from hybridserve.gateway.metrics import GatewayMetrics
from hybridserve.gateway.proxy import Proxy
from hybridserve.gateway.ratelimit import rate_limiter
from hybridserve.gateway.registry import Registry
from hybridserve.gateway.shared_state import RedisLedger, RedisSessions, connect

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = P.MAX_BODY_BYTES  # a larger body is a 413 before anything else happens
_RID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_NOT_IN_HEADERS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]+")   # what h11 refuses in a header value


def header_value(v: str | bytes) -> bytes:
    """A header value h11 will send: latin-1 ('?' for the rest), control characters (CR, LF,
    NUL, ...) as one space, no surrounding whitespace. A value it refuses would fail the
    response after uvicorn counts it as started: no answer, and the connection closed."""
    raw = v.encode("latin-1", "replace") if isinstance(v, str) else v
    return _NOT_IN_HEADERS.sub(b" ", raw).strip(b" \t")


class RequestContext:
    """Raw ASGI middleware: request id and start time in, hybridserve headers out (every
    header value made sendable, since receipts echo request text such as a task tag)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v.decode("latin-1")
                break
        if not rid or not _RID_OK.match(rid):
            rid = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state.update(request_id=rid, backend="gateway", t0=time.perf_counter())

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, header_value(v)) for k, v in message.get("headers", ())]
                headers.append((b"x-hybridserve-request-id", rid.encode()))
                headers.append((b"x-hybridserve-backend", header_value(state["backend"])))
                for k, v in (state.get("receipt") or {}).items():
                    headers.append((k.encode(), header_value(v)))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


read_body = P.read_body


def json_error(body: dict, status: int, headers: dict[str, str] | None = None) -> Response:
    """An OpenAI error body as ASCII JSON (`errors.error_bytes`), with the error's headers
    (Retry-After on an overload 429)."""
    return Response(error_bytes(body), status_code=status, media_type="application/json", headers=headers)


def http_client() -> httpx.AsyncClient:
    """The client for health checks (requests go through `upstream.Pool` instead)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False,
                             limits=httpx.Limits(max_connections=64, keepalive_expiry=4.0))


def budget_stores(gw: GatewayConfig) -> tuple[Ledger | RedisLedger | None, Sessions | RedisSessions]:
    """The key ledger (None without budgets) and the session book: local (SQLite and memory),
    or in Redis when `state_url` is set so that every replica enforces the same caps."""
    if gw.state_url is None:
        return (Ledger(gw.ledger_path, gw.budgets) if gw.budgets else None,
                Sessions(gw.session_max_tokens, gw.session_max_usd))
    client = connect(gw.state_url, gw.state_timeout_s)   # one pool for both; closed with the sessions
    opts = {"prefix": gw.state_prefix, "timeout_s": gw.state_timeout_s,
            "lease_s": 2 * gw.request_timeout_s + 60, "client": client}
    return (RedisLedger(gw.state_url, gw.budgets, **opts) if gw.budgets else None,
            RedisSessions(gw.state_url, gw.session_max_tokens, gw.session_max_usd, **opts))


def create_app(cfg: HybridserveConfig, *, poll_interval_s: float = 1.0) -> RequestContext:
    """Build the gateway for a config; raises ConfigError at once if auth is misconfigured."""
    keys = KeyChecker(cfg.gateway)
    registry = Registry.from_config(cfg)
    router = Router(cfg, registry)
    ledger, sessions = budget_stores(cfg.gateway)
    limiter = rate_limiter(cfg.gateway.rate_limits, cfg.gateway.state_prefix, getattr(sessions, "r", None))
    calls = Calls(cfg, router, ledger, sessions, limiter)
    metrics = GatewayMetrics(registry, router, sessions, cfg.gateway.step_tiers)
    holder: dict[str, Proxy] = {}
    files, batches, close_batch_stores = batch_api.stores(cfg.gateway)

    async def serve(request: Request, path: str, raw: bytes, key_id: str | None, owner: str) -> Response:
        """One completion or chat request, from the HTTP route or a batch line: admission,
        route and budgets, proxy."""
        adm = admit(raw, path == "/v1/chat/completions", registry)
        call = await calls.open(adm, request.headers, key_id, owner)
        return await holder["proxy"].forward(request, call, path)

    # the batch lease holder: this host and port, so a gateway restarted in place resumes its own at once
    runner = BatchRunner(batches, files, batch_api.executor(serve), cfg.gateway.batch_concurrency,
                         on_line=metrics.batch_line, holder=f"{socket.gethostname()}:{cfg.gateway.port}")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        client = http_client()
        holder["proxy"] = Proxy(registry, metrics, cfg.gateway.request_timeout_s)
        await registry.poll_once(client)
        poller = asyncio.create_task(registry.run_poller(client, poll_interval_s))
        runner.resume()
        for b in registry.backends.values():
            logger.info("backend %s (%s, %s) at %s: %s", b.name, b.config.arch, b.config.engine,
                        b.url, "up" if b.healthy else f"down ({b.last_error})")
        if isinstance(sessions, RedisSessions):
            why = await sessions.ping()
            logger.log(logging.WARNING if why else logging.INFO, "budgets and sessions shared through %s: %s",
                       sessions.where, f"NOT reachable ({why}); budget checks answer 503 until it is"
                       if why else "reachable")
        try:
            yield
        finally:
            await runner.stop()
            close_batch_stores()
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await client.aclose()
            holder["proxy"].close()
            if ledger is not None:
                await store_io(ledger.close)
            if isinstance(sessions, RedisSessions):
                await sessions.close()
                await sessions.r.aclose()

    app = FastAPI(title="hybridserve gateway", lifespan=lifespan, redoc_url=None,
                  description="OpenAI-compatible gateway: auth, validation, routing, budgets, proxy.")
    app.state.registry = registry
    completion_body, chat_body = O.gateway_bodies(list(cfg.gateway.thinking_budgets))
    O.install(app, [completion_body, chat_body, O.BatchCreateRequest], bearer=keys.required)
    v1_errors = O.errors(401, 500) if keys.required else O.errors(500)
    gen_errors = (400, *((401,) if keys.required else ()), 404, 413, 429, 500, 502, 503, 504)

    def error_json(request: Request, err: HybridserveError) -> Response:
        backend = getattr(request.state, "backend", "gateway")
        metrics.errors.labels(backend, err.error_type).inc()
        metrics.requests.labels(backend, request.url.path, str(err.status_code)).inc()
        logger.info("%s %s -> %s %d %s: %s", getattr(request.state, "request_id", "-"),
                    request.url.path, backend, err.status_code, err.error_type, err.message)
        return json_error(err.to_openai(), err.status_code, err.headers())

    @app.exception_handler(HybridserveError)
    async def _typed(request: Request, err: HybridserveError) -> Response:
        return error_json(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> Response:
        return json_error(http_error_body(err.status_code, str(err.detail)), err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _params(_: Request, err: RequestValidationError) -> Response:
        return json_error(params_error_body(err.errors()), 400)

    def unexpected(scope: dict, err: Exception) -> None:
        state = scope.get("state") or {}
        backend = state.get("backend", "gateway")
        metrics.errors.labels(backend, "server_error").inc()
        metrics.requests.labels(backend, scope.get("path", "-"), "500").inc()
        logger.error("%s unexpected error", state.get("request_id", "-"), exc_info=err)

    app.add_middleware(ContainErrors, on_error=unexpected)

    async def handle(request: Request, path: str) -> Response:
        key_id = keys.check(request.headers.get("authorization"))
        raw = await read_body(request)
        return await serve(request, path, raw, key_id, keys.tenant(key_id))

    @app.post("/v1/completions", responses=O.answers(O.Completion, *gen_errors),
              openapi_extra=O.request_body(completion_body, parameters=O.GATEWAY_HEADERS))
    async def completions(request: Request) -> Response:
        """Complete a prompt on the backend the model name, the routing policy and the budgets choose."""
        return await handle(request, "/v1/completions")

    @app.post("/v1/chat/completions", responses=O.answers(O.ChatCompletion, *gen_errors),
              openapi_extra=O.request_body(chat_body, parameters=O.GATEWAY_HEADERS))
    async def chat_completions(request: Request) -> Response:
        """Answer a chat on the backend the model name, the routing policy and the budgets choose."""
        return await handle(request, "/v1/chat/completions")

    @app.get("/v1/models", responses={200: {"model": O.ModelList, "description": "every backend and alias"},
                                      **v1_errors})
    async def models(request: Request) -> dict:
        """The backends and aliases a request may name as `model`."""
        keys.check(request.headers.get("authorization"))
        return {"object": "list", "data": registry.cards()}

    @app.get("/v1/economics", responses=v1_errors)
    async def economics(request: Request) -> dict:
        """The live economics table (price, speed, cost per token) and each backend's load."""
        keys.check(request.headers.get("authorization"))
        return router.economics()

    @app.get("/v1/sessions/{session_id}", responses={**v1_errors, **O.errors(404)})
    async def session(request: Request, session_id: str) -> dict:
        """A session as its own key sees it; to every other key it does not exist (404)."""
        key_id = keys.check(request.headers.get("authorization"))
        s = await store_io(calls.sessions.get, session_id, keys.tenant(key_id))
        if s is None:
            raise StarletteHTTPException(404, f"no session '{session_id}' has made a call here")
        return s.as_json(calls.sessions.max_tokens, calls.sessions.max_usd)

    @app.get("/v1/budgets", responses=v1_errors)
    async def budgets(request: Request) -> dict:
        """The caller's key budgets: caps, spent and reserved, and when each resets."""
        key_id = keys.check(request.headers.get("authorization"))
        return {"object": "list", "data": await store_io(ledger.status, key_id) if ledger is not None else []}

    batch_api.install(app, keys, files, batches, runner, v1_errors)

    @app.get("/health")
    async def health() -> Response:
        """`ok` while any backend is healthy, else `degraded`; each backend's health and load."""
        backends = {b.name: {"healthy": b.healthy, "url": b.url, "load": b.load(),
                             **({"error": b.last_error} if not b.healthy else {})}
                    for b in registry.backends.values()}
        ok = any(b.healthy for b in registry.backends.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "backends": backends})

    @app.get("/prometheus/targets")
    async def prometheus_targets() -> JSONResponse:
        """Prometheus `http_sd_configs` endpoint: every worker, labelled (deploy/prometheus)."""
        return JSONResponse(registry.prometheus_targets())

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus text exposition: requests, errors, latency, tokens, $, sessions."""
        if isinstance(sessions, RedisSessions):
            try:
                await sessions.refresh_totals()
            except HybridserveError as e:   # the session gauges are left out of this scrape
                logger.warning("session gauges skipped: %s", e.message)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    wrapped = RequestContext(app)
    wrapped.state = app.state
    return wrapped


def serve_gateway(cfg: HybridserveConfig, host: str | None = None, port: int | None = None,
                  log_level: str = "info") -> None:
    """Run the gateway in this process until SIGINT/SIGTERM (in-flight requests drain)."""
    import uvicorn

    if port:
        cfg = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"port": port})})
    app = create_app(cfg)
    uvicorn.run(app, host=host or cfg.gateway.host, port=cfg.gateway.port,
                log_level=log_level, access_log=False, timeout_keep_alive=75,
                timeout_graceful_shutdown=30, lifespan="on")
