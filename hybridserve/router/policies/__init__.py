"""Routing policies by name (`policy:` in models.yaml, or `auto:<name>` as the model)."""
from hybridserve.router.policies.base import BackendView, Decision, QualityNote, RouteRequest, Snapshot
from hybridserve.router.policies.baselines import LeastLoaded, RoundRobin
from hybridserve.router.policies.cascade import Cascade, Rung, RungCascade, should_escalate
from hybridserve.router.policies.economics import Economics
from hybridserve.router.policies.rules import Rule, Rules
from hybridserve.router.policies.verify import ParallelVerify

POLICY_NAMES = ("round_robin", "least_loaded", "economics", "cheapest", "fastest", "value", "cascade", "rules",
                "parallel_verify")


def make_policy(name: str, rules: list[Rule] | None = None, threshold: float = -1.0,
                verifier: str | None = None, unmeasured: str = "deny",
                rungs: tuple[Rung, ...] = ()):
    """A policy instance by name; `cheapest` = economics, `fastest` = economics by latency,
    `value` = economics by predicted $ per correct answer; `unmeasured` says whether a backend
    without a quality measurement meets a quality floor ('allow') or not ('deny');
    `cascade` runs `rungs` when given (gateway.cascade), else the tiers;
    `parallel_verify` needs the verifier backend's name."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name in ("economics", "cheapest"):
        return Economics("cheapest", unmeasured)
    if name == "fastest":
        return Economics("fastest", unmeasured)
    if name == "value":
        return Economics("value", unmeasured)
    if name == "cascade":
        return RungCascade(rungs) if rungs else Cascade(threshold)
    if name == "rules":
        return Rules(rules or [], Economics("cheapest", unmeasured))
    if name == "parallel_verify":
        if not verifier:
            raise ValueError("policy 'parallel_verify' needs a verifier backend (gateway.verifier)")
        return ParallelVerify(threshold, verifier)
    raise ValueError(f"unknown routing policy '{name}': use one of {', '.join(POLICY_NAMES)}")


__all__ = ["BackendView", "Cascade", "Decision", "Economics", "LeastLoaded", "POLICY_NAMES", "ParallelVerify",
           "QualityNote", "RoundRobin", "RouteRequest", "Rule", "Rules", "Rung", "RungCascade", "Snapshot",
           "make_policy", "should_escalate"]
