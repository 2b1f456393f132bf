"""What the proxy relays besides answers: streams with their usage tapped, and saturated backends.

`tap_usage` passes a backend's SSE bytes through as they come, amends only the event
that carries `usage` (the receipt) and shows the events whose deltas carry tool calls to
the call's outcome (the session counts them); `RelayResponse` releases the upstream
stream however the client's response ends; `saturation` reads a worker's (or vLLM's) overload answer, 429
`queue_full`, as `Saturated`, which the proxy answers by trying the next candidate.
"""
from __future__ import annotations

import json
import re

from starlette.responses import StreamingResponse

from hybridserve import protocol as P
from hybridserve.errors import OverloadedError
from hybridserve.gateway.registry import BackendState


class Saturated(OverloadedError):
    """A backend refused with 429 `queue_full`: the next candidate is tried; left uncaught (a
    cascade step, a pinned backend) it is the client's 429 with the backend's Retry-After."""

    def __init__(self, backend: str, retry_after_s: float):
        super().__init__(f"backend '{backend}' is saturated (its queue is full); retry later",
                         retry_after_s, code="queue_full")
        self.backend = backend


def saturation(b: BackendState, status: int, headers: dict[bytes, bytes], body: bytes) -> Saturated | None:
    """A worker's (or vLLM's) overload answer as `Saturated`; None for any other answer,
    a budget 429 included."""
    if status != 429:
        return None
    try:
        code = (json.loads(body).get("error") or {}).get("code")
    except (ValueError, AttributeError):
        return None
    if code != "queue_full":
        return None
    try:
        retry = float(headers.get(b"retry-after", b"1"))
    except ValueError:
        retry = 1.0
    return Saturated(b.name, retry)


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
_TOOL_CALLS = re.compile(rb'"tool_calls"\s*:\s*\[\s*\{')   # a delta that carries tool calls


def _as_is(event: bytes, keep_usage: bool) -> bytes:
    """Event bytes passed on unparsed (less the `"usage":null` when the client did not ask for usage)."""
    return event if keep_usage else event.replace(_NULL_USAGE, b"")


def _plain(event: bytes) -> bool:
    """An event the relay passes as it is: it carries neither usage nor tool calls."""
    return _USAGE not in event and _TOOL_CALLS.search(event) is None


async def tap_usage(chunks, on_usage, keep_usage: bool, on_tool_calls=None):
    """Relay SSE bytes as they come; the event that carries `usage` goes through `on_usage`
    (which returns it amended with the receipt), and with `on_tool_calls` each event whose
    deltas carry tool calls is shown to it (parsed; passed on as it came). With `keep_usage`
    false (the gateway asked for usage, not the client) the usage event and the `"usage":null`
    of other chunks are dropped. Whole events with neither pass as they are, unparsed."""
    buf = b""
    async for chunk in chunks:
        if not buf and chunk.endswith(b"\n\n") and _plain(chunk):
            yield _as_is(chunk, keep_usage)
            continue
        buf += chunk
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            continue
        done, buf = buf[:cut + 2], buf[cut + 2:]
        out = [_relay_event(event, on_usage, keep_usage, on_tool_calls)
               for event in done.split(b"\n\n")[:-1]]
        if any(out):
            yield b"".join(out)
    if buf:
        yield buf


def _relay_event(event: bytes, on_usage, keep_usage: bool, on_tool_calls) -> bytes:
    """One whole SSE event as the client gets it (b"" when it is dropped)."""
    if _plain(event) or not event.startswith(b"data: {"):
        return _as_is(event, keep_usage) + b"\n\n"
    obj = json.loads(event[6:])
    if on_tool_calls is not None and _TOOL_CALLS.search(event):
        on_tool_calls(obj)
    if isinstance(obj.get("usage"), dict):
        obj["usage"] = on_usage(obj["usage"])
    elif _USAGE not in event:          # tool calls only: the event goes on unchanged
        return _as_is(event, keep_usage) + b"\n\n"
    if keep_usage:
        return P.sse(obj)
    if obj.get("choices"):
        obj.pop("usage", None)
        return P.sse(obj)
    return b""
