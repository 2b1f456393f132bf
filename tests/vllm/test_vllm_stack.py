"""vLLM's CPU build as a backend engine, behind the gateway, next to the native engine.

One `hybridserve up` serves the module: the tiny pair twice, once on vLLM
(`vllm-transformer`, `vllm-hybrid`) and once on the native engine
(`native-transformer`, `native-hybrid`), all from the same built-in checkpoints
(the tiny pair's attention head size is 32, the least vLLM's CPU attention kernels
support). The last test kills a vLLM server.

Cross-check of the two engines (greedy, fp32, same checkpoint, same prompts):

* What must agree: the prompt tokens (same tokenizer, same chat template: the
  `usage.prompt_tokens` counts), the greedy tokens, their logprobs (to 2e-4), and —
  where a run is token-identical — where and why it stops (EOS or length).
* Where they may differ, and how the test allows for it:
  - numerics: vLLM runs its own CPU kernels (attention, Mamba-2 chunked scan and
    state update, fused norms) and its own prefill chunking; the native engine runs
    the torch references. fp32 logits differ around 1e-5, so greedy may flip only
    where the top two candidates are that close: a divergence is accepted only at
    such a near tie (top-2 gap < 1e-3 on one side), and the rest of that answer is
    not compared (the two sequences have left each other);
  - default sampling parameters: vLLM fills omitted fields from the checkpoint's
    generation_config.json and its own defaults; the native worker from OpenAI's.
    Every field that matters is therefore sent explicitly (temperature 0,
    max_tokens, ignore_eos);
  - EOS: vLLM stops on generation_config's eos_token_id(s) and the tokenizer's EOS;
    the native engine on the tokenizer's. Full-length comparisons use `ignore_eos`;
    a second run without it checks both stop at the same place;
  - text: vLLM drops special tokens from `text` (skip_special_tokens) and detokenises
    incrementally (holding back partial UTF-8), so text is not compared token by
    token; token ids are (vLLM's `return_tokens_as_token_ids`, decoded with the
    checkpoint's tokenizer, against the native worker's token strings).
"""
from __future__ import annotations

import os
import signal

import httpx
import pytest
from openai import OpenAI

import tests.serving.conftest as serving
from hybridserve.models.builtin import materialize
from tests.serving.conftest import free_port, log_tail, start_stack, stop_process, wait_until
from tests.vllm.conftest import group_alive, kill_group, needs_vllm, vllm_options, vllm_servers

pytestmark = [pytest.mark.vllm, needs_vllm, pytest.mark.timeout(900)]

ARCHS = {"transformer": "tiny-transformer", "hybrid": "tiny-hybrid"}
MAX_CONTEXT = 1024
LP_TOL = 2e-4  # fp32 on the tiny pair: measured differences are a few 1e-6
TIE_TOL = 1e-3
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 3,
           "State space models keep a fixed-size state per sequence; " * 12]
TOKEN_PROMPT = [72, 101, 108, 108, 111, 44, 32, 118, 76, 76, 77, 33]
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something about state space models."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-stack")
    backends = []
    for arch, ckpt in ARCHS.items():
        common = {"arch": arch, "checkpoint": f"builtin:{ckpt}", "dtype": "float32",
                  "max_context": MAX_CONTEXT, "price_per_hour": 0.5}
        backends.append({"name": f"vllm-{arch}", "engine": "vllm", "port": free_port(),
                         "tier": "standard", "vllm": vllm_options(), **common})
        backends.append({"name": f"native-{arch}", "engine": "native", "port": free_port(),
                         "tier": "economy", **common,
                         "native": {"max_num_seqs": 16, "max_num_batched_tokens": 512,
                                    "cache_memory_gb": 0.25}})
    old = serving.STARTUP_TIMEOUT_S
    serving.STARTUP_TIMEOUT_S = 420.0  # two vLLM servers start side by side on 2 cores
    try:
        s = start_stack(tmp, backends)
    finally:
        serving.STARTUP_TIMEOUT_S = old
    yield s
    servers = vllm_servers(s.proc.pid)
    stop_process(s.proc, grace_s=60)
    try:
        wait_until(lambda: not any(group_alive(p.pid) for p in servers.values()), 15,
                   "vLLM process groups gone")
    except TimeoutError:
        pass
    left = [p.pid for p in servers.values() if group_alive(p.pid)]
    for pgid in left:
        kill_group(pgid)
    assert s.proc.returncode == 0, log_tail(s.log)
    assert not left, f"vLLM process groups left after `up` stopped: {left}"
    assert "all processes stopped" in log_tail(s.log, 80)


