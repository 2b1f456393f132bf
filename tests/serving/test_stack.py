"""The whole stack through the gateway with the real `openai` client: both tiny backends.

One `hybridserve up` (gateway + tiny-transformer + tiny-hybrid workers) serves the
module. Sampling is seeded, so a streamed answer must equal the non-streamed one.
"""
from __future__ import annotations

import asyncio
import os
import random

import httpx
import pytest
from openai import AsyncOpenAI

from tests.serving.conftest import TINY, wait_until

pytestmark = pytest.mark.timeout(120)

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something about state space models."}]


def scrape(url: str) -> dict[str, float]:
    """Prometheus text → {metric name: value summed over label sets}."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=5, trust_env=False).text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("model", list(TINY))
def test_completion_stream_equals_unary(openai_client, model):
    kw = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=1234)
    raw = openai_client.completions.with_raw_response.create(**kw)
    assert raw.headers["x-hybridserve-backend"] == model
    assert raw.headers["x-hybridserve-request-id"]
    full = raw.parse()
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.model_extra["device_seconds"] > 0  # the usage extension survives the client
    if choice.finish_reason == "length":
        assert full.usage.completion_tokens == 12

    chunks = list(openai_client.completions.create(**kw, stream=True,
                                                   stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


@pytest.mark.parametrize("model", list(TINY))
def test_chat_stream_equals_unary(openai_client, model):
    kw = dict(model=model, messages=MESSAGES, max_completion_tokens=10, seed=7, temperature=0.8)
    full = openai_client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    stream = openai_client.chat.completions.create(**kw, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_logprobs_stop_and_auto(openai_client):
    out = openai_client.chat.completions.create(
        model="auto", messages=MESSAGES, max_tokens=6, n=3, seed=3, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    for c in out.choices:
        assert len(c.logprobs.content) == 6
        for entry in c.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
    assert len({c.message.content for c in out.choices}) > 1  # seeds seed+i differ
    for c in out.choices:  # each token's own bytes (a token may be part of a character)
        assert all(all(0 <= b < 256 for b in e.bytes) for e in c.logprobs.content)
        assert sum(len(e.bytes) for e in c.logprobs.content) >= len(c.message.content.encode(
            errors="ignore").replace("\ufffd".encode(), b""))

    comp = openai_client.completions.create(model="any-tiny", prompt=PROMPT, max_tokens=5,
                                            logprobs=1, temperature=0.0,
                                            extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 5
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) == 1 for t in lp.top_logprobs)

    # greedy is deterministic: a stop string taken from a first answer must cut the second before it
    kw = dict(model=comp.model, prompt=PROMPT, max_tokens=16, temperature=0.0, extra_body={"ignore_eos": True})
    free = openai_client.completions.create(**kw)
    text = free.choices[0].text
    assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 16
    fits = [i for i in range(1, len(text) - 2) if text.find(text[i:i + 2]) == i and text[i:i + 2].isprintable()]
    fits.sort(key=lambda i: "\ufffd" in text[i:i + 2])  # rather whole characters than replacement ones
    assert fits, f"no usable stop string in {text!r}"
    stop = text[fits[0]:fits[0] + 2]
    again = openai_client.completions.create(**kw, stop=[stop])
    assert again.choices[0].finish_reason == "stop"
    assert again.choices[0].text == text[:fits[0]] and stop not in again.choices[0].text


def test_models_lists_backends_and_aliases(openai_client):
    ids = {m.id for m in openai_client.models.list()}
    assert set(TINY) | {"auto", "any-tiny", "standard", "economy"} <= ids


def test_32_concurrent_streams_have_correct_usage(engine_stack):
    async def one(client: AsyncOpenAI, i: int):
        model = list(TINY)[i % 2]
        stream = await client.completions.create(
            model=model, prompt=f"{i}: {PROMPT}", max_tokens=8, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        return model, text, usage

    async def main():
        async with AsyncOpenAI(base_url=engine_stack.base_url, api_key=engine_stack.key,
                               timeout=90, max_retries=0) as client:
            results = await asyncio.gather(*(one(client, i) for i in range(32)))
            # prompt token counts from the non-streaming path for a sample of the prompts
            ref = await client.completions.create(model=list(TINY)[0], prompt=f"0: {PROMPT}",
                                                  max_tokens=1)
            return results, ref

    results, ref = asyncio.run(main())
    assert len(results) == 32
    for model, text, usage in results:
        assert usage is not None and usage.completion_tokens == 8
        assert usage.total_tokens == usage.prompt_tokens + 8
    assert results[0][2].prompt_tokens == ref.usage.prompt_tokens


@pytest.mark.parametrize("model", list(TINY))
def test_disconnect_mid_stream_frees_the_sequence(engine_stack, model):
    worker = engine_stack.workers[model]
    idle = scrape(worker)
    assert idle["vllm:num_requests_running"] == 0
    body = {"model": model, "prompt": PROMPT, "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30, trust_env=False) as client:
        with client.stream("POST", engine_stack.base_url + "/completions", json=body,
                           headers=engine_stack.headers()) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(g.startswith("data: {") for g in got)
            busy = scrape(worker)
            assert busy["vllm:num_requests_running"] + busy["vllm:num_requests_waiting"] >= 1
        # leaving the block closes the connection mid-stream
    after = wait_until(lambda: (m := scrape(worker))["vllm:num_requests_running"] == 0
                       and m["vllm:num_requests_waiting"] == 0 and m, 15, "sequence aborted")
    assert after["vllm:kv_cache_usage_perc"] == pytest.approx(idle["vllm:kv_cache_usage_perc"])
    generated = after["vllm:generation_tokens_total"] - idle["vllm:generation_tokens_total"]
    assert generated < 400  # it stopped early, it did not run to max_tokens


def _post(stack, path: str, body, headers=None, raw: bytes | None = None) -> httpx.Response:
    h = {**stack.headers(), **(headers or {})}
    return httpx.post(stack.base_url + path, timeout=30, trust_env=False, headers=h,
                      **({"content": raw} if raw is not None else {"json": body}))


BAD = [
    ("malformed json", None, b'{"model": "auto", "prompt": ', 400, None),
    ("not an object", None, b'[1, 2]', 400, None),
    ("wrong type", {"model": "auto", "prompt": "x", "max_tokens": "9"}, None, 400, "max_tokens"),
    ("wrong type temperature", {"model": "auto", "prompt": "x", "temperature": "hot"}, None, 400,
     "temperature"),
    ("missing prompt", {"model": "auto"}, None, 400, "prompt"),
    ("unknown model", {"model": "gpt-17", "prompt": "x"}, None, 404, "model"),
    ("max_tokens zero", {"model": "auto", "prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ("max_tokens beyond context", {"model": "auto", "prompt": "x", "max_tokens": 10**6}, None, 400,
     "max_tokens"),
    ("prompt too long", {"model": "auto", "prompt": "lorem ipsum " * 4000}, None, 400, None),
    ("token prompt too long", {"model": "tiny-hybrid", "prompt": [5] * 600}, None, 400, None),
    ("n too large", {"model": "auto", "prompt": "x", "n": 1000}, None, 400, "n"),
    ("unsupported penalty", {"model": "auto", "prompt": "x", "presence_penalty": 1.5}, None, 400,
     "presence_penalty"),
]


@pytest.mark.parametrize("name,body,raw,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_with_openai_error(engine_stack, name, body, raw, status, param):
    r = _post(engine_stack, "/completions", body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    assert r.headers["x-hybridserve-request-id"]


def test_prompt_within_gateway_bound_but_over_worker_context(engine_stack):
    """The gateway's estimate lets this through; the worker's exact count refuses it."""
    rng = random.Random(0)
    prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ,.") for _ in range(4000))
    r = _post(engine_stack, "/completions", {"model": "tiny-transformer", "prompt": prompt,
                                             "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.headers["x-hybridserve-backend"] == "tiny-transformer"


@pytest.mark.parametrize("headers", [{"authorization": ""}, {"authorization": "Bearer nope"},
                                     {"authorization": "Basic abc"}])
def test_auth_rejects_missing_or_wrong_keys(engine_stack, headers):
    r = _post(engine_stack, "/completions", {"model": "auto", "prompt": "x"}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_still_serving_after_bad_input(openai_client, engine_stack):
    for model in TINY:
        out = openai_client.completions.create(model=model, prompt="ok", max_tokens=2)
        assert out.choices[0].text is not None
    for worker in engine_stack.workers.values():
        assert httpx.get(worker + "/health", timeout=5, trust_env=False).status_code == 200


def test_metrics_worker_and_gateway(engine_stack):
    for worker in engine_stack.workers.values():
        m = scrape(worker)
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                     "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                     "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
                     "vllm:request_time_per_output_token_seconds_count",
                     "vllm:e2e_request_latency_seconds_count"):
            assert name in m, name
        assert m["vllm:e2e_request_latency_seconds_count"] >= 1
        assert m["vllm:generation_tokens_total"] >= 1
    g = scrape(engine_stack.url)
    assert g["hybridserve_gateway_requests_total"] >= 10
    assert g["hybridserve_gateway_errors_total"] >= 5
    assert g["hybridserve_gateway_added_latency_seconds_count"] >= 10
    assert g["hybridserve_backend_up"] == 2


def test_disconnect_while_waiting_for_a_full_answer_aborts(engine_stack):
    """Non-streaming: the client gives up; gateway and worker drop the sequence."""
    worker = engine_stack.workers["tiny-transformer"]
    # 8 x 500 tokens: ~0.75 s on the tiny model at one thread here (one sequence of 500 took 0.3 s
    # once the CPU decode path got faster, and this request then finished before the client gave up)
    body = {"model": "tiny-transformer", "prompt": "hi", "max_tokens": 500, "n": 8, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        _post_timeout(engine_stack, body, timeout=0.2)
    wait_until(lambda: (m := scrape(worker))["vllm:num_requests_running"] == 0
               and m["vllm:num_requests_waiting"] == 0, 15, "sequence aborted")
    assert 'finished_reason="abort"' in httpx.get(worker + "/metrics", trust_env=False).text


def _post_timeout(stack, body, timeout: float) -> httpx.Response:
    return httpx.post(stack.base_url + "/completions", json=body, headers=stack.headers(),
                      timeout=timeout, trust_env=False)


def test_batched_prompts_with_n(openai_client):
    out = openai_client.completions.create(model="tiny-hybrid", prompt=["Hello there", "A"],
                                           n=2, max_tokens=3, seed=5,
                                           extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    single = [openai_client.completions.create(model="tiny-hybrid", prompt=p, max_tokens=1)
              for p in ("Hello there", "A")]
    assert out.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert out.usage.completion_tokens == 12


def test_streamed_chat_logprobs_cover_every_token(openai_client):
    stream = openai_client.chat.completions.create(
        model="tiny-transformer", messages=MESSAGES, max_tokens=7, logprobs=True, top_logprobs=1,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    entries, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            entries += chunk.choices[0].logprobs.content
        usage = chunk.usage or usage
    assert usage.completion_tokens == 7 and len(entries) == 7
    assert all(len(e.top_logprobs) == 1 for e in entries)


def test_oversized_body_is_413(engine_stack):
    r = _post(engine_stack, "/completions", None, raw=b'{"prompt": "' + b"x" * (33 << 20) + b'"}')
    assert r.status_code == 413 and "error" in r.json()


def test_workers_are_pinned_to_their_own_cores(engine_stack):
    """`cpu_cores: auto`: the two CPU workers split the cores instead of both using all of them."""
    from hybridserve.cpu_binding import compute_threads, format_cores, parse_cores

    health = {n: httpx.get(u + "/health", timeout=5, trust_env=False).json()
              for n, u in engine_stack.workers.items()}
    cores = {n: parse_cores(h["cpu_cores"]) for n, h in health.items()}
    have = sorted(os.sched_getaffinity(0))
    a, b = cores.values()
    if len(have) >= 2:
        assert not set(a) & set(b) and sorted(a + b) == have, cores
        assert abs(len(a) - len(b)) <= 1
    else:
        assert a == b == have
    for n, h in health.items():
        if "cpu_threads" in h:  # a torch engine: sized by its cores (compute_threads) unless the env set it
            want = int(os.environ.get("OMP_NUM_THREADS") or compute_threads(len(cores[n])))
            assert h["cpu_threads"] == want, (n, h)
    log = engine_stack.log.read_text(errors="replace")
    for n in engine_stack.workers:
        assert f"cores {format_cores(cores[n])})" in log


@pytest.mark.parametrize("model", list(TINY))
def test_repeated_prefix_reports_cached_tokens(openai_client, engine_stack, model):
    """OpenAI's usage.prompt_tokens_details.cached_tokens, unary and streamed, and the worker's
    prefix-cache counters under vLLM's names."""
    before = scrape(engine_stack.workers[model])
    system = "You are a cautious agent with tools: search, calc, weather, calendar. " * 4
    first = openai_client.completions.create(model=model, prompt=system + "Question one?", max_tokens=4,
                                             temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    raw = openai_client.completions.with_raw_response.create(
        model=model, prompt=system + "A second, other question?", max_tokens=4, temperature=0)
    second = raw.parse()
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < second.usage.prompt_tokens
    assert raw.headers["x-hybridserve-cached-tokens"] == str(cached)  # the receipt says so too
    stream = openai_client.completions.create(model=model, prompt=system + "Question one?", max_tokens=4,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens >= cached
    after = scrape(engine_stack.workers[model])
    queried = after["vllm:prefix_cache_queries_total"] - before.get("vllm:prefix_cache_queries_total", 0)
    hits = after["vllm:prefix_cache_hits_total"] - before.get("vllm:prefix_cache_hits_total", 0)
    assert queried >= first.usage.prompt_tokens + second.usage.prompt_tokens + usage.prompt_tokens
    assert hits >= cached + usage.prompt_tokens_details.cached_tokens
    health = httpx.get(engine_stack.workers[model] + "/health", timeout=5, trust_env=False).json()["prefix_cache"]
    assert health["cached_blocks"] > 0 and health["hit_tokens"] >= hits and 0 < health["hit_rate"] < 1
    if "hybrid" in model:
        assert health["cached_snapshots"] > 0 and health["snapshot_slots"] > 0
    econ = httpx.get(engine_stack.base_url + "/economics", headers=engine_stack.headers(), timeout=5,
                     trust_env=False).json()
    assert econ["backends"][model]["prefix_cache_hit_rate"] > 0
