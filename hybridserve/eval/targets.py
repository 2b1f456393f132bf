"""Eval targets: what is evaluated, as `[label=]model[+key=value...]`.

`model` is sent as the request's `model` (a backend, `auto`, `auto:cascade`, ...); each
`+key=value` is merged into every request body, the value parsed as JSON when it parses
(`n=5` -> 5, `hybridserve_vote=true` -> true) and kept as a string otherwise. The label
defaults to the spec itself. With no `--target`, `discover` lists the backends of
GET /v1/models: cards that are not aliases (owned_by `*-alias`, or with `backends`) and
whose id does not start with `auto`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Target:
    label: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"label": self.label, "model": self.model, "params": self.params}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_target(spec: str) -> Target:
    """`[label=]model[+key=value...]` -> Target; ValueError on an empty model or a bad pair."""
    head, *pairs = spec.strip().split("+")
    label, sep, model = head.partition("=")
    if not sep:
        label, model = "", head
    model = model.strip()
    if not model:
        raise ValueError(f"target {spec!r}: no model")
    params: dict[str, Any] = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"target {spec!r}: {p!r} is not key=value")
        params[key.strip()] = _value(val.strip())
    return Target(label=label.strip() or spec.strip(), model=model, params=params)


def parse_targets(specs: list[str]) -> list[Target]:
    targets = [parse_target(s) for s in specs]
    labels = [t.label for t in targets]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ValueError("duplicate target label(s): " + ", ".join(sorted(dup)))
    return targets


def is_backend_card(card: dict) -> bool:
    mid = str(card.get("id", ""))
    owner = str(card.get("owned_by", ""))
    return bool(mid) and not mid.startswith("auto") and not owner.endswith("alias") and "backends" not in card


def discover(url: str, headers: dict | None = None, timeout_s: float = 10.0) -> list[Target]:
    """Every backend GET {url}/models lists, as a target labelled by its name."""
    import httpx

    r = httpx.get(url.rstrip("/") + "/models", headers=headers or {}, timeout=timeout_s, trust_env=False)
    r.raise_for_status()
    cards = r.json().get("data") or []
    names = [c["id"] for c in cards if isinstance(c, dict) and is_backend_card(c)]
    if not names:
        raise ValueError(f"{url}/models lists no backend; pass --target MODEL")
    return [Target(label=n, model=n) for n in names]
