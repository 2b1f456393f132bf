"""Time every kernel op on the ANCHORS.md shapes against the hardware and its peers.

For each op: median ms (triton.testing.do_bench), achieved GB/s of the bytes the op
must move (and TFLOP/s for SSD), share of a device-to-device copy measured in the
same run, and the ratio against mamba-ssm's Triton ops (when importable) or torch
SDPA (attention). Each op is first checked against its torch reference. The last
stdout line is one JSON object, with the issue-5 targets judged.

    python benchmarks/bench_kernels.py               # CUDA GPU, the full run (< 5 min on an H200)
    python benchmarks/bench_kernels.py --cpu-smoke   # tiny shapes, Triton interpreter: it still runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
ARGS.add_argument("--no-sweep", action="store_true", help="skip the small tile-size sweeps")
ARGS.add_argument("--no-mamba", action="store_true", help="do not import mamba-ssm")
OPTS = ARGS.parse_args()
if OPTS.cpu_smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hybridserve.kernels.conv1d import (  # noqa: E402
    causal_conv1d_ref,
    causal_conv1d_triton,
    causal_conv1d_update_ref,
    causal_conv1d_update_triton,
)
from hybridserve.kernels.gated_rmsnorm import gated_rms_norm_ref, gated_rms_norm_triton  # noqa: E402
from hybridserve.kernels.paged_attention import (  # noqa: E402
    paged_attention_decode_ref,
    paged_attention_decode_triton,
)
from hybridserve.kernels.ssd import ssd_scan_ref  # noqa: E402
from hybridserve.kernels.ssd_fused_triton import ssd_scan_fused_triton  # noqa: E402
from hybridserve.kernels.ssd_triton import ssd_scan_triton  # noqa: E402
from hybridserve.kernels.state_update import (  # noqa: E402
    selective_state_update_ref,
    selective_state_update_triton,
)

CUDA = torch.cuda.is_available() and not OPTS.cpu_smoke
DEV = torch.device("cuda" if CUDA else "cpu")
BF16 = torch.bfloat16
F32 = torch.float32

if CUDA:  # the anchor layer (ANCHORS.md)
    H, P, N, G, CHUNK, K_CONV = 64, 64, 128, 1, 256, 4
    SSD_SHAPES = [(1, 4096), (1, 16384), (1, 65536), (8, 8192)]
    DECODE_BATCHES = [64, 256, 1024]
    PREFILL_T = 16384
    HQ, HKV, DH, PAGE = 32, 8, 128, 16
    ATTN_SHAPES = [(1, 4096), (32, 32768)]
else:
    H, P, N, G, CHUNK, K_CONV = 4, 8, 16, 1, 16, 4
    SSD_SHAPES = [(2, 20)]
    DECODE_BATCHES = [3]
    PREFILL_T = 24
    HQ, HKV, DH, PAGE = 4, 2, 16, 8
    ATTN_SHAPES = [(2, 40)]
DC = H * P + 2 * G * N  # conv channels: x, B and C
RESULTS: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu (interpreter smoke)", "ops": [], "checks": {}}


def bench(fn) -> float:
    """Median milliseconds of fn()."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(1):  # CPU smoke: proves it runs, times mean little
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rand(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=F32) * scale).to(dtype)


def record(op, shape, ms, nbytes, flops=None, **extra):
    row = {"op": op, "shape": shape, "ms": round(ms, 4), "GBps": round(nbytes / ms / 1e6, 1)}
    row["copy_share"] = round(row["GBps"] / RESULTS["copy_GBps"], 3)
    if flops:
        row["TFLOPs"] = round(flops / ms / 1e9, 1)
    row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in extra.items()})
    RESULTS["ops"].append(row)
    print(f"{op:22s} {shape:14s} {ms:9.4f} ms {row['GBps']:8.1f} GB/s ({row['copy_share']:.0%} of copy)"
          + (f" {row['TFLOPs']:6.1f} TFLOP/s" if flops else "")
          + "".join(f"  {k}={v:.4g}" if isinstance(v, float) else f"  {k}={v}" for k, v in extra.items()), flush=True)
    return row


