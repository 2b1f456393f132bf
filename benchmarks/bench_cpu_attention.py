"""CPU paged decode attention: the C++ kernel against the torch reference and the read ceiling.

For each batch × context it times one decode attention call of the small models' layer
(8 query heads, 2 kv heads, head size 64, 16-token blocks) with the block table in
order and shuffled, and prints milliseconds, the K/V bytes read per second, the ratio
to the torch reference (`paged_attention_decode_ref`, gather + SDPA), and the share of
this machine's single-pass read bandwidth (a `sum` over a buffer as large as the cache;
below a few MB both stay in the CPU cache, so that share is not DRAM's).
The last stdout line is one JSON object.

`--prefill` times the prefill kernel instead: causal attention of a chunk of Q_LEN queries
at the end of a CTX-token context (the same heads), against torch's path for it (fused SDPA
for a whole prompt, the unmasked-prefix + causal-chunk split for a later chunk), in GFLOP/s
(the causal half counted once) and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cpu_attention.py
    .venv/bin/python benchmarks/bench_cpu_attention.py --threads 2 --points 8x8192,1x16384
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cpu_attention.py --prefill   # 512x512,2048x2048,2048x8192
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from hybridserve.kernels import cpu_attention
from hybridserve.kernels.paged_attention import _FLASH_CPU, _suffix_attention_cpu, paged_attention_decode_ref


def timed(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def prefill(points: str, repeat: int) -> None:
    Hq, Hkv, D = 8, 2, 64
    print(f"CPU prefill attention, {torch.get_num_threads()} thread(s), Hq {Hq} Hkv {Hkv} D {D}, fp32, "
          f"best of {repeat}")
    print(f"{'Q_LENxCTX':>11} | {'kernel ms':>9} {'GFLOP/s':>7} | {'torch ms':>8} {'GFLOP/s':>7} | {'x torch':>7}")
    rows, g = [], torch.Generator().manual_seed(0)
    for point in points.split(","):
        T, ctx = (int(x) for x in point.split("x"))
        q = torch.randn(Hq, T, D, generator=g)
        k, v = torch.randn(Hkv, ctx, D, generator=g), torch.randn(Hkv, ctx, D, generator=g)
        scale = D ** -0.5
        if T == ctx:
            def torch_path():
                return torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                                        scale=scale, enable_gqa=True)
        else:
            def torch_path():
                return _suffix_attention_cpu(q[None], k[None], v[None], scale)
        flops = 4 * Hq * D * (T * (ctx - T) + T * T / 2)
        t_k = timed(lambda: cpu_attention.prefill_attention_cpu(q, k, v, scale), repeat)
        t_t = timed(torch_path, repeat)
        row = {"q_len": T, "context": ctx, "kernel_ms": t_k * 1e3, "torch_ms": t_t * 1e3,
               "kernel_gflop_s": flops / t_k / 1e9, "torch_gflop_s": flops / t_t / 1e9, "speedup": t_t / t_k}
        rows.append(row)
        print(f"{point:>11} | {row['kernel_ms']:>9.1f} {row['kernel_gflop_s']:>7.0f} | {row['torch_ms']:>8.1f} "
              f"{row['torch_gflop_s']:>7.0f} | {row['speedup']:>7.2f}", flush=True)
    print(json.dumps({"bench": "cpu_prefill_attention", "threads": torch.get_num_threads(),
                      "rows": [{k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items()}
                               for r in rows]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default="1x2048,8x2048,1x16384,8x8192", help="BATCHxCONTEXT, comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--prefill", action="store_true", help="time the prefill kernel (points: Q_LENxCTX)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not cpu_attention.available():
        raise SystemExit(f"the C++ kernel is unavailable here: {cpu_attention.why_unavailable()}")
    if a.prefill:
        if _FLASH_CPU is None:
            raise SystemExit("this torch has no fused CPU attention to compare with")
        prefill(a.points if a.points != ap.get_default("points") else "512x512,2048x2048,2048x8192",
                max(1, a.repeat // 3))
        return
    Hq, Hkv, D, BS = 8, 2, 64, 16
    print(f"CPU paged decode attention, {torch.get_num_threads()} thread(s), Hq {Hq} Hkv {Hkv} D {D} "
          f"block {BS}, fp32, best of {a.repeat}")
    print(f"{'point':>10} {'tables':>8} | {'kernel ms':>9} {'GB/s':>6} | {'ref ms':>8} {'GB/s':>6} | "
          f"{'x ref':>6} {'of read bw':>10}")
    rows = []
    g = torch.Generator().manual_seed(0)
    for point in a.points.split(","):
        B, ctx = (int(x) for x in point.split("x"))
        nb = B * ctx // BS
        k = torch.randn(nb, BS, Hkv, D, generator=g)
        v = torch.randn(nb, BS, Hkv, D, generator=g)
        q = torch.randn(B, Hq, D, generator=g)
        lens = torch.full((B,), ctx, dtype=torch.int32)
        nbytes = 2 * k.numel() * 4
        flat = torch.ones(2 * k.numel())   # written, so that reading it reaches memory
        ceiling = nbytes / timed(lambda: flat.sum(), a.repeat)
        for order in ("in order", "shuffled"):
            ids = torch.arange(nb) if order == "in order" else torch.randperm(nb, generator=g)
            tables = ids.view(B, ctx // BS).int()
            args = (q, k, v, tables, lens, D ** -0.5)
            t_k = timed(lambda: cpu_attention.paged_attention_decode_cpu(*args), a.repeat)
            t_r = timed(lambda: paged_attention_decode_ref(*args), a.repeat)
            row = {"batch": B, "context": ctx, "tables": order, "kernel_ms": t_k * 1e3, "ref_ms": t_r * 1e3,
                   "kernel_gb_s": nbytes / t_k / 1e9, "ref_gb_s": nbytes / t_r / 1e9,
                   "speedup_over_ref": t_r / t_k, "share_of_read_bandwidth": nbytes / t_k / ceiling}
            rows.append(row)
            print(f"{point:>10} {order:>8} | {row['kernel_ms']:>9.2f} {row['kernel_gb_s']:>6.1f} | "
                  f"{row['ref_ms']:>8.2f} {row['ref_gb_s']:>6.1f} | {row['speedup_over_ref']:>6.2f} "
                  f"{row['share_of_read_bandwidth']:>10.0%}", flush=True)
    print(json.dumps({"bench": "cpu_paged_decode_attention", "threads": torch.get_num_threads(),
                      "rows": [{k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items()}
                               for r in rows]}))


if __name__ == "__main__":
    main()
