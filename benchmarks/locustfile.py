"""Mixed workload against the gateway: short chats, long documents, streaming and not.

    make load                                   # headless, bounded, against http://127.0.0.1:8000
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000   # with the web UI

Env: HYBRIDSERVE_API_KEY (sent as a bearer token when set), HYBRIDSERVE_MODEL
(default `auto`, so the router picks the backend), HYBRIDSERVE_LONG_TOKENS
(length of the long documents, default 2048 bytes = tokens for the built-ins).
Streaming requests report time-to-first-token as their own locust entry.
"""
import json
import os
import random
import time

from locust import HttpUser, between, events, task

MODEL = os.environ.get("HYBRIDSERVE_MODEL", "auto")
LONG = int(os.environ.get("HYBRIDSERVE_LONG_TOKENS", "2048"))
WORDS = ("serving routing hybrid mamba attention cache tokens budget latency context decode prefill "
         "state memory throughput cost gateway worker engine kernel").split()


def _text(n_chars: int, rng: random.Random) -> str:
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


class GatewayUser(HttpUser):
    wait_time = between(0.2, 1.0)

    def on_start(self):
        key = os.environ.get("HYBRIDSERVE_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.rng = random.Random()

    def _chat(self, content: str, max_tokens: int, stream: bool, name: str):
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0.7, "stream": stream}
        if not stream:
            with self.client.post("/v1/chat/completions", json=body, headers=self.headers, name=name,
                                  catch_response=True) as resp:
                if resp.status_code != 200 or "choices" not in resp.text:
                    resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            return
        start = time.perf_counter()
        first = None
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, name=name, stream=True,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            for line in resp.iter_lines():
                if line and line.startswith(b"data: ") and line != b"data: [DONE]":
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices"):
                        first = time.perf_counter()
            if first is None:
                resp.failure("stream carried no choices")
                return
        events.request.fire(request_type="TTFT", name=name, response_time=(first - start) * 1000,
                            response_length=0, exception=None, context={})

    @task(6)
    def short_chat(self):
        self._chat(_text(self.rng.randint(40, 200), self.rng), 24, stream=False, name="short chat")

    @task(3)
    def short_chat_stream(self):
        self._chat(_text(self.rng.randint(40, 200), self.rng), 24, stream=True, name="short chat (stream)")

    @task(1)
    def long_document(self):
        doc = _text(LONG, self.rng)
        self._chat(f"Summarise this document:\n{doc}", 32, stream=True, name="long document (stream)")
