"""Measured answer quality per backend: the quality profile `hybridserve eval` writes, read as a table.

Profile (JSON):

    {"object": "quality_profile", "version": 1, "created": <unix time>, "eval": "<dataset>",
     "targets": {"<label>": {"model": "<model string sent>", "params": {<extra body fields>},
                             "tags": {"all": {"n", "correct", "accuracy", "wilson_low", "wilson_high",
                                              "usd_per_request", "usd_per_correct"},
                                      "<tag>": {...}},
                             "calibration": {"bins": [...], "threshold": float|null,
                                             "target_accuracy": float|null}}},
     "cascades": [{"rungs": ["<label>", ...], "thresholds": [float, ...], ...}]}

A backend's measured quality is the target whose label is the backend's name and whose
params are empty; failing that, the first target whose `model` is the backend's name with
empty params. Targets with params (e.g. `{"n": 5, "hybridserve_vote": true}`) measure a
backend *with* test-time compute and only ever serve as cascade rungs.

`QualityTable` is pure lookups on the loaded profile: `accuracy(backend, task)` says which
figure it used ("tag arith", "overall" for the `all` tag, or "unmeasured").
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

PROFILE_OBJECT = "quality_profile"
PROFILE_VERSION = 1
OVERALL = "all"
FIX = "regenerate it with `hybridserve eval`"


class Measured(NamedTuple):
    """One accuracy figure and where it came from."""

    accuracy: float | None
    source: str            # "tag <name>" | "overall" | "unmeasured"


def _number(v: Any, lo: float | None = None, hi: float | None = None) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def _check_tag(where: str, tag: Any) -> None:
    if not isinstance(tag, dict):
        raise ValueError(f"{where} must be an object with n, correct and accuracy; {FIX}")
    for key in ("n", "correct"):
        if not isinstance(tag.get(key), int) or isinstance(tag.get(key), bool) or tag[key] < 0:
            raise ValueError(f"{where}.{key} must be an integer >= 0 (got {tag.get(key)!r}); {FIX}")
    if not _number(tag.get("accuracy"), 0.0, 1.0):
        raise ValueError(f"{where}.accuracy must be a number in 0..1 (got {tag.get('accuracy')!r}); {FIX}")


def _check_target(label: str, t: Any) -> None:
    where = f"targets.{label}"
    if not isinstance(t, dict):
        raise ValueError(f"{where} must be an object with model, params and tags; {FIX}")
    if not isinstance(t.get("model"), str) or not t["model"]:
        raise ValueError(f"{where}.model must be the model string that was sent (got {t.get('model')!r}); {FIX}")
    if not isinstance(t.get("params", {}), dict):
        raise ValueError(f"{where}.params must be an object of body fields (got {t.get('params')!r}); {FIX}")
    tags = t.get("tags")
    if not isinstance(tags, dict) or OVERALL not in tags:
        raise ValueError(f"{where}.tags must be an object with at least the '{OVERALL}' tag; {FIX}")
    for name, tag in tags.items():
        _check_tag(f"{where}.tags.{name}", tag)
    thr = (t.get("calibration") or {}).get("threshold")
    if thr is not None and not _number(thr):
        raise ValueError(f"{where}.calibration.threshold must be a number or null (got {thr!r}); {FIX}")


def _check_cascade(i: int, c: Any, targets: dict) -> None:
    where = f"cascades[{i}]"
    rungs = c.get("rungs") if isinstance(c, dict) else None
    if not isinstance(rungs, list) or len(rungs) < 2 or not all(isinstance(r, str) for r in rungs):
        raise ValueError(f"{where}.rungs must list two or more target labels; {FIX}")
    missing = [r for r in rungs if r not in targets]
    if missing:
        raise ValueError(f"{where}.rungs names targets the profile lacks: {missing}; {FIX}")
    thr = c.get("thresholds")
    if not isinstance(thr, list) or len(thr) != len(rungs) - 1 or not all(_number(x) for x in thr):
        raise ValueError(f"{where}.thresholds must hold {len(rungs) - 1} number(s), one per rung "
                         f"that may escalate (got {thr!r}); {FIX}")


def check_profile(data: Any) -> dict:
    """Validate a parsed profile; ValueError names the field and the fix. Returns it."""
    if not isinstance(data, dict) or data.get("object") != PROFILE_OBJECT:
        got = data.get("object") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"not a quality profile (object {got!r}, expected '{PROFILE_OBJECT}'); "
                         f"write one with `hybridserve eval`")
    if data.get("version") != PROFILE_VERSION:
        raise ValueError(f"version must be {PROFILE_VERSION} (got {data.get('version')!r}); {FIX}")
    targets = data.get("targets")
    if not isinstance(targets, dict):
        raise ValueError(f"targets must be an object of label -> target; {FIX}")
    for label, t in targets.items():
        _check_target(label, t)
    cascades = data.get("cascades", [])
    if not isinstance(cascades, list):
        raise ValueError(f"cascades must be a list; {FIX}")
    for i, c in enumerate(cascades):
        _check_cascade(i, c, targets)
    return data


def load_quality_profile(path: str | Path) -> dict:
    """Read and validate a quality profile; ValueError (or OSError) says what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {FIX}") from None
    try:
        return check_profile(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


class QualityTable:
    """Pure lookups on a (validated) quality profile; an empty table measures nothing."""

    def __init__(self, profile: dict | None = None):
        self.profile = profile or {}
        self.targets: dict[str, dict] = dict(self.profile.get("targets") or {})
        self.cascades: list[dict] = list(self.profile.get("cascades") or [])

    def __bool__(self) -> bool:
        return bool(self.targets)

    def target_of(self, backend: str) -> dict | None:
        """The target that measures `backend` alone (label = name, else model = name; no params)."""
        t = self.targets.get(backend)
        if t is not None and not t.get("params"):
            return t
        return next((t for t in self.targets.values() if t.get("model") == backend and not t.get("params")),
                    None)

    def accuracy(self, backend: str, task: str | None = None) -> Measured:
        """The backend's accuracy on `task` (its tag), else overall; unmeasured when no target."""
        t = self.target_of(backend)
        if t is None:
            return Measured(None, "unmeasured")
        tags = t["tags"]
        if task and task != OVERALL and task in tags:
            return Measured(float(tags[task]["accuracy"]), f"tag {task}")
        return Measured(float(tags[OVERALL]["accuracy"]), "overall")

    def rung_target(self, name: str, backend: str, params: dict) -> dict | None:
        """The target a cascade rung was measured as: label = rung name, else same model and params."""
        if name in self.targets:
            return self.targets[name]
        return next((t for t in self.targets.values()
                     if t.get("model") == backend and (t.get("params") or {}) == (params or {})), None)

    def cascade_thresholds(self, labels: list[str]) -> list[float] | None:
        """The profile's thresholds for exactly this rung sequence (None when it has none)."""
        c = next((c for c in self.cascades if c["rungs"] == list(labels)), None)
        return [float(x) for x in c["thresholds"]] if c else None

    def summary(self) -> dict[str, dict]:
        """Per target: model, params, overall accuracy and the tags measured (for /v1/economics)."""
        return {label: {"model": t["model"], "params": t.get("params") or {},
                        "accuracy": t["tags"][OVERALL]["accuracy"], "n": t["tags"][OVERALL]["n"],
                        "tags": sorted(k for k in t["tags"] if k != OVERALL)}
                for label, t in self.targets.items()}


def rung_thresholds(table: QualityTable, rungs: list[tuple[str, str, dict]],
                    default: float) -> list[tuple[float | None, str]]:
    """Each rung's escalation threshold and where it came from, for rungs (name, backend, params).

    Order of preference: the profile's `cascades` entry whose rungs equal these names (its
    thresholds), else the rung's own target's `calibration.threshold`, else `default`
    (gateway.cascade_threshold). The last rung never escalates: (None, "last rung").
    """
    names = [r[0] for r in rungs]
    whole = table.cascade_thresholds(names)
    out: list[tuple[float | None, str]] = []
    for i, (name, backend, params) in enumerate(rungs):
        if i == len(rungs) - 1:
            out.append((None, "last rung"))
        elif whole is not None:
            out.append((whole[i], "profile cascade"))
        else:
            t = table.rung_target(name, backend, params)
            thr = ((t or {}).get("calibration") or {}).get("threshold")
            out.append((float(thr), f"calibration of {name}") if thr is not None
                       else (default, "gateway.cascade_threshold"))
    return out
