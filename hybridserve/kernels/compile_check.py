"""Compile every Triton kernel for a GPU target without a GPU, at the anchor layer shapes.

Each op's Triton wrapper runs on small CPU tensors with launches captured instead
of executed; every captured launch is then compiled for the target (sm_90 =
H100/H200 by default) with the same constexprs and num_warps. This catches what
the interpreter cannot (typing of loop-carried values, dot shapes, register or
shared-memory blow-ups) and reports registers, spills and shared memory per
kernel, read from the cubin with cuobjdump.

    python -m hybridserve.kernels.compile_check     # prints one line per kernel + a JSON line
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from hybridserve.kernels import _backend

_DTYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.bool: "i1",
}
SMEM_LIMIT = 232_448  # bytes per block on sm_90


@contextmanager
def compiling() -> Iterator[None]:
    """Triton's interpreter switched off for the block (compiling needs real JIT functions)."""
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


@contextmanager
def captured_launches() -> Iterator[list]:
    """Within the block, `lazy_jit` launches are recorded as (lazy_kernel, args, kwargs)."""
    launches: list = []
    original = _backend.lazy_jit.__getitem__

    def record(self: Any, grid: Any) -> Any:
        return lambda *args, **kwargs: launches.append((self, args, kwargs))

    _backend.lazy_jit.__getitem__ = record  # type: ignore[method-assign]
    try:
        with compiling():
            yield launches
    finally:
        _backend.lazy_jit.__getitem__ = original  # type: ignore[method-assign]


def run_anchor_ops(dtype: torch.dtype = torch.bfloat16) -> None:
    """Call each Triton wrapper once on CPU tensors shaped like the anchor layer."""
    from hybridserve.kernels.conv1d import causal_conv1d_triton, causal_conv1d_update_triton
    from hybridserve.kernels.gated_rmsnorm import gated_rms_norm_triton
    from hybridserve.kernels.paged_attention import paged_attention_decode_triton
    from hybridserve.kernels.ssd_fused_triton import ssd_scan_fused_triton
    from hybridserve.kernels.ssd_triton import ssd_scan_triton
    from hybridserve.kernels.state_update import selective_state_update_triton

    T, H, P, G, N, Bt = 512, 64, 64, 1, 128, 4
    z = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt)  # noqa: E731
    f32 = torch.float32
    for scan in (ssd_scan_triton, ssd_scan_fused_triton):
        scan(
            z(T, H, P), z(T, H), z(H, dt=f32), z(T, G, N), z(T, G, N), z(H, dt=f32), z=z(T, H, P),
            dt_bias=z(H, dt=f32), initial_states=z(1, H, P, N, dt=f32), cu_seqlens=torch.tensor([0, T]),
        )
    for state_dtype in (dtype, f32):
        selective_state_update_triton(
            z(8, H, P, N, dt=state_dtype), z(Bt, H, P), z(Bt, H), z(H, dt=f32), z(Bt, G, N), z(Bt, G, N),
            z(H, dt=f32), z=z(Bt, H, P), dt_bias=z(H, dt=f32), state_indices=torch.arange(Bt),
        )
    Dc, K = H * P + 2 * G * N, 4
    causal_conv1d_triton(
        z(T, Dc), z(Dc, K), z(Dc), conv_states=z(2, Dc, K - 1), cu_seqlens=torch.tensor([0, T]),
        state_indices=torch.tensor([1]), has_initial_state=torch.tensor([True]),
    )
    for flat in (False, True):
        causal_conv1d_update_triton(z(Bt, Dc), z(8, Dc, K - 1), z(Dc, K), z(Dc), state_indices=torch.arange(Bt), flat=flat)
    gated_rms_norm_triton(z(T, H * P), z(T, H * P), z(H * P))
    page, blocks = 16, 256
    for fused_reduce in (True, False):
        paged_attention_decode_triton(
            z(1, 32, 128), z(blocks, page, 8, 128), z(blocks, page, 8, 128),
            torch.zeros(1, blocks, dtype=torch.int32), torch.full((1,), 4096, dtype=torch.int32), 0.088,
            fused_reduce=fused_reduce,
        )


