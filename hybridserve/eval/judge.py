"""The `judge` grader: a model at the same URL grades an answer PASS or FAIL against a reference.

The judge is asked, greedily, to reply `PASS` or `FAIL` on its first line and one
sentence of reason. The verdict is the first PASS/FAIL word in its reply (none: wrong,
"no verdict"); the reason is kept in the grade's detail. The judge model is the item's
`judge.model`, else `--judge-model`, else the target's own model. The judge's cost is
reported apart from the target's.
"""
from __future__ import annotations

import logging
import re

import httpx

from hybridserve.eval import client as C
from hybridserve.eval.dataset import Item
from hybridserve.eval.graders import Grade

logger = logging.getLogger(__name__)

_VERDICT = re.compile(r"\b(PASS|FAIL)\b", re.I)
SYSTEM = ("You grade answers. Compare the candidate answer with the reference answer. "
          "Reply with PASS if the candidate answer means the same as the reference, else FAIL, "
          "on the first line, then one short sentence giving the reason.")


def judge_messages(item: Item, answer: str) -> list[dict]:
    user = (f"Question:\n{item.question}\n\nReference answer:\n{item.reference}\n\n"
            f"Candidate answer:\n{answer}\n\nPASS or FAIL?")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> Grade:
    m = _VERDICT.search(text or "")
    reason = " ".join((text or "").split())[:300]
    if not m:
        return Grade(False, f"judge gave no verdict: {reason!r}")
    return Grade(m.group(1).upper() == "PASS", f"judge {m.group(1).upper()}: {reason}")


def judge_model(item: Item, default: str) -> str:
    spec = item.spec.get("judge")
    return spec.get("model") or default if isinstance(spec, dict) else default


async def grade_with_judge(client: httpx.AsyncClient, url: str, model: str, item: Item,
                           answer: str | None) -> tuple[Grade, float]:
    """(grade, judge cost in $)."""
    if answer is None:
        return Grade(False, "no answer"), 0.0
    body = {"model": model, "messages": judge_messages(item, answer), "max_tokens": 64, "temperature": 0.0}
    verdict = await C.post(client, url, body, chat=True)
    if verdict.error:
        return Grade(False, f"judge error ({verdict.status}): {verdict.error}"), verdict.cost_usd
    return parse_verdict(verdict.text or ""), verdict.cost_usd
