"""Eval outputs: results.json / results.csv, report.md, plots and the quality profile.

`write_all` turns one run's records into every output in `out` and returns the summary
printed as the last stdout line: `{"eval": name, "results": [row, ...]}`, one row per
target × tag (tag `all` included) with n, correct, accuracy, wilson_low, wilson_high,
usd_per_request, usd_per_correct (null when nothing is correct), win_rate (null without
a decisive item), wins, losses, ties, tokens, latency and errors.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

from hybridserve.eval import calibration as cal
from hybridserve.eval import plots, profile, stats

logger = logging.getLogger(__name__)

ROW_KEYS = ["target", "tag", "n", "correct", "accuracy", "wilson_low", "wilson_high", "usd_per_request",
            "usd_per_correct", "win_rate", "wins", "losses", "ties", "usd_total", "prompt_tokens_mean",
            "completion_tokens_mean", "latency_p50_s", "latency_p95_s", "errors"]
RESULT_COLUMNS = ["target", "model", "id", "tags", "correct", "detail", "answer", "mean_logprob", "cost_usd",
                  "prompt_tokens", "completion_tokens", "latency_s", "backend", "status", "error",
                  "context_tokens", "depth"]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if v == 0 or abs(v) >= 10 ** -digits else f"{v:.2e}"
    return str(v)


def _tok(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _md_table(head: list[str], body: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(_fmt(c) for c in row) + " |" for row in body]


def _score_section(rows: list[dict], reference: str) -> list[str]:
    head = ["target", "tag", "n", "correct", "accuracy", "95% CI", f"win/loss/tie vs {reference}", "win rate",
            "$/request", "$/correct", "prompt tok", "completion tok", "p50 s", "p95 s", "errors"]
    body = [[r["target"], r["tag"], r["n"], r["correct"], r["accuracy"],
             f"{r['wilson_low']:.3f}–{r['wilson_high']:.3f}", f"{r['wins']}/{r['losses']}/{r['ties']}",
             r["win_rate"], r["usd_per_request"], r["usd_per_correct"], _tok(r["prompt_tokens_mean"]),
             _tok(r["completion_tokens_mean"]), r["latency_p50_s"], r["latency_p95_s"], r["errors"]] for r in rows]
    return _md_table(head, body)


def _calibration_section(prof: dict) -> list[str]:
    lines = ["", "## Calibration (accuracy by mean token logprob)", ""]
    for label, t in prof["targets"].items():
        c = t["calibration"]
        if not c["bins"]:
            lines.append(f"- {label}: no logprobs returned")
            continue
        cells = ", ".join(f"[{_fmt(b['low'])}, {_fmt(b['high'])}): {b['correct']}/{b['n']}" for b in c["bins"])
        lines.append(f"- {label}: {cells}; keep threshold {_fmt(c['threshold'])} for accuracy "
                     f"{_fmt(c['target_accuracy'])}")
    for cs in prof["cascades"]:
        a, b = cs["rungs"]
        lines.append(f"- cascade {a} → {b}: escalate below {_fmt(cs['thresholds'][0])}; "
                     f"predicted accuracy {_fmt(cs['predicted_accuracy'])} (target {_fmt(cs['target_accuracy'])}, "
                     f"{b} alone {_fmt(cs['deep_accuracy'])}) at ${_fmt(cs['predicted_usd_per_request'])}/request "
                     f"(vs ${_fmt(cs['deep_usd_per_request'])}), {100 * cs['escalate_share']:.0f}% escalated")
    return lines


def markdown(name: str, rows: list[dict], reference: str, prof: dict, pngs: list[str], problems: int) -> str:
    lines = [f"# Eval: {name}", "", f"Reference target for win rates: **{reference}**. Win rate = wins / "
             "(wins + losses); ties are both right or both wrong. $/correct is — when nothing is correct.", ""]
    if problems:
        lines += [f"{problems} malformed dataset line(s) were skipped.", ""]
    lines += _score_section(rows, reference) + _calibration_section(prof)
    lines += [""] + [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


def write_results(records: list[dict], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(records, indent=1))
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, "tags": ";".join(r.get("tags") or [])})


def _cascades(records: list[dict], pairs: list[tuple[str, str]], goal: float | None) -> list[tuple[list[str], dict]]:
    out = []
    for a, b in pairs:
        c = cal.cascade([r for r in records if r["target"] == a], [r for r in records if r["target"] == b], goal)
        if c is None:
            logger.warning("cascade %s,%s: the two targets share no item; skipped", a, b)
        else:
            out.append(([a, b], c))
    return out


def write_all(name: str, targets: list[dict], records: list[dict], out: Path, reference: str | None = None,
              cascades: list[tuple[str, str]] = (), target_accuracy: float | None = None,
              profile_out: Path | None = None, problems: int = 0) -> dict:
    """Every output for `records` of `targets` ([{label, model, params}]) into out; the summary."""
    labels = [t["label"] for t in targets]
    reference = reference or labels[0]
    rows = stats.table(records, labels, reference)
    prof = profile.build(name, targets, rows, records, _cascades(records, list(cascades), target_accuracy),
                         target_accuracy)
    profile.write(prof, out / "quality_profile.json")
    if profile_out:
        Path(profile_out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "quality_profile.json", profile_out)
    write_results(records, out)
    pngs = [p for p, ok in (("cost_vs_accuracy.png", plots.cost_vs_accuracy(rows, out / "cost_vs_accuracy.png")),
                            ("passkey_vs_context.png",
                             plots.passkey_vs_context(records, labels, out / "passkey_vs_context.png"))) if ok]
    (out / "report.md").write_text(markdown(name, rows, reference, prof, pngs, problems))
    return {"eval": name, "reference": reference, "results": [{k: r[k] for k in ROW_KEYS} for r in rows]}