@pytest.fixture(scope="module")
def client(stack):
    c = OpenAI(base_url=stack.base_url, api_key=stack.key, timeout=120, max_retries=0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(materialize(ARCHS["hybrid"])))


def post(stack, model: str, **body) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": 2, **body}
    return httpx.post(stack.base_url + "/completions", headers=stack.headers(), timeout=120,
                      trust_env=False, json=body)


# ------------------------------------------------------------------ serving through the gateway


@pytest.mark.parametrize("arch", list(ARCHS))
def test_completion_and_stream_through_gateway(client, arch):
    model = f"vllm-{arch}"
    kw = dict(model=model, prompt=PROMPTS[1], max_tokens=12, temperature=0.0)
    raw = client.completions.with_raw_response.create(**kw)
    assert raw.headers["x-hybridserve-backend"] == model
    full = raw.parse()
    choice = full.choices[0]
    assert full.model == model and choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 1 and full.usage.completion_tokens >= 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.model_extra["device_seconds"] > 0  # estimated by the shim, as natives report it
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.model_extra["device_seconds"] > 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_tokens_look_alike_for_both_engines(client, arch):
    """vLLM runs with --enable-prompt-tokens-details, so its answers carry OpenAI's cached_tokens as
    the native worker's do; its prefix cache is on for the transformer, off (as it must be on CPU)
    for the hybrid, where the native engine still hits. The gateway's own cache_salt reaches both."""
    head = PROMPTS[2][:400]  # about 400 byte tokens: several blocks, well inside the 1,024 context
    for engine in ("vllm", "native"):
        model = f"{engine}-{arch}"
        client.completions.create(model=model, prompt=head + "first", max_tokens=2, temperature=0)
        again = client.completions.create(model=model, prompt=head + "second", max_tokens=2, temperature=0)
        cached = again.usage.prompt_tokens_details.cached_tokens
        if engine == "vllm" and arch == "hybrid":
            assert cached == 0
        else:
            assert 0 < cached < again.usage.prompt_tokens, (model, cached)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_chat_and_stream_through_gateway(client, arch):
    model = f"vllm-{arch}"
    kw = dict(model=model, messages=MESSAGES, max_completion_tokens=10, temperature=0.0)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert full.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        full.choices[0].finish_reason


def test_models_and_metrics_look_alike_for_both_engines(stack):
    cards = {c["id"]: c for c in httpx.get(stack.base_url + "/models", headers=stack.headers(),
                                           timeout=10, trust_env=False).json()["data"]}
    for arch in ARCHS:
        v, n = cards[f"vllm-{arch}"], cards[f"native-{arch}"]
        assert set(v) == set(n)
        assert (v["engine"], n["engine"]) == ("vllm", "native")
        assert v["max_model_len"] == n["max_model_len"] == MAX_CONTEXT
        assert v["healthy"] and n["healthy"]
    for arch in ARCHS:  # vLLM serves the backend's name, and exports the load metrics
        url = stack.workers[f"vllm-{arch}"]
        ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10, trust_env=False).json()["data"]]
        assert ids == [f"vllm-{arch}"]
        text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
        assert "vllm:num_requests_running{" in text and "vllm:num_requests_waiting{" in text


