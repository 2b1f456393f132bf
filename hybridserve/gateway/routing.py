"""Per-request routing in the gateway: which backend, by which policy, at what predicted cost.

The `Router` owns the live `EconomicsTable` (seeded from `gateway.economics_profile`,
else from config arithmetic: router/estimate.py; a backend with neither gets
conservative defaults), the `QualityTable` (`gateway.quality_profile`, measured
accuracy per backend and task tag) and one instance of every policy. `decide` turns an
admitted request into a `Route`: a `Snapshot` is built from the registry's live
health, load and cache usage, the policy picks, and the route lists the backends to
try in order (the choice, its fallbacks, then any other healthy candidate).
`observe` folds a finished request's measured device-seconds back into the table.

The model name selects the policy: `auto` (and tier/alias groups) use
`gateway.policy`; `auto:cheapest`, `auto:fastest` and `auto:<policy>` override it;
a backend name pins the request. `X-Step-Kind` (agents) is matched against
`gateway.step_tiers` before the policy runs.

Tiers and quality: a tier name routes within that tier, an alias within the tier its
backends share (if they share one), plain `auto` within `gateway.default_tier` (when set;
not for cascade/parallel_verify or `mode: deep`, and any tier when that one has no healthy
backend, said in the reason). The quality floor is the request's
(`hybridserve_quality_floor` / `x-hybridserve-quality-floor`), else
`gateway.quality_floors[alias or tier]`, else `gateway.quality_floor`; the task kind is
`hybridserve_task` / `x-hybridserve-task`, else the step kind, else overall.

Cascade rungs (`gateway.cascade`): `auto:cascade` runs them in order; each rung's threshold
comes from the quality profile (router/quality.py `rung_thresholds`).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridserve.config import BackendConfig, ConfigError, HybridserveConfig
from hybridserve.errors import BackendUnavailableError, InvalidRequestError, OverloadedError
from hybridserve.gateway.affinity import Hint, PrefixAffinity
from hybridserve.gateway.outcome import cached_tokens
from hybridserve.gateway.registry import BackendState, Registry
from hybridserve.router.economics import context_bucket, load_profile
from hybridserve.router.estimate import config_params, file_params, safetensors_params, seed_entries
from hybridserve.router.policies import (POLICY_NAMES, BackendView, Decision, Rule, Rules, RouteRequest,
                                         Rung, Snapshot, make_policy)
from hybridserve.router.quality import QualityTable, load_quality_profile, rung_thresholds
from hybridserve.router.table import DEFAULT_DECODE_TOK_S, DEFAULT_PREFILL_TOK_S, EconomicsTable, Entry

logger = logging.getLogger(__name__)

BYTES_PER_TOKEN_GUESS = 4      # text → prompt tokens for pricing, inside admission's hard bounds
DEFAULT_OUTPUT_TOKENS = 256    # what an uncapped request is priced with
AUTO = "auto"
WALKS_TIERS = ("cascade", "parallel_verify")   # policies that escalate across tiers themselves
FLOOR_FIELD, FLOOR_HEADER = "hybridserve_quality_floor", "x-hybridserve-quality-floor"
TASK_FIELD, TASK_HEADER = "hybridserve_task", "x-hybridserve-task"
_TASK_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # whole string (fullmatch): no trailing newline


@dataclass(frozen=True)
class RouteRung:
    """One configured cascade rung, resolved: its backend, body params and threshold."""

    name: str
    backend: BackendState
    params: dict[str, Any]
    threshold: float | None     # escalate below this mean logprob (None: the last rung)
    source: str                 # where the threshold came from


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
    rungs: list[RouteRung] = field(default_factory=list)  # configured cascade: rungs to run in order

    @property
    def policy(self) -> str:
        return self.decision.policy

    @property
    def cascade(self) -> bool:
        return self.threshold is not None or bool(self.rungs)

    def headers(self) -> dict[str, str]:
        reason = self.decision.reason.encode("ascii", "replace").decode()
        return {"x-hybridserve-policy": self.policy, "x-hybridserve-route-reason": reason}


def estimate_prompt_tokens(nbytes: int, lower: int, upper: int) -> int:
    return max(lower, min(upper, -(-nbytes // BYTES_PER_TOKEN_GUESS)))


def _floor_value(v: Any, param: str) -> float:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise InvalidRequestError(f"`{param}` must be a number in 0..1, the least measured accuracy "
                                  f"the backend must have (got {v!r})", param=param)
    return float(v)


def request_quality(data: dict, headers: Any) -> tuple[float | None, str | None]:
    """The request's quality floor and task tag: body fields first, then headers; 400 names the bad one."""
    floor, task = data.get(FLOOR_FIELD), data.get(TASK_FIELD)
    floor_param, task_param = FLOOR_FIELD, TASK_FIELD
    if floor is None and headers.get(FLOOR_HEADER) is not None:
        floor, floor_param = headers.get(FLOOR_HEADER), FLOOR_HEADER
    if task is None and headers.get(TASK_HEADER) is not None:
        task, task_param = headers.get(TASK_HEADER), TASK_HEADER
    if task is not None and (not isinstance(task, str) or not _TASK_RE.fullmatch(task)):
        raise InvalidRequestError(f"`{task_param}` must be a task tag of letters, digits, '.', '_' or '-' "
                                  f"(1-64 chars), e.g. 'arith' (got {task!r})", param=task_param)
    return (None if floor is None else _floor_value(floor, floor_param)), task


