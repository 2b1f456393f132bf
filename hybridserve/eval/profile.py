"""The quality profile (`quality_profile.json`): what the gateway learns from an eval.

Exactly this shape (version 1); the gateway reads it, so keep it stable:

    {"object": "quality_profile", "version": 1, "created": <unix time>, "eval": "<dataset name>",
     "targets": {
       "<label>": {"model": "<model string>", "params": {<extra body fields>},
                   "tags": {"all": {"n", "correct", "accuracy", "wilson_low", "wilson_high",
                                    "usd_per_request", "usd_per_correct" (null when 0 correct)},
                            "<tag>": {...same...}},
                   "calibration": {"bins": [{"low": float|null, "high": float|null,
                                             "n", "correct", "accuracy"}],
                                   "threshold": float|null, "target_accuracy": float|null}}},
     "cascades": [{"rungs": ["<label A>", "<label B>"], "thresholds": [float],
                   "target_accuracy", "predicted_accuracy", "predicted_usd_per_request",
                   "deep_accuracy", "deep_usd_per_request", "escalate_share"}]}

Bins are over the answer's mean token logprob: `low: null` is -inf, `high: null` is
+inf, a bin holds low <= conf < high. `calibration.threshold` is the lowest confidence
whose kept answers (conf >= threshold) reach `target_accuracy` alone (null when none
does or no target accuracy applies). A cascade escalates from A to B when A's
confidence is unknown or below `thresholds[0]` (see `calibration` for how it is chosen
and how ±inf are written).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from hybridserve.eval import calibration as cal

logger = logging.getLogger(__name__)

TAG_KEYS = ("n", "correct", "accuracy", "wilson_low", "wilson_high", "usd_per_request", "usd_per_correct")
CASCADE_KEYS = ("target_accuracy", "predicted_accuracy", "predicted_usd_per_request", "deep_accuracy",
                "deep_usd_per_request", "escalate_share")


def _target_entry(info: dict, rows: list[dict], results: list[dict], target_accuracy: float | None) -> dict:
    tags = {r["tag"]: {k: r[k] for k in TAG_KEYS} for r in rows}
    return {"model": info["model"], "params": info.get("params") or {}, "tags": tags,
            "calibration": {"bins": cal.bins(results),
                            "threshold": cal.keep_threshold(results, target_accuracy),
                            "target_accuracy": target_accuracy}}


def cascade_entry(rungs: list[str], c: dict) -> dict:
    return {"rungs": rungs, "thresholds": [c["written_threshold"]], **{k: c[k] for k in CASCADE_KEYS}}


def build(eval_name: str, targets: list[dict], rows: list[dict], results: list[dict],
          cascades: list[tuple[list[str], dict]], target_accuracy: float | None) -> dict:
    """`targets`: [{label, model, params}]; `cascades`: [(rungs, calibration.cascade(...))]."""
    cheap_goal = {rungs[0]: c["target_accuracy"] for rungs, c in cascades}
    out_targets = {}
    for t in targets:
        label = t["label"]
        goal = target_accuracy if target_accuracy is not None else cheap_goal.get(label)
        mine = [r for r in results if r["target"] == label]
        out_targets[label] = _target_entry(t, [r for r in rows if r["target"] == label], mine, goal)
    return {"object": "quality_profile", "version": 1, "created": int(time.time()), "eval": eval_name,
            "targets": out_targets, "cascades": [cascade_entry(r, c) for r, c in cascades]}


def write(profile: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(profile, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
