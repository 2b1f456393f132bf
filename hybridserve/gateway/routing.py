"""Per-request routing in the gateway: which backend, by which policy, at what predicted cost.

The `Router` owns the live `EconomicsTable` (seeded from `gateway.economics_profile`,
else conservative defaults) and one instance of every policy. `decide` turns an
admitted request into a `Route`: a `Snapshot` is built from the registry's live
health, load and cache usage, the policy picks, and the route lists the backends to
try in order (the choice, its fallbacks, then any other healthy candidate).
`observe` folds a finished request's measured device-seconds back into the table.

The model name selects the policy: `auto` (and tier/alias groups) use
`gateway.policy`; `auto:cheapest`, `auto:fastest` and `auto:<policy>` override it;
a backend name pins the request. `X-Step-Kind` (agents) is matched against
`gateway.step_tiers` before the policy runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hybridserve.config import ConfigError, HybridserveConfig
from hybridserve.errors import BackendUnavailableError, InvalidRequestError
from hybridserve.gateway.registry import BackendState, Registry
from hybridserve.router.economics import context_bucket, load_profile
from hybridserve.router.policies import (POLICY_NAMES, BackendView, Decision, Rule, Rules, RouteRequest,
                                         Snapshot, make_policy)
from hybridserve.router.table import DEFAULT_DECODE_TOK_S, DEFAULT_PREFILL_TOK_S, EconomicsTable, Entry

logger = logging.getLogger(__name__)

BYTES_PER_TOKEN_GUESS = 4      # text → prompt tokens for pricing, inside admission's hard bounds
DEFAULT_OUTPUT_TOKENS = 256    # what an uncapped request is priced with


@dataclass
class Route:
    """Where one request goes and why."""

    decision: Decision
    order: list[BackendState]
    prompt_tokens: int            # the estimate the request was priced with
    max_tokens: int
    threshold: float | None = None  # cascade: escalate below this mean logprob (or verifier score)
    verifier: BackendState | None = None  # parallel_verify: who judges the drafts
    tried: list[dict] = field(default_factory=list)  # cascade: every tier tried, with its cost

    @property
    def policy(self) -> str:
        return self.decision.policy

    @property
    def cascade(self) -> bool:
        return self.threshold is not None

    def headers(self) -> dict[str, str]:
        reason = self.decision.reason.encode("ascii", "replace").decode()
        return {"x-hybridserve-policy": self.policy, "x-hybridserve-route-reason": reason}


def estimate_prompt_tokens(nbytes: int, lower: int, upper: int) -> int:
    return max(lower, min(upper, -(-nbytes // BYTES_PER_TOKEN_GUESS)))


def split_model(model: str) -> tuple[str, str | None]:
    """`auto:fastest` → ("auto", "fastest"); anything else → (model, None)."""
    if model.startswith("auto:"):
        return "auto", model[5:]
    return model, None


class Router:
    def __init__(self, cfg: HybridserveConfig, registry: Registry):
        gw = cfg.gateway
        self.registry = registry
        prices = {b.name: b.price_per_hour for b in cfg.backends}
        try:
            profile = load_profile(gw.economics_profile) if gw.economics_profile else {}
        except (OSError, ValueError) as err:
            raise ConfigError(f"gateway.economics_profile: {err}; write one with `hybridserve bench` "
                              "or remove the field") from None
        self.table = EconomicsTable.from_profile(profile, prices)
        for b in cfg.backends:  # unmeasured backends: one conservative default row each
            if not self.table.entries.get(b.name):
                self.table.entries[b.name] = [Entry(context_bucket(b.max_context), 1,
                                                    DEFAULT_PREFILL_TOK_S, DEFAULT_DECODE_TOK_S)]
        self.seeded = bool(profile)
        self.default_policy = gw.routing_policy()
        self.threshold = gw.cascade_threshold
        self.slo = (gw.slo_ttft_s, gw.slo_e2e_s)
        self.verifier = gw.verifier
        self.policies = {name: make_policy(name, threshold=gw.cascade_threshold, verifier=gw.verifier)
                         for name in POLICY_NAMES
                         if name != "rules" and (name != "parallel_verify" or gw.verifier)}
        self.step_rules = [Rule(target, step_kind=kind) for kind, target in gw.step_tiers.items()]
        self.policies["rules"] = Rules(self.step_rules, self.policies["economics"])
        by_price: dict[str, float] = {}
        for b in cfg.backends:
            by_price[b.tier] = min(by_price.get(b.tier, b.price_per_hour), b.price_per_hour)
        self.tier_order = tuple(sorted(by_price, key=lambda t: by_price[t]))

    def view(self, b: BackendState) -> BackendView:
        c = b.config
        return BackendView(b.name, c.arch, c.tier, c.price_per_hour, c.max_context, b.healthy,
                           b.load(), b.cache_usage)

    def decide(self, model: str, pinned: bool, candidates: list[BackendState],
               preferred: frozenset[str], prompt_tokens: int, max_tokens: int | None,
               policy: str | None = None, step_kind: str | None = None,
               api_key_id: str | None = None) -> Route:
        cap = max_tokens or DEFAULT_OUTPUT_TOKENS
        if pinned:
            b = candidates[0]
            d = Decision(b.name, "pinned", f"model '{model}' names this backend")
            return Route(d, candidates, prompt_tokens, cap)
        name = policy or self.default_policy
        pol = self.policies.get(name)
        if pol is None:
            raise InvalidRequestError(f"policy '{name}' is not available here: it needs "
                                      "gateway.verifier in models.yaml", param="model")
        if step_kind and any(r.step_kind == step_kind for r in self.step_rules):
            pol = Rules(self.step_rules, pol)
        pool = [b for b in candidates if b.name in preferred] or candidates
        snap = Snapshot(tuple(self.view(b) for b in pool), self.table, self.tier_order)
        req = RouteRequest(prompt_tokens, cap, api_key_id=api_key_id, step_kind=step_kind,
                           slo_ttft_s=self.slo[0], slo_e2e_s=self.slo[1])
        d = pol.choose(req, snap)
        if d.backend is None:
            names = ", ".join(b.name for b in candidates)
            raise BackendUnavailableError(f"no healthy backend for this model (tried: {names}); "
                                          "retry shortly")
        if not d.estimates:  # baselines do not price: price the choice for the receipt and ledger
            d = Decision(d.backend, d.policy, d.reason, d.fallbacks,
                         (self.table.predict(d.backend, prompt_tokens, cap),))
        names = [d.backend, *d.fallbacks]
        rest = [b for b in candidates if b.healthy and b.name not in names]
        order = [self.registry.backends[n] for n in names] + rest
        threshold = self.threshold if d.policy in ("cascade", "parallel_verify") else None
        verifier = self.registry.backends[self.verifier] if d.policy == "parallel_verify" else None
        return Route(d, order, prompt_tokens, cap, threshold, verifier)

    def predict_usd(self, backend: str, prompt_tokens: int, max_tokens: int) -> float:
        b = self.registry.backends[backend]
        return self.table.predict(backend, prompt_tokens, max_tokens, int(b.load()) + 1).usd

    def observe(self, b: BackendState, usage: dict) -> float:
        """Fold one finished request into the table; return its measured cost in USD."""
        device_s = float(usage.get("device_seconds") or 0.0)
        self.table.observe(b.name, int(usage.get("prompt_tokens") or 0),
                           int(usage.get("completion_tokens") or 0), device_s,
                           concurrency=int(b.load()) + 1)
        return b.config.price_per_hour / 3600.0 * device_s

    def economics(self) -> dict:
        """The body of GET /v1/economics."""
        live = {b.name: {"healthy": b.healthy, "load": b.load(), "inflight": b.inflight,
                         "cache_usage": b.cache_usage, "price_per_hour": b.config.price_per_hour,
                         "tier": b.config.tier}
                for b in self.registry.backends.values()}
        return {"object": "economics", "policy": self.default_policy, "seeded": self.seeded,
                "tier_order": list(self.tier_order), "backends": live, "rows": self.table.rows()}
