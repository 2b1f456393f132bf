"""Parallel-verify: a cheap draft, judged by a small verifier; escalate when the verdict is weak.

`choose` orders backends as the cascade does (cheapest tier first, escalation order as
fallbacks) and names the verifier. The gateway drafts on the first backend, asks the
verifier whether the draft answers the question (`judge_prompt`, one token, top
logprobs), takes the verifier's log-probability of "yes" as the score
(`verdict_score`; no "yes" among its top tokens → no score) and escalates to the next
tier while the score is missing or below the threshold. The last tier is not judged.
"""
from __future__ import annotations

from hybridserve.router.policies.base import Decision, RouteRequest, Snapshot
from hybridserve.router.policies.cascade import Cascade

YES = ("yes",)


def judge_prompt(question: str, answer: str) -> str:
    return (f"Question:\n{question.strip()}\n\nProposed answer:\n{answer.strip()}\n\n"
            "Is the proposed answer correct and complete? Reply yes or no.\nReply:")


def verdict_score(top_logprobs: dict[str, float] | None) -> float | None:
    """The best log-probability the verifier gave to a spelling of "yes" (None if none is in its top)."""
    scores = [lp for tok, lp in (top_logprobs or {}).items() if tok.strip().lower() in YES]
    return max(scores) if scores else None


class ParallelVerify(Cascade):
    name = "parallel_verify"

    def __init__(self, threshold: float, verifier: str):
        super().__init__(threshold)
        self.verifier = verifier

    def choose(self, req: RouteRequest, snap: Snapshot) -> Decision:
        d = super().choose(req, snap)
        if d.backend is None:
            return Decision(None, self.name, d.reason)
        why = (f"cheap draft on {d.backend}, judged by {self.verifier}; escalate below "
               f"log P(yes) {self.threshold}")
        return Decision(d.backend, self.name, why, d.fallbacks, d.estimates)
