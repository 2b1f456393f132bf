"""Harness outputs: points.json / points.csv, report.md, PNG plots and the economics profile."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from hybridserve.router.economics import crossover_context, new_profile, save_profile

PLOTS = {
    "decode_tok_s.png": ("decode_tok_s", "decode tokens/s (all sequences)", "decode throughput vs context"),
    "cache_bytes_per_seq.png": ("cache_bytes_per_seq", "cache MiB per sequence", "cache per sequence vs context"),
    "usd_per_1m_output.png": ("usd_per_1m_output", "$ per 1M output tokens", "cost vs context"),
    "max_concurrency.png": ("max_concurrency", "sequences that fit the cache budget", "capacity vs context"),
}
COLUMNS = ["backend", "arch", "engine", "context", "concurrency", "new_tokens", "prefill_tok_s", "decode_tok_s",
           "decode_tok_s_per_seq", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p50_s",
           "itl_p99_s", "cache_bytes_per_seq", "max_concurrency", "fits_budget", "peak_rss_mb",
           "usd_per_1m_input", "usd_per_1m_output", "price_per_hour"]


def _fmt(v, digits=1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def point_line(r: dict) -> str:
    return (f"{r['backend']:<20} ctx={r['context']:<6} c={r['concurrency']:<3} prefill {_fmt(r['prefill_tok_s'])} tok/s"
            f"  decode {_fmt(r['decode_tok_s'])} tok/s  TTFT p50 {_fmt(r['ttft_p50_s'], 3)} s"
            f"  cache {r['cache_bytes_per_seq'] / 2**20:.2f} MiB/seq  ${_fmt(r['usd_per_1m_output'], 3)}/1M out")


def _pair(records):
    by_arch = {}
    for r in records:
        by_arch.setdefault(r["arch"], []).append(r["backend"])
    t = sorted(set(by_arch.get("transformer", [])))
    h = sorted(set(by_arch.get("hybrid", [])))
    return (t[0], h[0]) if t and h else (None, None)


def crossovers(records) -> dict:
    """Per concurrency: the context from which the hybrid's $/1M output tokens stays below the transformer's."""
    t, h = _pair(records)
    if not t:
        return {}
    out = {}
    for conc in sorted({r["concurrency"] for r in records}):
        pts = lambda name: [r for r in records if r["backend"] == name and r["concurrency"] == conc]
        out[str(conc)] = crossover_context(pts(t), pts(h))
    return {"transformer": t, "hybrid": h, "by_concurrency": out}


def plot_vs_context(records, out: Path, name: str, metric: str, ylabel: str, title: str,
                    cross: dict | None = None) -> None:
    """One line per (backend, concurrency) of `metric` against context (log2 axis), saved to out/name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    series = sorted({(r["backend"], r["concurrency"]) for r in records})
    per_seq_metric = metric in ("cache_bytes_per_seq", "max_concurrency")
    seen = set()
    backends = sorted({b for b, _ in series})
    concs = sorted({c for _, c in series})
    colour = {b: f"C{i}" for i, b in enumerate(backends)}  # one colour per backend,
    style = {c: ("-", "--", ":", "-.")[i % 4] for i, c in enumerate(concs)}  # one line style per concurrency
    for backend, conc in series:
        if per_seq_metric and backend in seen:
            continue  # does not depend on concurrency
        seen.add(backend)
        pts = sorted((r["context"], r[metric]) for r in records
                     if r["backend"] == backend and r["concurrency"] == conc and r.get(metric) is not None)
        if not pts:
            continue
        xs, ys = zip(*pts)
        if metric == "cache_bytes_per_seq":
            ys = [y / 2**20 for y in ys]
        label = backend if per_seq_metric else f"{backend} (c={conc})"
        ax.plot(xs, ys, marker="o", label=label, color=colour[backend],
                linestyle="-" if per_seq_metric else style[conc])
    if metric == "usd_per_1m_output" and cross:
        for conc, ctx in cross.get("by_concurrency", {}).items():
            if ctx:
                ax.axvline(ctx, linestyle="--", color="grey", alpha=0.7)
                ax.annotate(f"hybrid cheaper from {ctx} (c={conc})", (ctx, ax.get_ylim()[1]), fontsize=8,
                            rotation=90, va="top", ha="right")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)