def check(name, got, want, rel=2e-2):
    """Normwise: max |got - want| <= rel * max |want| (bf16 outputs round at ~4e-3)."""
    diff = (got.double() - want.double()).abs()
    scale = float(want.double().abs().max()) or 1.0
    ok = float(diff.max()) <= rel * scale
    RESULTS["checks"][name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "rel": float(diff.max()) / scale, "ok": ok}
    print(f"check {name:36s} max {float(diff.max()):.3e} mean {float(diff.mean()):.3e} "
          f"rel {float(diff.max()) / scale:.2e} {'ok' if ok else 'FAIL'}", flush=True)


def import_mamba():
    """mamba-ssm's Triton ops, or None; its CUDA extension is stubbed (only Triton ops are used)."""
    if OPTS.no_mamba:
        return None
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as exc:  # noqa: BLE001 - any failure means "no peer"
        RESULTS["mamba_ssm"] = f"not importable: {exc!r}"[:300]
        print(RESULTS["mamba_ssm"], flush=True)
        return None
    import mamba_ssm

    RESULTS["mamba_ssm"] = getattr(mamba_ssm, "__version__", "?")
    if not CUDA:  # its wrappers need a CUDA device even under the interpreter
        RESULTS["mamba_ssm"] += " (imported; not run on CPU)"
        return None
    return types.SimpleNamespace(scan=mamba_chunk_scan_combined, update=selective_state_update)


# ---------------------------------------------------------------- inputs per op

def ssd_inputs(batch, L):
    T = batch * L
    return dict(
        x=rand(T, H, P), dt=rand(T, H, scale=0.5), A=-torch.rand(H, device=DEV) * 4 - 0.5, B=rand(T, G, N),
        C=rand(T, G, N), D=torch.randn(H, device=DEV), z=rand(T, H, P), dt_bias=torch.randn(H, device=DEV) - 2,
        # on the host, as the engine holds them: no device-to-host sync; None for one sequence
        cu_seqlens=None if batch == 1 else torch.arange(batch + 1) * L,
    )


def ssd_flops(T):
    # chunk states + incoming-state outputs (2 T H P N each), causal intra-chunk CB and (CB.L) x
    return 4 * T * H * P * N + T * CHUNK * (G * N + H * P)


def mamba_scan(m, d, batch):
    L = d["x"].shape[0] // batch
    view = lambda t: t.view(batch, L, *t.shape[1:])  # noqa: E731
    return m.scan(view(d["x"]), view(d["dt"]), d["A"], view(d["B"]), view(d["C"]), CHUNK, D=d["D"], z=view(d["z"]),
                  dt_bias=d["dt_bias"], dt_softplus=True, return_final_states=True)


def update_inputs(batch, state_dtype):
    return dict(
        state=rand(batch, H, P, N, dtype=state_dtype), x=rand(batch, H, P), dt=rand(batch, H, scale=0.5),
        A=-torch.rand(H, device=DEV) * 4 - 0.5, B=rand(batch, G, N), C=rand(batch, G, N),
        D=torch.randn(H, device=DEV), z=rand(batch, H, P), dt_bias=torch.randn(H, device=DEV) - 2,
        state_indices=torch.randperm(batch, device=DEV),
    )


def mamba_update(m, d):
    return m.update(
        d["state"], d["x"], d["dt"][..., None].expand(-1, -1, P), d["A"][:, None, None].expand(-1, P, N),
        d["B"], d["C"], D=d["D"][:, None].expand(-1, P), z=d["z"], dt_bias=d["dt_bias"][:, None].expand(-1, P),
        dt_softplus=True, state_batch_indices=d["state_indices"],
    )


def paged_inputs(batch, L):
    blocks = (L + PAGE - 1) // PAGE
    k_cache = rand(batch * blocks, PAGE, HKV, DH)
    v_cache = rand(batch * blocks, PAGE, HKV, DH)
    tables = torch.randperm(batch * blocks, device=DEV, dtype=torch.int64).view(batch, blocks).to(torch.int32)
    lens = torch.full((batch,), L, device=DEV, dtype=torch.int32)
    return rand(batch, HQ, DH), k_cache, v_cache, tables, lens


# ---------------------------------------------------------------- correctness first

