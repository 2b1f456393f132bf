"""A minimal OpenAI-compatible upstream for gateway tests (an `engine: remote` stand-in).

Behaviour is chosen by the request: `max_tokens` is the number of streamed chunks,
`"delay_s"` (extra field) sleeps before answering or between chunks, `"crash_after"`
breaks a stream after that many chunks; `n` answers n identical choices. /stats tells
how many streams started, finished and were cut off by the client, so tests can
see that a disconnect at the gateway reaches the upstream, and holds the last request
body (`last_body`), so tests can see what the gateway forwarded. With LOGPROB given,
every answered token has that logprob when the request asks for logprobs.

With `"mock_fill": true` an answer generates as much as it is allowed: n choices per
prompt (a list of prompts is a batch), each `max_tokens` completion tokens long
(FILL_UNCAPPED when the request has none, an upstream's own long default), and usage counts
one prompt token per prompt byte (a token-id prompt: one per id) and FILL_DEVICE_S
device-seconds per completion token, so budget tests see the worst case a real engine could
produce. A filled stream sends FILL_ROUNDS events per choice (`delay_s` apart), then, when
`stream_options.include_usage` asks, one usage event with the same counts. With
`"mock_logprob": x` a filled answer that asks for logprobs gets tokens of logprob x.
A string `"mock_tag"` is counted in /stats `tags` (how many requests carried each tag), so
tests can see how often the gateway sent one request (a batch line, say).
With `"mock_tool_calls": k` the answer is a chat completion whose message asks for k tool
calls (`finish_reason: "tool_calls"`); streamed, each call comes as two deltas (id and name,
then its arguments), then a usage event when `stream_options.include_usage` asks; its usage
counts 5 prompt tokens (3 of them cached) and 7 completion tokens per call. With
`"mock_saturate": [names]` a mock whose NAME is listed answers 429 `queue_full`, as a worker
with a full queue does.

Run: python tests/serving/mock_upstream.py PORT NAME [LOGPROB]
"""
from __future__ import annotations

import asyncio
import json
import sys

import uvicorn

FILL_UNCAPPED = 1000
FILL_DEVICE_S = 1e-4
FILL_ROUNDS = 3

STATS = {"requests": 0, "streams_started": 0, "streams_finished": 0, "streams_cut": 0,
         "last_request_id": None, "last_authorization": None, "last_body": None, "tags": {}}


async def _body(receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _json(send, status: int, obj) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _choice(i: int, name: str, req: dict, logprob: float | None) -> dict:
    lp = None
    if logprob is not None and req.get("logprobs") is not None:
        lp = {"tokens": ["hello", " from"], "token_logprobs": [logprob, logprob], "top_logprobs": None,
              "text_offset": [0, 5]}
    return {"index": i, "text": f"hello from {name}", "logprobs": lp, "finish_reason": "stop"}


def make_app(name: str, logprob: float | None = None):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        path = scope["path"]
        headers = dict(scope["headers"])
        if path == "/metrics":
            text = f"vllm:num_requests_running{{model_name=\"{name}\"}} 0.0\n"
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": text.encode()})
            return
        if path == "/stats":
            return await _json(send, 200, STATS)
        if path == "/v1/models":
            return await _json(send, 200, {"object": "list", "data": [{"id": name, "object": "model"}]})
        req = json.loads(await _body(receive))
        STATS["requests"] += 1
        STATS["last_body"] = req
        if isinstance(req.get("mock_tag"), str):
            STATS["tags"][req["mock_tag"]] = STATS["tags"].get(req["mock_tag"], 0) + 1
        STATS["last_request_id"] = headers.get(b"x-request-id", b"").decode()
        STATS["last_authorization"] = headers.get(b"authorization", b"").decode() or None
        delay = float(req.get("delay_s", 0.0))
        if name in (req.get("mock_saturate") or ()):
            return await _json(send, 429, {"error": {"message": "queue full", "type": "rate_limit_error",
                                                     "param": None, "code": "queue_full"}})
        if req.get("mock_tool_calls"):
            return await _tool_calls(send, receive, name, req, delay)
        if req.get("stream") and req.get("mock_fill"):
            return await _filled_stream(send, receive, name, req, delay)
        if req.get("stream"):
            return await _stream(send, receive, name, int(req.get("max_tokens") or 4), delay,
                                 req.get("crash_after"))
        await asyncio.sleep(delay)
        if req.get("mock_fill"):
            return await _json(send, 200, _filled(name, req))
        await _json(send, 200, {
            "id": "cmpl-mock", "object": "text_completion", "created": 0, "model": name,
            "choices": [_choice(i, name, req, logprob) for i in range(int(req.get("n") or 1))],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})

    return app


def _filled(name: str, req: dict) -> dict:
    """The `mock_fill` answer: every choice as long as max_tokens allows."""
    p = req.get("prompt", "")
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    per = int(req.get("max_tokens") or req.get("max_completion_tokens") or FILL_UNCAPPED)
    lp = req.get("mock_logprob")
    logprobs = None
    if lp is not None and req.get("logprobs") is not None:
        logprobs = {"tokens": ["x"] * 4, "token_logprobs": [lp] * 4, "top_logprobs": None, "text_offset": [0, 1, 2, 3]}
    choices = [{"index": i, "text": "x" * per, "logprobs": logprobs, "finish_reason": "length"}
               for i in range(len(prompts) * int(req.get("n") or 1))]
    prompt = sum(len(q.encode()) if isinstance(q, str) else len(q) for q in prompts)
    completion = per * len(choices)
    return {"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": name, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion, "device_seconds": completion * FILL_DEVICE_S}}


