"""A minimal OpenAI-compatible upstream for gateway tests (an `engine: remote` stand-in).

Behaviour is chosen by the request: `max_tokens` is the number of streamed chunks,
`"delay_s"` (extra field) sleeps before answering or between chunks, `"crash_after"`
breaks a stream after that many chunks. /stats tells
how many streams started, finished and were cut off by the client, so tests can
see that a disconnect at the gateway reaches the upstream.

Run: python tests/serving/mock_upstream.py PORT NAME
"""
from __future__ import annotations

import asyncio
import json
import sys

import uvicorn

STATS = {"requests": 0, "streams_started": 0, "streams_finished": 0, "streams_cut": 0,
         "last_request_id": None, "last_authorization": None}


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


def make_app(name: str):
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
        STATS["last_request_id"] = headers.get(b"x-request-id", b"").decode()
        STATS["last_authorization"] = headers.get(b"authorization", b"").decode() or None
        delay = float(req.get("delay_s", 0.0))
        if req.get("stream"):
            return await _stream(send, receive, name, int(req.get("max_tokens") or 4), delay,
                                 req.get("crash_after"))
        await asyncio.sleep(delay)
        await _json(send, 200, {
            "id": "cmpl-mock", "object": "text_completion", "created": 0, "model": name,
            "choices": [{"index": 0, "text": f"hello from {name}", "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})

    return app


async def _stream(send, receive, name: str, n: int, delay: float, crash_after: int | None) -> None:
    STATS["streams_started"] += 1
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    disconnected = asyncio.ensure_future(receive())
    try:
        for i in range(n):
            if crash_after is not None and i == crash_after:
                raise RuntimeError("mock upstream crashes mid-stream")
            chunk = {"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": name,
                     "choices": [{"index": 0, "text": f"t{i} ", "logprobs": None,
                                  "finish_reason": "length" if i == n - 1 else None}]}
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + json.dumps(chunk).encode() + b"\n\n"})
            done, _ = await asyncio.wait({disconnected}, timeout=delay or 0)
            if done and disconnected.result()["type"] == "http.disconnect":
                STATS["streams_cut"] += 1
                return
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        STATS["streams_finished"] += 1
    finally:
        disconnected.cancel()


if __name__ == "__main__":
    port, name = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(make_app(name), host="127.0.0.1", port=port, log_level="warning")