def run_checks(mamba):
    d = ssd_inputs(2, 3 * CHUNK // 2 + 5)
    y_ref, f_ref = ssd_scan_ref(**d, chunk_size=CHUNK)
    for name, scan in (("ssd_scan", ssd_scan_triton), ("ssd_scan_fused", ssd_scan_fused_triton)):
        y, f = scan(**d, chunk_size=CHUNK)
        check(f"{name} y vs ref", y, y_ref)
        check(f"{name} final states vs ref", f, f_ref)
    if mamba is not None:
        d1 = ssd_inputs(1, 2 * CHUNK)
        y_m, f_m = mamba_scan(mamba, d1, 1)
        y1, f1 = ssd_scan_triton(**d1, chunk_size=CHUNK)
        check("ssd_scan y vs mamba-ssm", y1, y_m[0])
        check("ssd_scan final vs mamba-ssm", f1, f_m)
    for state_dtype in (BF16, F32):
        u = update_inputs(DECODE_BATCHES[0], state_dtype)
        u_ref = {**u, "state": u["state"].clone()}
        y = selective_state_update_triton(**u)
        y_ref = selective_state_update_ref(**u_ref)
        check(f"state_update y ({state_dtype})", y, y_ref)
        check(f"state_update state ({state_dtype})", u["state"].float(), u_ref["state"].float())
    b = DECODE_BATCHES[0]
    x, w, bias = rand(b, DC), rand(DC, K_CONV), rand(DC)
    st, idx = rand(b, DC, K_CONV - 1), torch.randperm(b, device=DEV)
    st_ref = st.clone()
    check("conv1d_update out", causal_conv1d_update_triton(x, st, w, bias, state_indices=idx),
          causal_conv1d_update_ref(x, st_ref, w, bias, state_indices=idx))
    check("conv1d_update states", st, st_ref, rel=0.0)
    T = 3 * CHUNK + 7
    xs, cu = rand(T, DC), torch.tensor([0, 5, T], device=DEV)
    st = rand(4, DC, K_CONV - 1)
    st_ref = st.clone()
    kw = dict(cu_seqlens=cu, state_indices=torch.tensor([2, 0], device=DEV),
              has_initial_state=torch.tensor([True, False], device=DEV))
    check("conv1d prefill out", causal_conv1d_triton(xs, w, bias, conv_states=st, **kw),
          causal_conv1d_ref(xs, w, bias, conv_states=st_ref, **kw))
    xn, zn, wn = rand(64, H * P), rand(64, H * P), rand(H * P)
    check("gated_rms_norm", gated_rms_norm_triton(xn, zn, wn), gated_rms_norm_ref(xn, zn, wn))
    args = paged_inputs(3, ATTN_SHAPES[0][1] + 13)
    check("paged_attention_decode", paged_attention_decode_triton(*args, DH**-0.5),
          paged_attention_decode_ref(*args, DH**-0.5))


# ---------------------------------------------------------------- timings

def measure_copy():
    n = (1 << 30) if CUDA else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    RESULTS["copy_GBps"] = round(2 * n / ms / 1e6, 1)
    print(f"device-to-device copy {2 * n / 1e9:.2f} GB: {RESULTS['copy_GBps']} GB/s", flush=True)


def sweep(name, make_call, configs):
    """Best (ms, config) of make_call(**config) over configs; also recorded in RESULTS."""
    if OPTS.no_sweep or not CUDA:
        return configs[0]
    timed = []
    for cfg in configs:
        try:
            timed.append((bench(make_call(**cfg)), cfg))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"sweep {name} {cfg}: {exc!r}"[:200], flush=True)
    timed.sort(key=lambda t: t[0])
    RESULTS.setdefault("sweeps", {})[name] = [{"ms": round(ms, 4), **cfg} for ms, cfg in timed]
    print(f"sweep {name}: best {timed[0][1]} {timed[0][0]:.4f} ms", flush=True)
    return timed[0][1]


