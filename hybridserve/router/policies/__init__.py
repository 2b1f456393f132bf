"""Routing policies by name (`policy:` in models.yaml, or `auto:<name>` as the model)."""
from hybridserve.router.policies.base import BackendView, Decision, RouteRequest, Snapshot
from hybridserve.router.policies.baselines import LeastLoaded, RoundRobin
from hybridserve.router.policies.cascade import Cascade, should_escalate
from hybridserve.router.policies.economics import Economics
from hybridserve.router.policies.rules import Rule, Rules
from hybridserve.router.policies.verify import ParallelVerify

POLICY_NAMES = ("round_robin", "least_loaded", "economics", "cheapest", "fastest", "cascade", "rules",
                "parallel_verify")


def make_policy(name: str, rules: list[Rule] | None = None, threshold: float = -1.0,
                verifier: str | None = None):
    """A policy instance by name; `cheapest` = economics, `fastest` = economics by latency;
    `parallel_verify` needs the verifier backend's name."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name in ("economics", "cheapest"):
        return Economics("cheapest")
    if name == "fastest":
        return Economics("fastest")
    if name == "cascade":
        return Cascade(threshold)
    if name == "rules":
        return Rules(rules or [], Economics("cheapest"))
    if name == "parallel_verify":
        if not verifier:
            raise ValueError("policy 'parallel_verify' needs a verifier backend (gateway.verifier)")
        return ParallelVerify(threshold, verifier)
    raise ValueError(f"unknown routing policy '{name}': use one of {', '.join(POLICY_NAMES)}")


__all__ = ["BackendView", "Cascade", "Decision", "Economics", "LeastLoaded", "POLICY_NAMES", "ParallelVerify", "RoundRobin",
           "RouteRequest", "Rule", "Rules", "Snapshot", "make_policy", "should_escalate"]
