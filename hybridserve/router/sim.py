"""`hybridserve route-sim`: replay a workload against an economics table, no models run.

Each policy routes the same requests; a request's cost and latency are the
table's prediction for the backend chosen (so policies are compared on the
serving economics the harness measured). Cascade escalations are drawn with a
seeded probability standing in for low-confidence answers.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from hybridserve.router.policies import BackendView, RouteRequest, Snapshot, make_policy
from hybridserve.router.policies.economics import meets_slo
from hybridserve.router.table import EconomicsTable


@dataclass(frozen=True)
class SimRequest:
    prompt_tokens: int
    output_tokens: int
    kind: str = "chat"


def mixed_workload(n: int = 2000, long_share: float = 0.25, seed: int = 0, max_context: int = 8192) -> list[SimRequest]:
    """Short chats (up to max/16 tokens in) mixed with long documents (max/4 to max in, minus the output).

    With max_context 8192: chats of 64–512 tokens, documents of 2,048–8,192, 32–256 tokens out.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        new = rng.randint(32, min(256, max(32, max_context // 8)))
        if rng.random() < long_share:
            out.append(SimRequest(rng.randint(max_context // 4, max_context - new), new, "document"))
        else:
            out.append(SimRequest(rng.randint(max(1, max_context // 128), max(2, max_context // 16)), new, "chat"))
    return out


def load_trace(path: str | Path) -> list[SimRequest]:
    reqs = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if line.strip():
            d = json.loads(line)
            try:
                reqs.append(SimRequest(int(d["prompt_tokens"]), int(d["output_tokens"]), d.get("kind", "trace")))
            except KeyError as err:
                raise ValueError(f"{path}:{i + 1}: missing {err}; each line needs prompt_tokens and output_tokens")
    return reqs


def simulate(policy_name: str, requests: list[SimRequest], backends: list[BackendView], table: EconomicsTable,
             slo_ttft_s: float | None, slo_e2e_s: float | None, escalation_p: float = 0.2, seed: int = 0,
             tier_order: tuple[str, ...] = (), window: int = 4, verifier: str | None = None) -> dict:
    verifier = verifier or (backends[0].name if backends else None)
    policy = make_policy(policy_name, verifier=verifier)
    rng = random.Random(seed)
    usd = tokens = met = escalations = unroutable = 0
    share: dict[str, int] = {}
    recent: list[str] = []  # load model: the last `window` routed requests are still in flight
    for r in requests:
        load = {b.name: recent.count(b.name) for b in backends}
        snap = Snapshot(tuple(replace(b, load=load[b.name]) for b in backends), table, tier_order)
        req = RouteRequest(r.prompt_tokens, r.output_tokens, slo_ttft_s=slo_ttft_s, slo_e2e_s=slo_e2e_s)
        d = policy.choose(req, snap)
        if d.backend is None:
            unroutable += 1
            continue
        chain = [d.backend]
        if policy_name in ("cascade", "parallel_verify") and d.fallbacks and rng.random() < escalation_p:
            chain.append(d.fallbacks[0])
            escalations += 1
        ests = [table.predict(b, r.prompt_tokens, r.output_tokens, load[b] + 1) for b in chain]
        if policy_name == "parallel_verify" and d.fallbacks:  # the verifier reads prompt + draft, says 1 token
            ests.insert(1, table.predict(verifier, r.prompt_tokens + r.output_tokens, 1, load[verifier] + 1))
        recent = (recent + [chain[-1]])[-window:]
        usd += sum(e.usd for e in ests)
        tokens += r.prompt_tokens + r.output_tokens
        total = ests[0].__class__(chain[-1], sum(e.usd for e in ests), ests[0].ttft_s + sum(e.e2e_s for e in ests[1:]),
                                  sum(e.e2e_s for e in ests), 0.0, 1.0)
        met += meets_slo(total, req)
        share[chain[-1]] = share.get(chain[-1], 0) + 1
    routed = len(requests) - unroutable
    return {"policy": policy_name, "requests": len(requests), "unroutable": unroutable, "usd": usd,
            "usd_per_1m_tokens": usd / tokens * 1e6 if tokens else None,
            "slo_attainment": met / routed if routed else 0.0,
            "escalation_rate": escalations / routed if routed else 0.0, "share": share}


def compare(policies: list[str], requests, backends, table, slo_ttft_s, slo_e2e_s, **kw) -> list[dict]:
    return [simulate(p, requests, backends, table, slo_ttft_s, slo_e2e_s, **kw) for p in policies]


def format_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["policy"] == "round_robin"), rows[0])
    lines = [f"{'policy':<16}{'$/1M tokens':>13}{'vs round_robin':>16}{'SLO met':>9}{'escalated':>11}  share"]
    for r in rows:
        delta = (r["usd_per_1m_tokens"] / base["usd_per_1m_tokens"] - 1) if base["usd_per_1m_tokens"] else 0
        share = ", ".join(f"{k} {v / max(1, r['requests'] - r['unroutable']):.0%}" for k, v in sorted(r["share"].items()))
        lines.append(f"{r['policy']:<16}{r['usd_per_1m_tokens']:>13.4f}{delta:>+15.1%} {r['slo_attainment']:>8.1%}"
                     f"{r['escalation_rate']:>10.1%}  {share}")
    return "\n".join(lines)
