"""Do two back-to-back `hybridserve bench --repeat N` runs agree? (target: within 10 % at every point)

Runs the bench twice into two folders (or compares two folders already written, with
--compare A B) and prints, per point, the relative difference of the medians of decode tok/s,
prefill tok/s, TTFT p50 and $/1M output tokens between the runs, the largest of them, and
PASS/FAIL against the target. The issue's grid:

    python benchmarks/bench_repeatability.py --repeat 3 -- --contexts 512,4096 --concurrency 1,4 --new-tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

FIGURES = ("decode_tok_s", "prefill_tok_s", "ttft_p50_s", "usd_per_1m_output")
TARGET = 0.10


def points(folder: Path) -> dict[tuple, dict]:
    return {(p["backend"], p["context"], p["concurrency"]): p
            for p in json.loads((folder / "points.json").read_text())}


def compare(a: Path, b: Path) -> float:
    pa, pb = points(a), points(b)
    worst = 0.0
    print(f"{'backend':<20} {'ctx':>6} {'conc':>4}  " + "  ".join(f"{f:>18}" for f in FIGURES))
    for k in sorted(set(pa) & set(pb)):
        diffs = []
        for f in FIGURES:
            x, y = pa[k].get(f), pb[k].get(f)
            d = abs(x - y) / max(abs(x), abs(y)) if x and y else None
            diffs.append(d)
            worst = max(worst, d or 0.0)
        print(f"{k[0]:<20} {k[1]:>6} {k[2]:>4}  " + "  ".join(f"{d:>17.1%} " if d is not None else f"{'—':>18}"
                                                               for d in diffs))
    missing = set(pa) ^ set(pb)
    if missing:
        print(f"points in only one run: {sorted(missing)}")
    print(f"largest difference between the runs: {worst:.1%} (target <= {TARGET:.0%}): "
          f"{'PASS' if worst <= TARGET and not missing else 'FAIL'}")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two bench output folders")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="results/repeatability")
    ap.add_argument("bench_args", nargs="*", help="passed to `hybridserve bench` (after --)")
    a = ap.parse_args()
    if a.compare:
        compare(Path(a.compare[0]), Path(a.compare[1]))
        return
    exe = Path(sys.executable).with_name("hybridserve")
    runs = []
    for i in (1, 2):
        out = Path(a.out) / f"run{i}"
        cmd = [str(exe), "bench", "--repeat", str(a.repeat), "--fresh", "--out", str(out), *a.bench_args]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                       stdout=subprocess.DEVNULL)
        runs.append(out)
    compare(*runs)


if __name__ == "__main__":
    main()