def test_dashboard_worker_panels_read_vllm_workers_too(stack):
    """deploy/'s dashboard queries vLLM-named worker metrics: vLLM's own server must export
    each of them, and the gateway's service discovery must list its workers."""
    from hybridserve.dashboard import build, declared_metrics, metrics_used

    groups = {g["labels"]["backend"]: g for g in httpx.get(
        stack.url + "/prometheus/targets", timeout=10, trust_env=False).json()}
    wanted = {n: labels for n, labels in metrics_used(build()).items() if n.startswith("vllm:")}
    for arch in ARCHS:
        name = f"vllm-{arch}"
        assert groups[name]["labels"]["engine"] == "vllm"
        assert stack.workers[name] == "http://" + groups[name]["targets"][0]
        declared = declared_metrics(httpx.get(stack.workers[name] + "/metrics", timeout=10,
                                              trust_env=False).text)
        missing = sorted(set(wanted) - set(declared))
        assert not missing, f"vLLM does not export {missing}"
        for metric, labels in wanted.items():
            if declared[metric]:
                assert labels <= declared[metric], (metric, labels, declared[metric])


def _error(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def test_errors_look_alike_for_both_engines(stack):
    too_long = {"prompt": "hello", "max_tokens": MAX_CONTEXT + 10, "temperature": 0.0}
    bad_n = {"prompt": "hello", "max_tokens": 2, "n": "two"}
    for arch in ARCHS:
        v, n = f"vllm-{arch}", f"native-{arch}"
        # straight at the workers: the same status, OpenAI type and code
        for body in (too_long, bad_n):
            rv = httpx.post(stack.workers[v] + "/v1/completions", json={"model": v, **body},
                            timeout=60, trust_env=False)
            rn = httpx.post(stack.workers[n] + "/v1/completions", json={"model": n, **body},
                            timeout=60, trust_env=False)
            assert rv.status_code == rn.status_code == 400, (rv.text, rn.text)
            ev, en = _error(rv), _error(rn)
            assert ev["type"] == en["type"] == "invalid_request_error"
            assert ev["code"] == en["code"]
        assert ev["param"] == en["param"] == "n"
        # and through the gateway (which may refuse it itself, before any worker)
        rv, rn = post(stack, v, **too_long), post(stack, n, **too_long)
        assert rv.status_code == rn.status_code == 400
        ev, en = _error(rv), _error(rn)
        assert (ev["type"], ev["code"], ev["param"]) == (en["type"], en["code"], en["param"])
        assert ev["type"] == "invalid_request_error"


# ------------------------------------------------------------------ native vs vLLM, greedy


def _top2_gap(top: dict | None) -> float:
    vals = sorted((top or {}).values(), reverse=True)
    return vals[0] - vals[1] if len(vals) >= 2 else float("inf")


def compare_greedy(native: dict, vllm: dict, decode) -> tuple[int, str, float]:
    """Tokens compared before a (near-tie) divergence, a note, and the largest logprob
    difference among them; asserts the rest."""
    n_toks = native["tokens"]
    v_toks = [decode(int(t.split(":", 1)[1])) for t in vllm["tokens"]]
    assert len(n_toks) == len(v_toks)
    worst = 0.0
    for i, (a, b) in enumerate(zip(n_toks, v_toks)):
        la, lb = native["token_logprobs"][i], vllm["token_logprobs"][i]
        if a == b:
            assert abs(la - lb) < LP_TOL, f"token {i} ({a!r}): logprob {la} native vs {lb} vLLM"
            worst = max(worst, abs(la - lb))
            continue
        gaps = (_top2_gap(native["top_logprobs"][i]), _top2_gap(vllm["top_logprobs"][i]))
        assert min(gaps) < TIE_TOL, (f"greedy token {i} differs ({a!r} native, {b!r} vLLM) "
                                     f"although the top-2 gaps are {gaps}")
        return i, f"near tie at token {i} (top-2 gaps {gaps})", worst
    return len(n_toks), "identical", worst


def _chat_as_completion_logprobs(choice: dict) -> dict:
    content = choice["logprobs"]["content"]
    return {"tokens": [e["token"] for e in content],
            "token_logprobs": [e["logprob"] for e in content],
            "top_logprobs": [{t["token"] + f"#{k}": t["logprob"] for k, t in enumerate(e["top_logprobs"])}
                             for e in content]}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_native_and_vllm_give_the_same_greedy_tokens(stack, tokenizer, arch):
    decode = lambda i: tokenizer.decode([i])  # noqa: E731 - as the native worker renders tokens
    v, n = f"vllm-{arch}", f"native-{arch}"
    compared, worst = 0, 0.0
    notes = []
    for prompt in PROMPTS + [TOKEN_PROMPT]:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0.0, "logprobs": 2,
                "ignore_eos": True}
        rv = post(stack, v, **body, return_tokens_as_token_ids=True)
        rn = post(stack, n, **body)
        assert rv.status_code == rn.status_code == 200, (rv.text, rn.text)
        jv, jn = rv.json(), rn.json()
        assert jv["usage"]["prompt_tokens"] == jn["usage"]["prompt_tokens"]
        assert jv["usage"]["completion_tokens"] == jn["usage"]["completion_tokens"] == 24
        k, note, w = compare_greedy(jn["choices"][0]["logprobs"], jv["choices"][0]["logprobs"], decode)
        compared, worst = compared + k, max(worst, w)
        notes.append(note)
        if note == "identical":  # same tokens: both must stop at the same place without ignore_eos
            body.pop("ignore_eos")
            sv, sn = post(stack, v, **body).json(), post(stack, n, **body).json()
            assert sv["choices"][0]["finish_reason"] == sn["choices"][0]["finish_reason"]
            assert sv["usage"]["completion_tokens"] == sn["usage"]["completion_tokens"]
    # chat: same template (prompt tokens) and the same greedy answer
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0.0, "logprobs": True,
            "top_logprobs": 2, "ignore_eos": True}
    rv = httpx.post(stack.base_url + "/chat/completions", headers=stack.headers(), timeout=120,
                    trust_env=False, json={"model": v, **body, "return_tokens_as_token_ids": True})
    rn = httpx.post(stack.base_url + "/chat/completions", headers=stack.headers(), timeout=120,
                    trust_env=False, json={"model": n, **body})
    assert rv.status_code == rn.status_code == 200, (rv.text, rn.text)
    jv, jn = rv.json(), rn.json()
    assert jv["usage"]["prompt_tokens"] == jn["usage"]["prompt_tokens"]
    k, note, w = compare_greedy(_chat_as_completion_logprobs(jn["choices"][0]),
                                _chat_as_completion_logprobs(jv["choices"][0]), decode)
    compared, worst = compared + k, max(worst, w)
    notes.append("chat: " + note)
    # random-weight built-ins are scaled to have peaked distributions: near ties are rare
    assert compared >= 0.75 * (24 * (len(PROMPTS) + 1) + 16), notes
    print(f"{arch}: {compared} greedy tokens identical, logprobs within {worst:.1e}; {notes}")