def _markdown(records, cross: dict, summary: dict) -> str:
    lines = ["# hybridserve bench report", ""]
    if cross:
        for conc, ctx in cross["by_concurrency"].items():
            verdict = (f"from context **{ctx}** on, {cross['hybrid']} costs less per 1M output tokens than "
                       f"{cross['transformer']}" if ctx else
                       f"{cross['hybrid']} is not cheaper than {cross['transformer']} at any measured context")
            lines.append(f"* concurrency {conc}: {verdict}.")
        for row in summary.get("cache_ratio", []):
            lines.append(f"* context {row['context']}: hybrid cache per sequence = {row['ratio']:.1%} of the "
                         f"transformer's; it fits {row['concurrency_ratio']:.2f}× as many sequences in the same budget.")
        lines.append("")
    lines += ["| backend | ctx | conc | prefill tok/s | decode tok/s | per seq | TTFT p50 s | TPOT p50 s | "
              "cache MiB/seq | fit | $/1M in | $/1M out |", "|" + "---|" * 12]
    for r in sorted(records, key=lambda r: (r["backend"], r["context"], r["concurrency"])):
        lines.append(f"| {r['backend']} | {r['context']} | {r['concurrency']} | {_fmt(r['prefill_tok_s'])} | "
                     f"{_fmt(r['decode_tok_s'])} | {_fmt(r['decode_tok_s_per_seq'])} | {_fmt(r['ttft_p50_s'], 3)} | "
                     f"{_fmt(r['tpot_p50_s'], 4)} | {r['cache_bytes_per_seq'] / 2**20:.2f} | {r['max_concurrency']} | "
                     f"{_fmt(r['usd_per_1m_input'], 3)} | {_fmt(r['usd_per_1m_output'], 3)} |")
    lines += ["", "Plots: " + ", ".join(f"[{n}]({n})" for n in PLOTS), ""]
    return "\n".join(lines)


def _cache_ratios(records, cross) -> list[dict]:
    if not cross:
        return []
    t = {r["context"]: r for r in records if r["backend"] == cross["transformer"]}
    h = {r["context"]: r for r in records if r["backend"] == cross["hybrid"]}
    rows = []
    for ctx in sorted(set(t) & set(h)):
        a, b = t[ctx], h[ctx]
        rows.append({"context": ctx, "ratio": b["cache_bytes_per_seq"] / a["cache_bytes_per_seq"],
                     "concurrency_ratio": (b["max_concurrency"] or 0) / max(1, a["max_concurrency"] or 0)})
    return rows


def write_all(records: list[dict], out: Path, host: dict) -> dict:
    out = Path(out)
    (out / "points.json").write_text(json.dumps(records, indent=1) + "\n")
    with (out / "points.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    cross = crossovers(records)
    summary = {"bench": "hybridserve", "points": len(records), "crossover": cross,
               "cache_ratio": _cache_ratios(records, cross)}
    for name, (metric, ylabel, title) in PLOTS.items():
        plot_vs_context(records, out, name, metric, ylabel, title, cross)
    (out / "report.md").write_text(_markdown(records, cross, summary))
    profile = new_profile(host)
    for r in records:
        entry = profile["backends"].setdefault(r["backend"], {
            "arch": r["arch"], "price_per_hour": r["price_per_hour"],
            "memory_budget_bytes": r["memory_budget_bytes"], "points": []})
        entry["points"].append({k: r[k] for k in COLUMNS if k in r and k not in ("backend", "arch", "engine",
                                                                                   "price_per_hour")})
    save_profile(profile, out / "economics_profile.json")
    summary["outputs"] = sorted(p.name for p in out.iterdir())
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