def time_ssd(mamba):
    d = ssd_inputs(*SSD_SHAPES[1 if CUDA else 0])  # sweep at B1 L16384 on the GPU
    variants = {
        "ssd_scan": (ssd_scan_triton, [
            {"blocks": None}, {"blocks": dict(l=64, m=64, k=32, p=64)}, {"blocks": dict(l=32, m=64, k=64, p=32)},
        ]),
        "ssd_scan_fused": (ssd_scan_fused_triton, [
            {"blocks": dict(m=64, k=32, p=64), "num_warps": 8}, {"blocks": dict(m=64, k=64, p=64), "num_warps": 8},
            {"blocks": dict(m=64, k=64, p=32), "num_warps": 8}, {"blocks": dict(m=32, k=32, p=32), "num_warps": 4},
        ]),
    }
    best = {}
    for name, (scan, cfgs) in variants.items():
        best[name] = sweep(name, lambda scan=scan, **cfg: lambda: scan(**d, chunk_size=CHUNK, **cfg), cfgs)
    for batch, L in SSD_SHAPES:
        d = ssd_inputs(batch, L)
        T = batch * L
        nbytes = 2 * (3 * T * H * P + 2 * T * G * N + T * H)
        peers = {}
        if mamba is not None:
            peers["mamba_ms"] = bench(lambda: mamba_scan(mamba, d, batch))
        if L <= 4096 and batch == 1 and CUDA:
            peers["torch_ref_ms"] = bench(lambda: ssd_scan_ref(**d, chunk_size=CHUNK))
        for name, (scan, _) in variants.items():
            ms = bench(lambda: scan(**d, chunk_size=CHUNK, **best[name]))
            extra = {"Mtok_s": T / ms / 1e3, **peers}
            if "mamba_ms" in peers:
                extra["speedup_vs_mamba"] = peers["mamba_ms"] / ms
            record(name, f"B{batch} L{L}", ms, nbytes, ssd_flops(T), **extra)
        del d


def time_state_update(mamba):
    d = update_inputs(DECODE_BATCHES[-1] if CUDA else 3, BF16)
    cfgs = [{"block_p": bp, "num_warps": nw} for bp in (32, 16, 8, 64) for nw in (4, 8)]
    best = sweep("state_update", lambda block_p, num_warps: lambda: selective_state_update_triton(
        **d, block_p=block_p, num_warps=num_warps), cfgs)
    for state_dtype in (BF16, F32):
        for batch in DECODE_BATCHES:
            d = update_inputs(batch, state_dtype)
            es = d["state"].element_size()
            nbytes = 2 * batch * H * P * N * es + 3 * batch * H * P * 2 + 2 * batch * G * N * 2 + batch * H * 2
            ms = bench(lambda: selective_state_update_triton(**d, **best))
            extra = {}
            if mamba is not None:
                extra["mamba_ms"] = bench(lambda: mamba_update(mamba, d))
                extra["speedup_vs_mamba"] = extra["mamba_ms"] / ms
            if batch == DECODE_BATCHES[0] and CUDA:
                extra["torch_ref_ms"] = bench(lambda: selective_state_update_ref(**d))
            record(f"state_update_{str(state_dtype)[6:]}", f"B{batch}", ms, nbytes, **extra)


def time_conv():
    w, bias = rand(DC, K_CONV), rand(DC)
    x = rand(DECODE_BATCHES[-1] if CUDA else 3, DC)
    st = rand(x.shape[0], DC, K_CONV - 1)
    idx = torch.arange(x.shape[0], device=DEV)
    cfgs = [{"block_d": bd, "num_warps": nw, "flat": flat} for flat in (True, False)
            for bd in (256, 512, 128) for nw in (4, 8)]
    best = sweep("conv1d_update", lambda **cfg: lambda: causal_conv1d_update_triton(
        x, st, w, bias, state_indices=idx, **cfg), cfgs)
    for batch in DECODE_BATCHES:
        x, st = rand(batch, DC), rand(batch, DC, K_CONV - 1)
        idx = torch.randperm(batch, device=DEV)
        nbytes = 2 * batch * DC * (K_CONV - 1) * 2 + 2 * batch * DC * 2 + DC * (K_CONV + 1) * 2
        ms = bench(lambda: causal_conv1d_update_triton(x, st, w, bias, state_indices=idx, **best))
        record("conv1d_update", f"B{batch}", ms, nbytes)
    T = PREFILL_T
    xs, st = rand(T, DC), rand(1, DC, K_CONV - 1)
    kw = dict(cu_seqlens=torch.tensor([0, T], device=DEV), state_indices=torch.zeros(1, dtype=torch.int64, device=DEV),
              has_initial_state=torch.ones(1, dtype=torch.bool, device=DEV))
    ms = bench(lambda: causal_conv1d_triton(xs, w, bias, conv_states=st, **kw))
    record("conv1d_prefill", f"L{T}", ms, 2 * T * DC * 2)


