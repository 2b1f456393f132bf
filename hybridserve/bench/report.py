"""Harness outputs: points.json / points.csv, report.md, PNG plots and the economics profile."""
from __future__ import annotations

import csv
import json
import statistics
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


# Figures whose spread over rounds is reported (min, max and (max - min) / median).
SPREAD = ("prefill_tok_s", "decode_tok_s", "ttft_p50_s", "tpot_p50_s", "usd_per_1m_input", "usd_per_1m_output")


def aggregate(rounds: list[dict]) -> list[dict]:
    """One record per point from its rounds: every numeric figure the median over the rounds,
    and for the SPREAD figures `<figure>_min`, `<figure>_max` and `<figure>_spread`."""
    by_point: dict[str, list[dict]] = {}
    for r in rounds:
        key = r["key"].removesuffix(f"|r{r['round']}") if r.get("round") else r["key"]
        by_point.setdefault(key, []).append(r)
    out = []
    for key, runs in by_point.items():
        rec = {**runs[0], "key": key, "rounds": len(runs)}
        rec.pop("round", None)
        for name, v in runs[0].items():
            vals = [r.get(name) for r in runs]
            if len(set(vals)) > 1 and isinstance(v, (int, float)) and not isinstance(v, bool) and all(
                    isinstance(x, (int, float)) for x in vals):   # equal values (the point's own) stay as they are
                rec[name] = statistics.median(vals)
        for name in SPREAD:
            vals = [r[name] for r in runs if r.get(name) is not None]
            if vals:
                rec[f"{name}_min"], rec[f"{name}_max"] = min(vals), max(vals)
                med = statistics.median(vals)
                rec[f"{name}_spread"] = (max(vals) - min(vals)) / med if med else None
        out.append(rec)
    return out


def crossover_intervals(rounds: list[dict]) -> dict:
    """Per concurrency, the crossover context of each round and their range: how sure the
    'hybrid is cheaper from context X' verdict is."""
    per_round = [crossovers([r for r in rounds if r.get("round") == i])
                 for i in sorted({r.get("round", 0) for r in rounds})]
    out = {}
    for conc in (per_round[0].get("by_concurrency") or {}) if per_round else {}:
        seen = [c.get("by_concurrency", {}).get(conc) for c in per_round]
        found = [x for x in seen if x]
        out[conc] = {"per_round": seen, "low": min(found) if found else None,
                     "high": max(found) if found else None, "all_rounds_agree": len(set(seen)) == 1}
    return out


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
        pts = sorted((r["context"], r[metric], r.get(f"{metric}_min"), r.get(f"{metric}_max")) for r in records
                     if r["backend"] == backend and r["concurrency"] == conc and r.get(metric) is not None)
        if not pts:
            continue
        xs, ys, lo, hi = zip(*pts)
        if metric == "cache_bytes_per_seq":
            ys = [y / 2**20 for y in ys]
        label = backend if per_seq_metric else f"{backend} (c={conc})"
        line = "-" if per_seq_metric else style[conc]
        if all(v is not None for v in lo + hi):   # measured over rounds: the min-max range as error bars
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                        marker="o", label=label, color=colour[backend], linestyle=line, capsize=3)
        else:
            ax.plot(xs, ys, marker="o", label=label, color=colour[backend], linestyle=line)
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


def _spread(r: dict, name: str, digits: int) -> str:
    """`median (±x%)` for a point measured over rounds, else the value."""
    s = r.get(f"{name}_spread")
    return _fmt(r[name], digits) + (f" (±{s / 2:.0%})" if s is not None else "")


def _markdown(records, cross: dict, summary: dict) -> str:
    lines = ["# hybridserve bench report", ""]
    rounds = records[0].get("rounds") if records else None
    if rounds:
        lines += [f"Each point: the median of {rounds} rounds over the grid (backends alternated); ± is "
                  "half the min-max range over the rounds, relative to the median.", ""]
    intervals = summary.get("crossover_intervals") or {}
    if cross:
        for conc, ctx in cross["by_concurrency"].items():
            verdict = (f"from context **{ctx}** on, {cross['hybrid']} costs less per 1M output tokens than "
                       f"{cross['transformer']}" if ctx else
                       f"{cross['hybrid']} is not cheaper than {cross['transformer']} at any measured context")
            iv = intervals.get(conc)
            if iv:
                rng = (f"{iv['low']}–{iv['high']}" if iv["low"] is not None else "none")
                verdict += (f" (per round: {', '.join(str(x or '—') for x in iv['per_round'])}; range {rng})")
            lines.append(f"* concurrency {conc}: {verdict}.")
        for row in summary.get("cache_ratio", []):
            lines.append(f"* context {row['context']}: hybrid cache per sequence = {row['ratio']:.1%} of the "
                         f"transformer's; it fits {row['concurrency_ratio']:.2f}× as many sequences in the same budget.")
        lines.append("")
    lines += ["| backend | ctx | conc | prefill tok/s | decode tok/s | per seq | TTFT p50 s | TPOT p50 s | "
              "cache MiB/seq | fit | $/1M in | $/1M out |", "|" + "---|" * 12]
    for r in sorted(records, key=lambda r: (r["backend"], r["context"], r["concurrency"])):
        lines.append(f"| {r['backend']} | {r['context']} | {r['concurrency']} | {_fmt(r['prefill_tok_s'])} | "
                     f"{_spread(r, 'decode_tok_s', 1)} | {_fmt(r['decode_tok_s_per_seq'])} | "
                     f"{_spread(r, 'ttft_p50_s', 3)} | {_fmt(r['tpot_p50_s'], 4)} | "
                     f"{r['cache_bytes_per_seq'] / 2**20:.2f} | {r['max_concurrency']} | "
                     f"{_fmt(r['usd_per_1m_input'], 3)} | {_spread(r, 'usd_per_1m_output', 3)} |")
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


def write_all(records: list[dict], out: Path, host: dict, rounds: list[dict] | None = None) -> dict:
    """Every output from the points (`rounds`: each round's records, when measured repeatedly;
    also written to rounds.json)."""
    out = Path(out)
    (out / "points.json").write_text(json.dumps(records, indent=1) + "\n")
    with (out / "points.csv").open("w", newline="") as fh:
        spread = [f"{n}_{k}" for n in SPREAD for k in ("min", "max", "spread")] if rounds else []
        w = csv.DictWriter(fh, fieldnames=COLUMNS + (["rounds"] if rounds else []) + spread,
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    cross = crossovers(records)
    summary = {"bench": "hybridserve", "points": len(records), "crossover": cross,
               "cache_ratio": _cache_ratios(records, cross)}
    if rounds:
        summary["rounds"] = len({r["round"] for r in rounds})
        summary["crossover_intervals"] = crossover_intervals(rounds)
        summary["max_spread"] = {name: max((r.get(f"{name}_spread") or 0.0) for r in records) for name in SPREAD}
        (out / "rounds.json").write_text(json.dumps(rounds, indent=1) + "\n")
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