def run_test_shapes() -> None:
    """The odd shapes of tests/kernels (fp32 and bf16), so CUDA test runs compile too."""
    from hybridserve.kernels.conv1d import causal_conv1d_triton, causal_conv1d_update_triton
    from hybridserve.kernels.gated_rmsnorm import gated_rms_norm_triton
    from hybridserve.kernels.paged_attention import paged_attention_decode_triton
    from hybridserve.kernels.ssd_fused_triton import ssd_scan_fused_triton
    from hybridserve.kernels.ssd_triton import ssd_scan_triton
    from hybridserve.kernels.state_update import selective_state_update_triton

    f32 = torch.float32
    for dt in (f32, torch.bfloat16):
        z = lambda *s, d=dt: torch.zeros(*s, dtype=d)  # noqa: E731
        T, H, P, G, N = 54, 6, 5, 2, 7
        for scan in (ssd_scan_triton, ssd_scan_fused_triton):
            scan(z(T, H, P), z(T, H), z(H, d=f32), z(T, G, N), z(T, G, N), z(H, d=f32), z=z(T, H, P),
                 dt_bias=z(H, d=f32), initial_states=z(3, H, P, N, d=f32), cu_seqlens=torch.tensor([0, 1, 38, 54]),
                 chunk_size=16, blocks=dict(l=8, m=8, k=8, p=8))
        selective_state_update_triton(
            z(5, H, P, N), z(3, H, P), z(3, H), z(H, d=f32), z(3, G, N), z(3, G, N), z(H, d=f32), z=z(3, H, P),
            dt_bias=z(H, d=f32), state_indices=torch.arange(3), block_p=4,
        )
        causal_conv1d_triton(z(50, 10), z(10, 4), z(10), conv_states=z(6, 10, 3), cu_seqlens=torch.tensor([0, 1, 8, 10, 50]),
                             state_indices=torch.arange(4), has_initial_state=torch.ones(4, dtype=torch.bool),
                             block_t=8, block_d=16)
        causal_conv1d_update_triton(z(3, 37), z(5, 37, 2), z(37, 3), None, state_indices=torch.arange(3),
                                    activation=None, block_d=16, flat=True)
        gated_rms_norm_triton(z(3, 60), z(3, 60), z(60), 1e-5, 12)
        paged_attention_decode_triton(z(3, 6, 24), z(40, 4, 2, 24), z(40, 4, 2, 24), torch.zeros(3, 11, dtype=torch.int32),
                                      torch.full((3,), 30, dtype=torch.int32), 0.2, num_splits=3, block_n=16)


def _signature(fn: Any, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """Signature, constexprs, options and attributes as Triton's launcher would specialize them:
    16-byte aligned pointers and multiples of 16 marked divisible, ints equal to 1 made constants."""
    sig: dict[str, str] = {}
    attrs: dict[tuple, list] = {}
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    divisible = [["tt.divisibility", 16]]
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = divisible
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int) and value == 1:
            sig[name] = "constexpr"
            kwargs[name] = 1
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = divisible
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    sig.update({name: "constexpr" for name in kwargs})
    return sig, dict(kwargs), options, attrs


def _resources(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))  # shared comes from the metadata
    return {k.lower(): int(v) for k, v in found.items()}


def compile_all(arch: int = 90, test_shapes: bool = True) -> list[dict]:
    """Compile every captured launch for cuda:`arch`; one dict per kernel configuration."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with captured_launches() as launches:
        run_anchor_ops()
        if test_shapes:
            run_test_shapes()
    with compiling():
        return _compile_launches(launches, arch, cuobjdump)


def _compile_launches(launches: list, arch: int, cuobjdump: str) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    results, seen = [], set()
    for lazy, args, kwargs in launches:
        fn = triton.jit(lazy.fn)
        sig, constexprs, options, attrs = _signature(fn, args, dict(kwargs))
        key = (lazy.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        start = time.time()
        kernel = triton_compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options)
        res = {"kernel": lazy.fn.__name__, "seconds": round(time.time() - start, 2), "shared": kernel.metadata.shared}
        if os.path.exists(cuobjdump):
            res.update(_resources(kernel.asm["cubin"], cuobjdump))
        res["constexprs"] = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k == "CHUNK"}
        res["num_warps"] = options.get("num_warps", 4)
        results.append(res)
    return results


def main() -> None:
    results = compile_all()
    for r in results:
        print(f"{r['kernel']:34s} regs {r.get('reg', '?'):>4} spill(local) {r.get('local', '?'):>4} "
              f"shared {r['shared']:>6} B  warps {r['num_warps']}  {r['seconds']:4.1f} s  {r['constexprs']}")
    bad = [r["kernel"] for r in results if r.get("local", 0) > 0 or r["shared"] > SMEM_LIMIT]
    print(json.dumps({"compiled": len(results), "spilling_or_over_smem": bad}))


if __name__ == "__main__":
    main()
