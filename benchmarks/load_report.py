"""Append a locust run's figures (from its --csv stats) to the bench report.

    python benchmarks/load_report.py results/load results/bench/report.md

Reads `<prefix>_stats.csv`, prints a table, appends it to the report as a
"Load test" section, and ends with one JSON line.
"""
import csv
import json
import sys
from pathlib import Path


def main(prefix: str, report: str) -> None:
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))
    table = ["| request | type | count | failures | median ms | p95 ms | p99 ms | req/s |", "|" + "---|" * 8]
    figures = []
    for r in rows:
        fig = {"name": r["Name"], "type": r["Type"], "count": int(r["Request Count"]),
               "failures": int(r["Failure Count"]), "p50_ms": float(r["50%"] or 0),
               "p95_ms": float(r["95%"] or 0), "p99_ms": float(r["99%"] or 0), "rps": float(r["Requests/s"] or 0)}
        figures.append(fig)
        table.append(f"| {fig['name']} | {fig['type']} | {fig['count']} | {fig['failures']} | {fig['p50_ms']:.0f} | "
                     f"{fig['p95_ms']:.0f} | {fig['p99_ms']:.0f} | {fig['rps']:.2f} |")
    text = "\n".join(["", "## Load test (locust, mixed workload through the gateway)", ""] + table) + "\n"
    print(text)
    path = Path(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(text)
    print(json.dumps({"bench": "load", "rows": figures}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
