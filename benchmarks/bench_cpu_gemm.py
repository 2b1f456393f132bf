"""CPU linears at 1-8 rows: GB/s of weights read by oneDNN's packed product and by the C++ panel
kernel (kernels/cpu_gemm.py), beside a plain `sum` over the same bytes (the read ceiling).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cpu_gemm.py [--shapes 4096x4096,49152x576]

Each product is checked against a float64 one before it is timed (best of --repeat).
"""
from __future__ import annotations

import argparse
import json
import torch
from bench_cpu_attention import timed as best   # best of n runs, after one warm-up

from hybridserve.kernels import cpu_gemm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,49152x576,1536x576,576x1536", help="OUTxIN, comma-separated")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--repeat", type=int, default=15)
    a = ap.parse_args()
    if not cpu_gemm.available():
        raise SystemExit(f"the panel kernel is unavailable: {cpu_gemm.why_unavailable()}")
    print(f"GB/s of fp32 weights read, {torch.get_num_threads()} thread(s), best of {a.repeat}")
    rows_out = []
    for shape in a.shapes.split(","):
        o, i = (int(x) for x in shape.split("x"))
        w = torch.randn(o, i)
        nbytes = w.numel() * 4
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        panels = cpu_gemm.pack_panels(w)
        line = {"shape": shape, "mb": round(nbytes / 2**20, 1), "sum_gbs": nbytes / best(w.sum, a.repeat) / 1e9}
        text = f"{shape:>12} {line['mb']:>7} MB  sum {line['sum_gbs']:5.1f} |"
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, i)
            want = x.double() @ w.double().t()
            got = cpu_gemm.panel_linear(x, panels, None, o)
            assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
            t_dnn = best(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), a.repeat)
            t_pan = best(lambda: cpu_gemm.panel_linear(x, panels, None, o), a.repeat)
            line[f"rows{m}"] = {"onednn_gbs": nbytes / t_dnn / 1e9, "panel_gbs": nbytes / t_pan / 1e9}
            text += f"  {m} rows: oneDNN {nbytes / t_dnn / 1e9:5.1f} panel {nbytes / t_pan / 1e9:5.1f}"
        print(text, flush=True)
        rows_out.append(line)
    print(json.dumps({"bench": "cpu_gemm", "threads": torch.get_num_threads(), "rows": rows_out}))


if __name__ == "__main__":
    main()