def checkpoint_shape(b: BackendConfig) -> tuple[int, dict | None] | None:
    """(parameter count, config.json dict) of a backend's checkpoint, read without torch; None when
    unknown (remote backends, hub ids, unreadable directories)."""
    ref = b.checkpoint or ""
    try:
        if ref.startswith("builtin:"):
            # the same torch-free module config validation imports; pure dicts
            from hybridserve.models.builtin import builtin_config

            cfg = builtin_config(ref.split(":", 1)[1])
            return config_params(cfg), cfg
        path = Path(ref).expanduser()
        if b.engine == "remote":
            return None
        if path.is_file() and path.suffix.lower() == ".gguf":  # its header has the shape (torch-free)
            from hybridserve.models.gguf import header_config

            cfg = header_config(path)
            return config_params(cfg), cfg
        if path.is_file():   # another single-file checkpoint: its size says roughly how many
            params = file_params(path)
            return (params, None) if params else None
        if not path.is_dir():
            return None
        cfg_file = path / "config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
        params = safetensors_params(path) or (config_params(cfg) if cfg else None)
        return (params, cfg) if params else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("backend %s: cannot read checkpoint shape (%s); default economics", b.name, err)
        return None


def _what(via: str) -> str:
    """A route reason's name for what a backend holds: this session's prefix, this prefix, ..."""
    return "this prefix" if via == "prefix" else f"this {via}'s prefix"


def capacity(b: BackendConfig) -> int | None:
    """Requests a backend holds at once before refusing (running seats + waiting queue); None
    when it has no bound the gateway knows (vLLM, remote)."""
    if b.engine != "native":
        return None
    return b.native.max_num_seqs + b.native.max_num_waiting


def split_model(model: str) -> tuple[str, str | None]:
    """`auto:fastest` → ("auto", "fastest"); anything else → (model, None)."""
    if model.startswith("auto:"):
        return "auto", model[5:]
    return model, None


def tier_order(cfg: HybridserveConfig, quality: QualityTable | None) -> tuple[str, ...]:
    """Tiers cheapest first (a tier's price is its cheapest backend's); tiers that cost the same
    are ordered by their best measured overall accuracy, weakest first (unmeasured weakest), so
    `mode: deep` and a tier cascade's last step land on the tier that answers best."""
    price: dict[str, float] = {}
    best: dict[str, float] = {}
    for b in cfg.backends:
        price[b.tier] = min(price.get(b.tier, b.price_per_hour), b.price_per_hour)
        acc = quality.accuracy(b.name).accuracy if quality is not None else None
        best[b.tier] = max(best.get(b.tier, -1.0), -1.0 if acc is None else acc)
    return tuple(sorted(price, key=lambda t: (price[t], best[t])))


