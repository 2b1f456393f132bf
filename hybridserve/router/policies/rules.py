"""Explicit rules: first match on prompt length, tier, API key or agent step kind wins."""
from __future__ import annotations

from dataclasses import dataclass

from hybridserve.router.policies.base import Decision, Policy, RouteRequest, Snapshot, no_backend


@dataclass(frozen=True)
class Rule:
    target: str                      # a backend name or a tier name
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    tier: str | None = None
    api_key_id: str | None = None
    step_kind: str | None = None

    def matches(self, req: RouteRequest) -> bool:
        return ((self.min_prompt_tokens is None or req.prompt_tokens >= self.min_prompt_tokens)
                and (self.max_prompt_tokens is None or req.prompt_tokens <= self.max_prompt_tokens)
                and (self.tier is None or req.tier == self.tier)
                and (self.api_key_id is None or req.api_key_id == self.api_key_id)
                and (self.step_kind is None or req.step_kind == self.step_kind))

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.__dict__.items() if v is not None and k != "target"]
        return " and ".join(parts) or "always"


class Rules:
    name = "rules"

    def __init__(self, rules: list[Rule], fallback: Policy):
        self.rules = rules
        self.fallback = fallback

    def choose(self, req: RouteRequest, snap: Snapshot) -> Decision:
        cands = snap.candidates(req.__class__(**{**req.__dict__, "tier": None}))
        for i, rule in enumerate(self.rules):
            if not rule.matches(req):
                continue
            hits = [b for b in cands if rule.target in (b.name, b.tier)]
            if hits:
                b = min(hits, key=lambda h: (h.load, h.name))
                return Decision(b.name, self.name, f"rule {i + 1} ({rule.describe()} → {rule.target})",
                                tuple(h.name for h in hits if h is not b))
        d = self.fallback.choose(req, snap)
        if d.backend is None:
            return no_backend(self.name, req)
        return Decision(d.backend, self.name, f"no rule matched; {d.policy}: {d.reason}", d.fallbacks, d.estimates)
