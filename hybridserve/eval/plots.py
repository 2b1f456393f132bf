"""Eval plots (PNG, matplotlib's Agg backend): cost vs accuracy with its Pareto frontier,
and passkey accuracy vs context. Without matplotlib the plots are skipped (logged)."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def pareto(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """(label, cost, accuracy) points no other point beats on both (cheaper-or-equal and
    at-least-as-accurate, one strictly), sorted by cost."""
    front = [p for p in points
             if not any(q[1] <= p[1] and q[2] >= p[2] and (q[1] < p[1] or q[2] > p[2]) for q in points)]
    return sorted(front, key=lambda p: (p[1], p[2]))


def label_groups(points: list[tuple[str, float, float]], share: float = 0.06) -> dict[tuple[float, float], list[str]]:
    """Labels of points that would print over each other (closer than `share` of both axes'
    spans), gathered under the first such point, so a crowded corner stays readable."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    dx, dy = (max(xs) - min(xs)) or 1.0, max(1.0, (max(ys) - min(ys)) or 1.0)
    groups: dict[tuple[float, float], list[str]] = {}
    for label, x, y in points:
        home = next((k for k in groups if abs(k[0] - x) < share * dx and abs(k[1] - y) < share * dy), (x, y))
        groups.setdefault(home, []).append(label)
    return groups


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'hybridserve[bench]'); no plots")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cost_vs_accuracy(rows: list[dict], path: Path) -> bool:
    plt = _pyplot()
    pts = [(r["target"], r["usd_per_request"], r["accuracy"]) for r in rows if r["tag"] == "all"]
    if plt is None or not pts:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, cost, acc in pts:
        ax.scatter([cost], [acc], s=40)
    for (cost, acc), names in label_groups(pts).items():
        ax.annotate("\n".join(names), (cost, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = pareto(pts)
    ax.step([p[1] for p in front], [p[2] for p in front], where="post", color="black", lw=1,
            ls="--", label="Pareto frontier")
    ax.set_xlabel("$ per request (measured)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("cost vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def passkey_by_context(results: list[dict], targets: list[str]) -> dict[str, list[tuple[int, float, int]]]:
    """Per target: [(context_tokens, accuracy, n)] over passkey results, by context."""
    out = {}
    for t in targets:
        by_ctx: dict[int, list[bool]] = {}
        for r in results:
            if r["target"] == t and "passkey" in (r.get("tags") or []) and r.get("context_tokens"):
                by_ctx.setdefault(int(r["context_tokens"]), []).append(bool(r["correct"]))
        if by_ctx:
            out[t] = [(c, sum(v) / len(v), len(v)) for c, v in sorted(by_ctx.items())]
    return out


def passkey_vs_context(results: list[dict], targets: list[str], path: Path) -> bool:
    plt = _pyplot()
    lines = passkey_by_context(results, targets)
    if plt is None or not lines:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in lines.values() for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("passkey retrieval vs context")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