async def _filled_stream(send, receive, name: str, req: dict, delay: float) -> None:
    """The `mock_fill` answer as a stream: FILL_ROUNDS events per choice, then its usage."""
    answer = _filled(name, req)
    events = []
    for r in range(FILL_ROUNDS):
        for c in answer["choices"]:
            events.append({"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": name,
                           "choices": [{"index": c["index"], "text": "x", "logprobs": None,
                                        "finish_reason": "length" if r + 1 == FILL_ROUNDS else None}]})
    if (req.get("stream_options") or {}).get("include_usage"):
        events.append({"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": name,
                       "choices": [], "usage": answer["usage"]})
    await _send_events(send, receive, events, delay)


async def _send_events(send, receive, events, delay: float) -> None:
    """Stream `events` (an iterable of dicts, which may raise mid-way) as SSE, `delay` apart, then
    [DONE]; stop early when the client disconnects, counting how the stream ended in STATS."""
    STATS["streams_started"] += 1
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    disconnected = asyncio.ensure_future(receive())
    try:
        for event in events:
            body = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
            await send({"type": "http.response.body", "more_body": True, "body": body})
            done, _ = await asyncio.wait({disconnected}, timeout=delay or 0)
            if done and disconnected.result()["type"] == "http.disconnect":
                STATS["streams_cut"] += 1
                return
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        STATS["streams_finished"] += 1
    finally:
        disconnected.cancel()


def _tool_call(j: int) -> dict:
    return {"index": j, "id": f"call_{j}", "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"key": f"k{j}"})}}


async def _tool_calls(send, receive, name: str, req: dict, delay: float) -> None:
    """The `mock_tool_calls` answer: a chat message asking for k tool calls, whole or streamed."""
    k = int(req["mock_tool_calls"])
    usage = {"prompt_tokens": 5, "completion_tokens": 7 * k, "total_tokens": 5 + 7 * k,
             "prompt_tokens_details": {"cached_tokens": 3}}
    head = {"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": name}
    if not req.get("stream"):
        calls = [{k_: v for k_, v in _tool_call(j).items() if k_ != "index"} for j in range(k)]
        return await _json(send, 200, {**head, "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": calls},
             "finish_reason": "tool_calls"}]})
    chunk = {**head, "object": "chat.completion.chunk"}
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None},
                                     "finish_reason": None}]}]
    for j in range(k):
        call = _tool_call(j)
        first = {**call, "function": {"name": "lookup", "arguments": ""}}
        rest = {"index": j, "function": {"arguments": call["function"]["arguments"]}}
        events += [{**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [d]}, "finish_reason": None}]}
                   for d in (first, rest)]
    events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    if (req.get("stream_options") or {}).get("include_usage"):
        events.append({**chunk, "choices": [], "usage": usage})
    await _send_events(send, receive, events, delay)


async def _stream(send, receive, name: str, n: int, delay: float, crash_after: int | None) -> None:
    def chunks():
        for i in range(n):
            if crash_after is not None and i == crash_after:
                raise RuntimeError("mock upstream crashes mid-stream")
            yield {"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": name,
                   "choices": [{"index": 0, "text": f"t{i} ", "logprobs": None,
                                "finish_reason": "length" if i == n - 1 else None}]}

    await _send_events(send, receive, chunks(), delay)


if __name__ == "__main__":
    port, name = int(sys.argv[1]), sys.argv[2]
    lp = float(sys.argv[3]) if len(sys.argv) > 3 else None
    uvicorn.run(make_app(name, lp), host="127.0.0.1", port=port, log_level="warning")
