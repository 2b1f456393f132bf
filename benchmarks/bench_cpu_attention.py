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
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cpu_attention.py --cold --heads 9x3x64 --points 1x512,1x2048

`--cold` times decode the way a decode step meets it: the point's cache copied into as many
layers as make 96 MB or more (so that no layer's K/V is still in the CPU cache when its turn
comes back), one call per layer per pass, best of REPEAT passes, next to a `sum` over the
same layers' K and V in the same order. `--heads HQxHKVxD` picks the layer's heads (SmolLM2's
are 9x3x64). To time an older kernel with this script, put that checkout first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from hybridserve.kernels import cpu_attention
from hybridserve.kernels.paged_attention import _FLASH_CPU, _suffix_attention_cpu, paged_attention_decode_ref


def once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed(fn, repeat: int) -> float:
    fn()
    return min(once(fn) for _ in range(repeat))


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


def cold(points: str, Hq: int, Hkv: int, D: int, BS: int, repeat: int) -> None:
    print(f"CPU paged decode attention, cache out of the CPU cache, {torch.get_num_threads()} thread(s), "
          f"Hq {Hq} Hkv {Hkv} D {D} block {BS}, fp32, best of {repeat} passes over the layers")
    print(f"{'point':>10} {'layers':>6} | {'ms/layer':>8} {'GB/s':>6} | {'sum GB/s':>8} | {'of sum':>6}")
    rows, g = [], torch.Generator().manual_seed(0)
    for point in points.split(","):
        B, ctx = (int(x) for x in point.split("x"))
        nb = B * ((ctx + BS - 1) // BS)
        per_layer = 2 * nb * BS * Hkv * D * 4
        layers = min(64, max(2, -(-(96 << 20) // per_layer)))
        caches = [(torch.randn(nb, BS, Hkv, D, generator=g), torch.randn(nb, BS, Hkv, D, generator=g))
                  for _ in range(layers)]
        q = torch.randn(B, Hq, D, generator=g)
        tables = torch.arange(nb).view(B, -1).int()
        lens = torch.full((B,), ctx, dtype=torch.int32)

        def kernel_pass():
            for k, v in caches:
                cpu_attention.paged_attention_decode_cpu(q, k, v, tables, lens, D ** -0.5)

        def sum_pass():
            for k, v in caches:
                k.sum()
                v.sum()
        kernel_pass()
        t_k, t_s = float("inf"), float("inf")
        for _ in range(repeat):                   # alternating, so that drift hits both
            t_k = min(t_k, once(kernel_pass))
            t_s = min(t_s, once(sum_pass))
        row = {"batch": B, "context": ctx, "layers": layers, "kernel_ms_per_layer": t_k / layers * 1e3,
               "kernel_gb_s": per_layer * layers / t_k / 1e9, "sum_gb_s": per_layer * layers / t_s / 1e9}
        row["share_of_sum"] = row["kernel_gb_s"] / row["sum_gb_s"]
        rows.append(row)
        print(f"{point:>10} {layers:>6} | {row['kernel_ms_per_layer']:>8.3f} {row['kernel_gb_s']:>6.1f} | "
              f"{row['sum_gb_s']:>8.1f} | {row['share_of_sum']:>6.0%}", flush=True)
    print(json.dumps({"bench": "cpu_paged_decode_attention_cold", "threads": torch.get_num_threads(),
                      "heads": [Hq, Hkv, D], "rows": [{k: (round(x, 3) if isinstance(x, float) else x)
                                                       for k, x in r.items()} for r in rows]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default="1x2048,8x2048,1x16384,8x8192", help="BATCHxCONTEXT, comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--prefill", action="store_true", help="time the prefill kernel (points: Q_LENxCTX)")
    ap.add_argument("--cold", action="store_true", help="decode with each layer's cache out of the CPU cache")
    ap.add_argument("--heads", default="8x2x64", help="query heads x kv heads x head size (decode)")
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
    Hq, Hkv, D = (int(x) for x in a.heads.split("x"))
    BS = 16
    if a.cold:
        cold(a.points, Hq, Hkv, D, BS, a.repeat)
        return
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
