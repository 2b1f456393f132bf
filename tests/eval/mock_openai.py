"""An OpenAI-compatible mock for eval tests: answers from an oracle, per model behaviour.

`oracle` maps a question (the last user message, or the prompt) to its right answer.

- `good`: always right, mean logprob -0.05, cost $0.004 per request.
- `half`: right on every other question of the oracle (in its insertion order) with
  logprob -0.1, else "I am not sure" with logprob -2.0; cost $0.001.
- `flaky`: HTTP 500 on odd questions, else a wrong answer without logprobs; no cost.
- `judge`: PASS when the candidate answer contains the reference, else FAIL.

Also serves /v1/models (good, half backends plus an `auto` alias), /health, /metrics.
`MockServer` runs it with uvicorn in a thread; `counts` tells requests per model.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter

import uvicorn

from tests.serving.mock_upstream import _body as _read  # one ASGI body reader for both mocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MockServer:
    def __init__(self, oracle: dict[str, str], backends=("good", "half")):
        self.oracle, self.order = oracle, {q: i for i, q in enumerate(oracle)}
        self.backends, self.counts, self.bodies = backends, Counter(), []
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off", interface="asgi3"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "MockServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def answer(self, model: str, question: str, body: dict) -> tuple[int, str, float | None, float]:
        right = self.oracle.get(question, "unknown")
        idx = self.order.get(question, 0)
        if model == "judge":
            m = re.search(r"Reference answer:\n(.*?)\n\nCandidate answer:\n(.*?)\n\nPASS", question, re.S)
            ok = bool(m) and m.group(1).lower() in m.group(2).lower()
            return 200, ("PASS\nit matches" if ok else "FAIL\nit does not match"), None, 0.0
        if model == "good" or model == "auto":
            return 200, right, -0.05, 0.004
        if model == "half":
            return (200, right, -0.1, 0.001) if idx % 2 == 0 else (200, "I am not sure", -2.0, 0.001)
        if model == "flaky":
            return (500, "upstream exploded", None, 0.0) if idx % 2 else (200, "wrong", None, 0.0)
        return 404, f"no model {model}", None, 0.0

    async def app(self, scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path in ("/health", "/metrics"):
            return await _send(send, 200, {"status": "ok"})
        if path.endswith("/models"):
            data = [{"id": b, "object": "model", "owned_by": "hybridserve"} for b in self.backends]
            data.append({"id": "auto", "object": "model", "owned_by": "hybridserve-alias",
                         "backends": list(self.backends)})
            return await _send(send, 200, {"object": "list", "data": data})
        body = json.loads(await _read(receive))
        self.bodies.append(body)
        model = body.get("model", "")
        self.counts[model] += 1
        chat = path.endswith("/chat/completions")
        question = body["messages"][-1]["content"] if chat else body.get("prompt", "")
        status, text, lp, cost = self.answer(model, question, body)
        await asyncio.sleep(0.001)
        if status != 200:
            return await _send(send, status, {"error": {"message": text, "type": "server_error"}})
        await _send(send, 200, _completion(model, text, lp, cost, chat), {"x-hybridserve-backend": model})


def _completion(model: str, text: str, lp: float | None, cost: float, chat: bool) -> dict:
    toks = text.split() or [""]
    if chat:
        logprobs = {"content": [{"token": t, "logprob": lp, "top_logprobs": []} for t in toks]} if lp else None
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": "stop"}
    else:
        logprobs = {"tokens": toks, "token_logprobs": [lp] * len(toks)} if lp else None
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "stop"}
    usage = {"prompt_tokens": 10, "completion_tokens": len(toks), "total_tokens": 10 + len(toks)}
    if cost:
        usage.update(cost_usd=cost, route_backend=model)
    return {"id": "x", "object": "chat.completion" if chat else "text_completion", "model": model,
            "choices": [choice], "usage": usage}




async def _send(send, status: int, obj, headers: dict | None = None) -> None:
    hdrs = [(b"content-type", b"application/json")] + [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": json.dumps(obj).encode()})
