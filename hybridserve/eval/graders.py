"""Graders: is an answer right for an item? Each returns a `Grade` (correct, detail).

- `answer`/`answers`: equal after `normalize` (case, whitespace, punctuation) to one of them.
- `contains`: the phrase (or any of a list) occurs case-insensitively as whole words.
- `regex`: `re.search` of the pattern as written (use `(?i)` for case-insensitivity).
- `number`: the last number in the answer ("1,234", "-3", "2.50") is within
  `tolerance` (default 0) of `number`.
- `choices` + `answer`: the chosen letter (a leading "B", "(B)", "B)", "answer: B") or
  the one choice whose text the answer contains must be the right one; `answer` is
  the right letter or the right choice's text.
- `json_schema`: the answer's JSON (see `schema.extract_json`) validates.

`judge` needs a backend and is graded in `hybridserve.eval.judge`. Graders never raise
on any answer text.
"""
from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass

from hybridserve.eval.dataset import Item
from hybridserve.eval.schema import extract_json, validate

logger = logging.getLogger(__name__)

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d\u2013\u2014]")
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")


@dataclass
class Grade:
    correct: bool
    detail: str


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _phrase_in(phrase: str, text: str) -> bool:
    words = normalize(phrase).split()
    if not words:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)"
    return re.search(pattern, normalize(text)) is not None


def grade_answers(answer: str, expected: list[str]) -> Grade:
    got = normalize(answer)
    for e in expected:
        if got == normalize(e):
            return Grade(True, f"equals {e!r}")
    return Grade(False, f"expected {expected[0]!r}" + (f" (or {len(expected) - 1} more)" if len(expected) > 1 else ""))


def grade_contains(answer: str, phrases: str | list[str]) -> Grade:
    phrases = [phrases] if isinstance(phrases, str) else phrases
    for p in phrases:
        if _phrase_in(p, answer):
            return Grade(True, f"contains {p!r}")
    return Grade(False, "contains none of " + ", ".join(map(repr, phrases)))


def grade_regex(answer: str, pattern: str) -> Grade:
    try:
        m = re.search(pattern, answer)
    except re.error as err:
        return Grade(False, f"bad regex: {err}")
    return Grade(True, f"matches at {m.start()}") if m else Grade(False, f"no match for {pattern!r}")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", "").replace("\u2212", "-"))


def grade_number(answer: str, expected: float, tolerance: float = 0.0) -> Grade:
    got = last_number(answer)
    if got is None:
        return Grade(False, "no number in the answer")
    ok = abs(got - expected) <= tolerance + 1e-9 * max(1.0, abs(expected))
    show = lambda x: int(x) if float(x).is_integer() else x
    return Grade(ok, f"got {show(got)}, expected {show(expected)}" + (f" ± {tolerance}" if tolerance else ""))


_LEAD = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Za-z])[).:](?:\s|$)|([A-Z])(?:\s|$))")
_SAID = re.compile(r"\banswer\s*(?:is|:)?\s*:?\s*\(?([A-Za-z])\)?(?![\w])", re.I)


def _chosen_letter(answer: str, choices: list[str]) -> str | None:
    letters = string.ascii_uppercase[:len(choices)]
    for rx in (_LEAD, _SAID):
        m = rx.search(answer)
        if m:
            letter = next(g for g in m.groups() if g).upper()
            if letter in letters:
                return letter
    hits = [i for i, c in enumerate(choices) if _phrase_in(c, answer)]
    # "Paris, Texas" also contains "Paris": keep only hits no other hit contains
    hits = [i for i in hits if not any(j != i and _phrase_in(choices[i], choices[j]) for j in hits)]
    return letters[hits[0]] if len(hits) == 1 else None


def grade_choice(answer: str, choices: list[str], right: str) -> Grade:
    letters = string.ascii_uppercase[:len(choices)]
    r = right.strip().upper()
    if not (len(r) == 1 and r in letters):
        idx = [i for i, c in enumerate(choices) if normalize(c) == normalize(right)]
        if not idx:
            return Grade(False, f"bad item: answer {right!r} is not a choice")
        r = letters[idx[0]]
    chose = _chosen_letter(answer, choices)
    if chose is None:
        return Grade(False, f"no choice recognised, expected {r}")
    return Grade(chose == r, f"chose {chose}, expected {r}")


def grade_json(answer: str, schema: dict) -> Grade:
    value, err = extract_json(answer)
    if err:
        return Grade(False, err)
    errors = validate(value, schema)
    return Grade(not errors, "valid" if not errors else "; ".join(errors[:3]))


def grade(item: Item, answer: str | None) -> Grade:
    """Grade a local (non-judge) item; no answer (an error) is wrong."""
    if answer is None:
        return Grade(False, "no answer")
    s, g = item.spec, item.grader
    if g == "answer":
        return grade_answers(answer, [s["answer"]])
    if g == "answers":
        return grade_answers(answer, s["answers"])
    if g == "contains":
        return grade_contains(answer, s["contains"])
    if g == "regex":
        return grade_regex(answer, s["regex"])
    if g == "number":
        return grade_number(answer, float(s["number"]), float(s.get("tolerance", 0.0)))
    if g == "choices":
        return grade_choice(answer, s["choices"], s["answer"])
    if g == "json_schema":
        return grade_json(answer, s["json_schema"])
    raise ValueError(f"grader {g!r} is not local (judge items are graded by a backend)")