# ------------------------------------------------------------------ failure and restart (last)


def test_killed_vllm_worker_is_routed_around_and_restarted(stack):
    victim = "vllm-hybrid"
    assert post(stack, victim).status_code == 200
    old = vllm_servers(stack.proc.pid)[victim]
    old_pid = old.pid
    os.kill(old_pid, signal.SIGKILL)
    down = wait_until(lambda: (r := post(stack, victim)).status_code == 503 and r, 30,
                      "pinned request gets 503")
    err = _error(down)  # the 503 is OpenAI JSON naming the backend
    assert err["type"] == "service_unavailable" and victim in err["message"]

    r = post(stack, victim)
    routed = [post(stack, "auto") for _ in range(4)]
    if r.status_code == 503:  # still down: `auto` avoids the victim
        for a in routed:
            assert a.status_code == 200, a.text
            assert a.headers["x-hybridserve-backend"] != victim
    for other in ("vllm-transformer", "native-transformer", "native-hybrid"):  # the others keep serving
        assert post(stack, other).status_code == 200, other

    wait_until(lambda: not group_alive(old_pid), 30, "killed server's process group reaped")
    wait_until(lambda: post(stack, victim).status_code == 200, 420, "restarted vLLM serves", 1.0)
    new = vllm_servers(stack.proc.pid)[victim]
    assert new.pid != old_pid
    log = log_tail(stack.log, 4000)
    assert f"[{victim}] vLLM died (exit code -9)" in log
    assert f"{victim} died" in log and f"restarted {victim}" in log