class Router:
    def __init__(self, cfg: HybridserveConfig, registry: Registry):
        gw = cfg.gateway
        self.cfg = cfg
        self.registry = registry
        self.table, self.seeds = self._seed_table(cfg)
        self.seeded = "profile" if gw.economics_profile else "config"
        self.quality = self._load_quality(gw.quality_profile)
        self.default_policy = gw.routing_policy()
        self.threshold = gw.cascade_threshold
        self.slo = (gw.slo_ttft_s, gw.slo_e2e_s)
        self.verifier = gw.verifier
        self.floor, self.floors, self.default_tier = gw.quality_floor, dict(gw.quality_floors), gw.default_tier
        self.rungs = self._resolve_rungs(cfg)
        rungs = tuple(Rung(r.name, r.backend.name, r.threshold, r.source) for r in self.rungs)
        self.policies = {name: make_policy(name, threshold=gw.cascade_threshold, verifier=gw.verifier,
                                           unmeasured=gw.quality_unmeasured, rungs=rungs)
                         for name in POLICY_NAMES
                         if name != "rules" and (name != "parallel_verify" or gw.verifier)}
        self.step_rules = [Rule(target, step_kind=kind) for kind, target in gw.step_tiers.items()]
        self.policies["rules"] = Rules(self.step_rules, self.policies["economics"])
        self.tier_order = tier_order(cfg, self.quality)
        self.affinity = PrefixAffinity() if gw.prefix_affinity else None
        self.affinity_slack = gw.prefix_affinity_max_extra_load
        self.prefix_stats: dict[str, list[int]] = {}  # backend -> [prompt tokens, of which cached]

    # ---------------------------------------------------------------- startup

    @staticmethod
    def _seed_table(cfg: HybridserveConfig) -> tuple[EconomicsTable, dict[str, str]]:
        """The table from the economics profile; backends it lacks are seeded from their checkpoint's
        shape (`config`), else conservative defaults (`default`). Returns the table and each seed."""
        gw = cfg.gateway
        prices = {b.name: b.price_per_hour for b in cfg.backends}
        try:
            profile = load_profile(gw.economics_profile) if gw.economics_profile else {}
        except (OSError, ValueError) as err:
            raise ConfigError(f"gateway.economics_profile: {err}; write one with `hybridserve bench` "
                              "or remove the field") from None
        table = EconomicsTable.from_profile(profile, prices)
        seeds = {}
        for b in cfg.backends:
            if table.entries.get(b.name):
                seeds[b.name] = "profile"
                continue
            shape = checkpoint_shape(b)
            if shape is not None:
                table.entries[b.name] = seed_entries(shape[0], shape[1], b.dtype, b.device, b.max_context)
                seeds[b.name] = "config"
            else:
                table.entries[b.name] = [Entry(context_bucket(b.max_context), 1,
                                               DEFAULT_PREFILL_TOK_S, DEFAULT_DECODE_TOK_S)]
                seeds[b.name] = "default"
        return table, seeds

    @staticmethod
    def _load_quality(path: str | None) -> QualityTable:
        if not path:
            return QualityTable()
        try:
            return QualityTable(load_quality_profile(path))
        except (OSError, ValueError) as err:
            raise ConfigError(f"gateway.quality_profile: {err}; write one with `hybridserve eval` "
                              "or remove the field") from None

    def _resolve_rungs(self, cfg: HybridserveConfig) -> list[RouteRung]:
        spec = [(r.name, r.backend, dict(r.params)) for r in cfg.gateway.cascade]
        thresholds = rung_thresholds(self.quality, spec, cfg.gateway.cascade_threshold)
        return [RouteRung(name, self.registry.backends[backend], params, thr, src)
                for (name, backend, params), (thr, src) in zip(spec, thresholds)]

    # ---------------------------------------------------------------- per request

    def with_room(self, candidates: list[BackendState], prompt_tokens: int, cap: int) -> list[BackendState]:
        """The candidates whose requests in flight from this gateway leave room in their queue
        (native workers: max_num_seqs + max_num_waiting); when none has any, a 429 at once, with
        Retry-After from the economics table, rather than a round trip to each worker to hear it."""
        full = [b for b in candidates if b.healthy and capacity(b.config) is not None
                and b.inflight >= capacity(b.config)]
        if not full or len(full) < len([b for b in candidates if b.healthy]):
            return [b for b in candidates if b not in full]
        waits = []
        for b in full:
            seats = b.config.native.max_num_seqs
            e2e = self.table.predict(b.name, prompt_tokens, cap, seats).e2e_s
            waits.append(e2e * (b.inflight - seats + 1) / seats)
        names = ", ".join(b.name for b in full)
        raise OverloadedError(f"every backend that could take the request is saturated ({names}: queues "
                              "full); retry later", min(60.0, max(1.0, min(waits))),
                              code="all_backends_saturated")

    def view(self, b: BackendState, cached_tokens: int = 0) -> BackendView:
        c = b.config
        return BackendView(b.name, c.arch, c.tier, c.price_per_hour, c.max_context, b.healthy,
                           b.load(), b.cache_usage, cached_tokens)

    def views(self, pool: list[BackendState], hints: dict[str, Hint]) -> tuple[tuple[BackendView, ...], dict[str, str]]:
        """Backend views with the expected prefix hit where a hint names the backend and its load is
        within `prefix_affinity_max_extra_load` of the least loaded one; a note per hinted backend."""
        least = min((b.load() for b in pool if b.healthy), default=0.0)
        views, notes = [], {}
        for b in pool:
            h = hints.get(b.name)
            if h is None or h.tokens <= 0:
                views.append(self.view(b))
            elif b.load() > least + self.affinity_slack:
                views.append(self.view(b))
                notes[b.name] = f"{b.name} holds {_what(h.via)} but is busy (load {b.load():g})"
            else:
                views.append(self.view(b, h.tokens))
                notes[b.name] = f"{b.name} holds ~{h.tokens} tokens of {_what(h.via)}"
        return tuple(views), notes

    def group_tier(self, model: str, policy: str, deep: bool = False) -> tuple[str | None, bool]:
        """The tier a model name routes within, and whether it is `gateway.default_tier` (plain
        `auto` only; not for policies that walk tiers, nor `mode: deep`)."""
        if model in self.cfg.aliases:
            tiers = {self.cfg.backend(n).tier for n in self.cfg.aliases[model]}
            return (tiers.pop() if len(tiers) == 1 else None), False
        if model in self.cfg.tiers():
            return model, False
        if model == AUTO and self.default_tier and not deep and policy not in WALKS_TIERS:
            return self.default_tier, True
        return None, False

    def floor_for(self, model: str, tier: str | None, asked: float | None) -> float | None:
        """The request's own floor, else its alias's or tier's, else the global one."""
        for floor in (asked, self.floors.get(model), self.floors.get(tier) if tier else None):
            if floor is not None:
                return floor
        return self.floor

    def decide(self, model: str, pinned: bool, candidates: list[BackendState],
               preferred: frozenset[str], prompt_tokens: int, max_tokens: int | None,
               policy: str | None = None, step_kind: str | None = None,
               api_key_id: str | None = None, *, floor: float | None = None,
               task: str | None = None, deep: bool = False, hints: dict[str, Hint] | None = None) -> Route:
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
        candidates = self.with_room(candidates, prompt_tokens, cap)
        pool = [b for b in candidates if b.name in preferred] or candidates
        views, notes = self.views(pool, hints or {})
        snap = Snapshot(views, self.table, self.tier_order, self.quality)
        tier, by_default = self.group_tier(model, name, deep)
        req = RouteRequest(prompt_tokens, cap, tier=tier, api_key_id=api_key_id, step_kind=step_kind,
                           slo_ttft_s=self.slo[0], slo_e2e_s=self.slo[1],
                           quality_floor=self.floor_for(model, tier, floor), task=task)
        d = pol.choose(req, snap)
        if d.backend is None and by_default:
            d = pol.choose(replace(req, tier=None), snap)
            d = replace(d, reason=f"no healthy backend in default tier '{tier}'; {d.reason}")
        if d.backend is None:
            names = ", ".join(b.name for b in candidates)
            raise BackendUnavailableError(f"no healthy backend for this model (tried: {names}); "
                                          "retry shortly")
        if not d.estimates:  # baselines do not price: price the choice for the receipt and ledger
            d = replace(d, estimates=(self.table.predict(d.backend, prompt_tokens, cap),))
        said = [note for name, note in notes.items() if name == d.backend or "busy" in note]
        if said:
            d = replace(d, reason="; ".join([d.reason, *said]))
        return self._route(d, candidates, prompt_tokens, cap)

    def _route(self, d: Decision, candidates: list[BackendState], prompt_tokens: int, cap: int) -> Route:
        """The order to try: the choice, its fallbacks, then any other healthy candidate (not when
        a quality floor was met: failover stays among the backends that meet it)."""
        names = [d.backend, *d.fallbacks]
        floor_held = d.quality is not None and d.quality.met
        rest = [] if floor_held else [b for b in candidates if b.healthy and b.name not in names]
        order = [self.registry.backends[n] for n in names] + rest
        rungs = [r for r in self.rungs if r.name in d.rungs]
        threshold = self.threshold if d.policy in WALKS_TIERS and not rungs else None
        verifier = self.registry.backends[self.verifier] if d.policy == "parallel_verify" else None
        return Route(d, order, prompt_tokens, cap, threshold, verifier, rungs=rungs)

    def predict_usd(self, backend: str, prompt_tokens: int, max_tokens: int) -> float:
        b = self.registry.backends[backend]
        return self.table.predict(backend, prompt_tokens, max_tokens, int(b.load()) + 1).usd

    def observe(self, b: BackendState, usage: dict) -> float:
        """Fold one finished request into the table; return its measured cost in USD."""
        device_s = float(usage.get("device_seconds") or 0.0)
        prompt, cached = int(usage.get("prompt_tokens") or 0), cached_tokens(usage)
        self.table.observe(b.name, prompt, int(usage.get("completion_tokens") or 0), device_s,
                           concurrency=int(b.load()) + 1, cached_tokens=cached)
        stats = self.prefix_stats.setdefault(b.name, [0, 0])
        stats[0] += prompt
        stats[1] += min(cached, prompt)
        return b.config.price_per_hour / 3600.0 * device_s

    def hit_rate(self, backend: str) -> float | None:
        """Cached / prompt tokens over the answers this gateway saw from `backend` (None before any)."""
        prompt, cached = self.prefix_stats.get(backend, (0, 0))
        return round(cached / prompt, 4) if prompt else None

    def economics(self) -> dict:
        """The body of GET /v1/economics."""
        live = {b.name: {"healthy": b.healthy, "load": b.load(), "inflight": b.inflight,
                         "cache_usage": b.cache_usage, "price_per_hour": b.config.price_per_hour,
                         "tier": b.config.tier, "seeded": self.seeds.get(b.name),
                         "prefix_cache_hit_rate": self.hit_rate(b.name)}
                for b in self.registry.backends.values()}
        rungs = [{"name": r.name, "backend": r.backend.name, "params": r.params, "threshold": r.threshold,
                  "threshold_source": r.source} for r in self.rungs]
        return {"object": "economics", "policy": self.default_policy, "seeded": self.seeded,
                "tier_order": list(self.tier_order), "default_tier": self.default_tier,
                "quality_floor": self.floor, "quality_floors": self.floors,
                "quality": self.quality.summary() if self.quality else None, "cascade": rungs,
                "backends": live, "rows": self.table.rows()}