def time_norm():
    T = PREFILL_T
    x, z, w = rand(T, H * P), rand(T, H * P), rand(H * P)
    ms = bench(lambda: gated_rms_norm_triton(x, z, w))
    record("gated_rms_norm", f"T{T}", ms, 3 * T * H * P * 2)


def time_attention():
    import torch.nn.functional as F

    for batch, L in ATTN_SHAPES:
        q, k_cache, v_cache, tables, lens = paged_inputs(batch, L)
        nbytes = 2 * batch * L * HKV * DH * 2 + 2 * batch * HQ * DH * 2
        cfgs = [{"block_n": bn, "num_warps": nw, "fused_reduce": True} for bn in (64, 32, 128) for nw in (4, 8)]
        cfgs.append({"block_n": 64, "num_warps": 4, "fused_reduce": False})
        best = sweep(f"paged_decode B{batch} L{L}", lambda **cfg: lambda: paged_attention_decode_triton(
            q, k_cache, v_cache, tables, lens, DH**-0.5, max_context_len=L, **cfg), cfgs)
        ms = bench(lambda: paged_attention_decode_triton(q, k_cache, v_cache, tables, lens, DH**-0.5, max_context_len=L, **best))
        del k_cache, v_cache
        k = rand(batch, HKV, L, DH)
        v = rand(batch, HKV, L, DH)
        q4 = q[:, :, None, :]
        sdpa_ms = bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
        record("paged_attention_decode", f"B{batch} L{L}", ms, nbytes, sdpa_ms=sdpa_ms, speedup_vs_sdpa=sdpa_ms / ms)
        del k, v


def judge_targets():
    rows = {(r["op"], r["shape"]): r for r in RESULTS["ops"]}
    get = lambda op, shape, key: rows.get((op, shape), {}).get(key)  # noqa: E731
    copy = RESULTS["copy_GBps"]
    t = {}
    bf16 = [get("state_update_bfloat16", f"B{b}", "GBps") for b in DECODE_BATCHES]
    t["state_update_bf16_ge_3400GBps"] = all(v is not None and v >= 3400 for v in bf16)
    f32 = [get("state_update_float32", f"B{b}", "speedup_vs_mamba") for b in DECODE_BATCHES]
    t["state_update_fp32_ge_mamba"] = None if None in f32 else all(v >= 1.0 for v in f32)
    ssd = [max((get(op, f"B1 L{L}", "speedup_vs_mamba") or 0) for op in ("ssd_scan", "ssd_scan_fused"))
           for L in (16384, 65536)]
    has_mamba = any("mamba_ms" in r for r in RESULTS["ops"])
    t["ssd_ge_1.3x_mamba"] = all(v >= 1.3 for v in ssd) if has_mamba else None
    conv = [get("conv1d_update", f"B{b}", "GBps") for b in DECODE_BATCHES]
    t["conv_update_ge_70pct_copy"] = all(v is not None and v >= 0.7 * copy for v in conv)
    big = get("paged_attention_decode", "B32 L32768", "GBps")
    t["attention_B32_L32K_ge_80pct_copy"] = big is not None and big >= 0.8 * copy
    small = get("paged_attention_decode", "B1 L4096", "speedup_vs_sdpa")
    t["attention_B1_L4K_ge_2x_sdpa"] = small is not None and small >= 2.0
    RESULTS["targets"] = t if CUDA else "not judged on CPU"


@torch.inference_mode()
def main():
    torch.manual_seed(0)
    start = time.time()
    mamba = import_mamba()
    run_checks(mamba)
    measure_copy()
    for step in (time_ssd, time_state_update):
        step(mamba)
    time_conv()
    time_norm()
    time_attention()
    judge_targets()
    RESULTS["all_checks_ok"] = all(c["ok"] for c in RESULTS["checks"].values())
    RESULTS["seconds"] = round(time.time() - start, 1)
    print(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
