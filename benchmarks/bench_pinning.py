"""CPU pinning of the workers (`cpu_cores`): `auto` (each worker its own share) vs `all`.

Starts `hybridserve up` with the small pair twice, once per mode, and streams greedy
completions (`ignore_eos`, prompts of exactly `context` tokens) through the gateway:
  both   each model gets `concurrency` requests at the same time (the two workers compete);
  alone  only the transformer is loaded (what pinning costs a lone busy worker).
Prints per model decode tok/s, prefill tok/s and TTFT p50 for each mode with the
ratio auto/all (decode and prefill > 1: pinning is faster; TTFT < 1: sooner). The
last stdout line is one JSON object.

    python benchmarks/bench_pinning.py                        # contexts 512,2048, concurrency 4
    python benchmarks/bench_pinning.py --contexts 256 --concurrency 2 --new-tokens 8   # smoke
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hybridserve.bench.measure import run_http, summarize  # noqa: E402
from hybridserve.cpu_binding import available_cores, format_cores  # noqa: E402

from bench_vllm import _f, _ratio, free_port  # noqa: E402  (the sibling script: same table helpers)

MODELS = {"small-transformer": "transformer", "small-hybrid": "hybrid"}


class Stack:
    """`hybridserve up` with the small pair, every worker's `cpu_cores` set to `mode`."""

    def __init__(self, folder: Path, mode: str, max_context: int, max_seqs: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        backends = [{"name": m, "arch": arch, "checkpoint": f"builtin:{m}", "dtype": "float32",
                     "max_context": max_context, "price_per_hour": 0.5, "cpu_cores": mode,
                     "port": free_port(),
                     "native": {"max_num_seqs": max_seqs, "max_num_batched_tokens": 1024,
                                "cache_memory_gb": 2.0}} for m, arch in MODELS.items()]
        cfg = folder / f"pinning-{mode}.yaml"
        cfg.write_text(yaml.safe_dump({"gateway": {"auth": "disabled", "port": self.port},
                                       "backends": backends}))
        self.log = folder / f"up-{mode}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hybridserve.cli", "up", "--config", str(cfg), "--log-level", "warning"],
            cwd=REPO, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`hybridserve up` exited with {self.proc.returncode}; see {self.log}")
            if "hybridserve is up" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"not up in {timeout_s}s; see {self.log}")

    def worker_cores(self) -> dict[str, str]:
        health = httpx.get(self.url + "/health", timeout=5, trust_env=False).json()["backends"]
        out = {}
        for name, b in health.items():
            w = httpx.get(b["url"] + "/health", timeout=5, trust_env=False).json()
            out[name] = f"cores {w['cpu_cores']}, {w.get('cpu_threads', '?')} threads"
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def load(url: str, models: list[str], ctx: int, conc: int, new: int) -> dict[str, dict]:
    """Each model in `models` gets `conc` streams at once, all models at the same time."""
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def one(model: str) -> None:
        try:
            traces = run_http(url, model, ctx, conc, new, timeout_s=1800)
            fig = summarize(traces, price_per_hour=0.5, cache_bytes_per_seq=0, budget_bytes=0,
                            peak_rss_mb=None)
            results[model] = {k: fig[k] for k in ("decode_tok_s", "prefill_tok_s", "ttft_p50_s")}
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--logs", default=None, help="folder for configs and logs (default: a temp folder)")
    a = ap.parse_args()
    contexts = [int(x) for x in a.contexts.split(",")]
    folder = Path(a.logs or tempfile.mkdtemp(prefix="bench-pinning-"))
    folder.mkdir(parents=True, exist_ok=True)
    scenarios = {"both": list(MODELS), "alone": ["small-transformer"]}
    print(f"cpu_cores auto vs all: small pair, {len(available_cores())} cores "
          f"({format_cores(available_cores())}), concurrency {a.concurrency} per model, "
          f"{a.new_tokens} new tokens, logs in {folder}", flush=True)
    res: dict[str, dict] = {}
    placement: dict[str, dict] = {}
    t_all = time.monotonic()
    for mode in ("all", "auto"):
        stack = Stack(folder, mode, max(contexts) + a.new_tokens + 16, a.concurrency)
        try:
            stack.wait()
            placement[mode] = stack.worker_cores()
            print(f"{mode}: {placement[mode]}", flush=True)
            load(stack.url, list(MODELS), min(contexts), 1, 4)  # warm-up, not kept
            for ctx in contexts:
                for scen, models in scenarios.items():
                    t0 = time.monotonic()
                    res[f"{mode}/{scen}/{ctx}"] = load(stack.url, models, ctx, a.concurrency, a.new_tokens)
                    print(f"  {mode:<4} {scen:<5} ctx={ctx:<5} done in {time.monotonic() - t0:.1f} s",
                          flush=True)
        finally:
            stack.stop()

    rows = []
    print(f"\n{'load':<6} {'model':<18} {'ctx':>5} | {'decode tok/s auto':>17} {'all':>7} {'ratio':>6} | "
          f"{'prefill tok/s auto':>18} {'all':>7} {'ratio':>6} | {'TTFT p50 s auto':>15} {'all':>6} {'ratio':>6}")
    for ctx in contexts:
        for scen, models in scenarios.items():
            for m in models:
                p, u = res[f"auto/{scen}/{ctx}"][m], res[f"all/{scen}/{ctx}"][m]
                row = {"load": scen, "model": m, "context": ctx, "auto": p, "all": u,
                       **{f"{k}_ratio": _ratio(p[k], u[k]) for k in ("decode_tok_s", "prefill_tok_s",
                                                                     "ttft_p50_s")}}
                rows.append(row)
                print(f"{scen:<6} {m:<18} {ctx:>5} | {_f(p['decode_tok_s']):>17} {_f(u['decode_tok_s']):>7} "
                      f"{_f(row['decode_tok_s_ratio'], 2):>6} | {_f(p['prefill_tok_s']):>18} "
                      f"{_f(u['prefill_tok_s']):>7} {_f(row['prefill_tok_s_ratio'], 2):>6} | "
                      f"{_f(p['ttft_p50_s'], 3):>15} {_f(u['ttft_p50_s'], 3):>6} "
                      f"{_f(row['ttft_p50_s_ratio'], 2):>6}")
    print(json.dumps({"bench": "cpu_pinning", "cores": format_cores(available_cores()),
                      "concurrency": a.concurrency, "new_tokens": a.new_tokens, "placement": placement,
                      "wall_s": round(time.monotonic() - t_all, 1), "points": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
