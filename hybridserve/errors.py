"""Typed errors shared by engine, worker and gateway, and their OpenAI error JSON.

Every error the stack raises on purpose is a `HybridserveError` carrying an HTTP
status, an OpenAI error `type` and, where it helps, the offending `param`. The
HTTP layers turn them into OpenAI's error shape in one place (`to_openai`), rendered
as ASCII JSON (`error_bytes`) so that no echoed input can make the error itself fail.
`ContainErrors` keeps an unexpected exception from reaching the HTTP server, which
would close the client's kept-alive connection.
"""
from __future__ import annotations

import json
import math
from typing import Any, Awaitable, Callable


class HybridserveError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error type."""

    status_code: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict[str, Any]:
        """The body OpenAI returns for an error: {"error": {message, type, param, code}}."""
        return openai_error_body(self.message, self.error_type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        """Response headers the error carries (Retry-After for overload)."""
        return {}


def openai_error_body(message: str, error_type: str, param: str | None = None,
                      code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def http_error_body(status_code: int, detail: str) -> dict[str, Any]:
    """A framework-level HTTP error (unknown route, wrong method) in OpenAI's shape."""
    kind = "not_found_error" if status_code == 404 else "invalid_request_error"
    return openai_error_body(detail, kind)


def params_error_body(problems: list[dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's own parameter validation (pydantic's error list) as a 400 naming the first one;
    no route declares typed parameters today, so this only guards future ones."""
    first = problems[0] if problems else {}
    loc = [str(p) for p in first.get("loc", ())]
    msg = str(first.get("msg", "invalid request"))
    return openai_error_body(f"{'.'.join(loc)}: {msg}" if loc else msg, "invalid_request_error",
                             loc[-1] if loc else None)


def internal_error_body(err: BaseException) -> dict[str, Any]:
    """An unexpected exception, named but not detailed (the log has the traceback)."""
    return openai_error_body(f"internal error: {type(err).__name__}", "server_error")


def error_bytes(body: dict[str, Any]) -> bytes:
    """An error body as ASCII JSON: a lone surrogate or odd byte echoed in a message is
    escaped, never an encoding failure of its own."""
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ContainErrors:
    """ASGI middleware: an unexpected exception becomes a 500 with OpenAI error JSON and goes
    no further, so the client's kept-alive connection stays usable.

    Install it with `app.add_middleware` (it then sits under Starlette's ServerErrorMiddleware,
    which would send its own 500 and then re-raise into the server, and uvicorn answers a
    raised exception by closing the connection: the client's next, innocent request fails).
    Nothing sent yet: the 500 JSON is sent. The answer already complete: nothing more to do.
    An answer half sent: the exception is re-raised, since dropping the connection is the only
    honest end of a half-sent body. `on_error(scope, err)` is told of every one (to log it)."""

    def __init__(self, app: Any, on_error: Callable[[dict, Exception], None] | None = None):
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = finished = False

        async def tracked(message: dict) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            if self.on_error is not None:
                self.on_error(scope, err)
            if started and not finished:
                raise
            if not started:
                body = error_bytes(internal_error_body(err))
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})


class InvalidRequestError(HybridserveError):
    """The request itself is wrong (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt (plus requested tokens) does not fit the model's context (400)."""

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class ModelNotFoundError(HybridserveError):
    """The `model` names no backend or alias (404)."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str):
        super().__init__(message, param="model", code="model_not_found")


class AuthenticationError(HybridserveError):
    status_code = 401
    error_type = "authentication_error"


class RateLimitError(HybridserveError):
    status_code = 429
    error_type = "rate_limit_error"


class OverloadedError(RateLimitError):
    """No capacity now (429): a full queue, or every candidate backend saturated. `Retry-After`
    says when to come back; `code` names the cause (`queue_full`, `all_backends_saturated`)."""

    def __init__(self, message: str, retry_after_s: float, *, code: str = "queue_full"):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class BackendUnavailableError(HybridserveError):
    """The backend is down or not ready (503)."""

    status_code = 503
    error_type = "service_unavailable"


class StateUnavailableError(HybridserveError):
    """The store the gateway replicas share (Redis) did not answer: budgets cannot be checked (503)."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str):
        super().__init__(message, code="state_unavailable")


class UpstreamError(HybridserveError):
    """The backend answered with garbage or crashed mid-request (502)."""

    status_code = 502
    error_type = "bad_gateway"


class PayloadTooLargeError(HybridserveError):
    """The request body is larger than the gateway accepts (413)."""

    status_code = 413
    error_type = "invalid_request_error"


class GatewayTimeoutError(HybridserveError):
    """The backend did not answer within the gateway's request timeout (504)."""

    status_code = 504
    error_type = "timeout"


class EngineCapacityError(HybridserveError):
    """The request can never fit the engine's cache, even alone (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class UnsupportedModelError(HybridserveError):
    """A checkpoint uses a feature the native engine cannot serve (raised at load)."""

    status_code = 500
    error_type = "server_error"


class BudgetExceededError(RateLimitError):
    """A per-key or per-session budget has run out (429); the message says which and when it resets."""

    def __init__(self, message: str, *, code: str = "budget_exceeded"):
        super().__init__(message, code=code)
