"""Eval datasets: JSONL items, parsed and checked line by line.

One JSON object per line:

- `id` (string or integer, unique), and either `messages` (a chat: a list of
  `{"role", "content"}`) or `prompt` (a completion string);
- optional `max_tokens` (int > 0), `tags` (list of strings), `context_tokens` (int),
  `temperature` (number) and `params` (an object merged into the request body);
- exactly one grader: `answer` or `answers`, `contains`, `regex`, `number` (with an
  optional `tolerance`), `choices` + `answer`, `json_schema`, or `judge` (the reference
  answer as a string, or `{"reference": str, "model": str?}`).

Any other key is kept in `Item.meta`. A malformed line is reported as a `Problem`
with its 1-based line number and skipped; `strict=True` raises `DatasetError` listing
every problem instead. Parsing never raises anything else.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridserve.protocol import is_int

logger = logging.getLogger(__name__)

GRADERS = ("answer", "answers", "contains", "regex", "number", "choices", "json_schema", "judge")
KNOWN = {"id", "messages", "prompt", "max_tokens", "tags", "context_tokens", "temperature", "params",
         "tolerance", "reference", *GRADERS}


class DatasetError(ValueError):
    """The dataset cannot be used (not found, empty, or malformed lines under --strict)."""


@dataclass
class Problem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class Item:
    id: str
    grader: str                      # one of GRADERS ("choices" for multiple choice)
    spec: dict[str, Any]             # the grader's fields (answer, choices, tolerance, ...)
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    tags: list[str] = field(default_factory=list)
    context_tokens: int | None = None
    temperature: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None     # a known-good answer (built-in suites; the judge's reference)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def question(self) -> str:
        """The last user message (chat) or the prompt: what a judge is shown."""
        if self.messages is None:
            return self.prompt or ""
        users = [m.get("content", "") for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        out["messages" if self.chat else "prompt"] = self.messages if self.chat else self.prompt
        for k in ("max_tokens", "context_tokens", "temperature", "reference"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.tags:
            out["tags"] = self.tags
        if self.params:
            out["params"] = self.params
        return {**out, **self.spec, **self.meta}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


def _check_messages(v) -> str | None:
    if not isinstance(v, list) or not v:
        return "`messages` must be a non-empty list"
    for m in v:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "every message needs a string `role` and `content`"
    return None


def _grader_of(obj: dict) -> tuple[str | None, str | None]:
    """(grader name, error)."""
    present = [g for g in GRADERS if g in obj]
    if "choices" in present:
        present.remove("choices")
        if "answer" not in present:
            return None, "`choices` needs `answer` (the right letter or text)"
        present = ["choices" if g == "answer" else g for g in present]
    if not present:
        return None, "no grader (one of: " + ", ".join(GRADERS) + ")"
    if len(present) > 1:
        return None, "more than one grader: " + ", ".join(present)
    return present[0], None


def _check_grader(name: str, obj: dict) -> str | None:
    v = obj.get(name if name != "choices" else "answer")
    if name in ("answer", "choices") and not isinstance(v, str):
        return "`answer` must be a string"
    if name == "choices" and not _str_list(obj["choices"]):
        return "`choices` must be a non-empty list of strings"
    if name in ("answers",) and not _str_list(v):
        return "`answers` must be a non-empty list of strings"
    if name == "contains" and not (isinstance(v, str) and v.strip()) and not _str_list(v):
        return "`contains` must be a string or a list of strings"
    if name == "regex":
        if not isinstance(v, str):
            return "`regex` must be a string"
        try:
            re.compile(v)
        except re.error as err:
            return f"`regex` does not compile: {err}"
    if name == "number" and not _is_num(v):
        return "`number` must be a number"
    if "tolerance" in obj and (not _is_num(obj["tolerance"]) or obj["tolerance"] < 0):
        return "`tolerance` must be a number >= 0"
    if name == "json_schema":
        from hybridserve.eval.schema import schema_problem

        if (why := schema_problem(v)) is not None:
            return f"`json_schema` is not a usable schema: {why}"
    if name == "judge" and not (isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("reference"), str))):
        return "`judge` must be the reference answer (a string) or {\"reference\": ...}"
    return None


def _check_fields(obj: dict) -> str | None:
    if not (is_int(obj.get("id")) or (isinstance(obj.get("id"), str) and obj["id"].strip())):
        return "no `id` (a non-empty string or an integer)"
    has_m, has_p = "messages" in obj, "prompt" in obj
    if has_m == has_p:
        return "needs exactly one of `messages` or `prompt`"
    if has_m and (err := _check_messages(obj["messages"])):
        return err
    if has_p and not isinstance(obj["prompt"], str):
        return "`prompt` must be a string"
    if "max_tokens" in obj and not (is_int(obj["max_tokens"]) and obj["max_tokens"] > 0):
        return "`max_tokens` must be a positive integer"
    if "context_tokens" in obj and not (is_int(obj["context_tokens"]) and obj["context_tokens"] > 0):
        return "`context_tokens` must be a positive integer"
    if "tags" in obj and not (isinstance(obj["tags"], list) and all(isinstance(t, str) for t in obj["tags"])):
        return "`tags` must be a list of strings"
    if "temperature" in obj and not _is_num(obj["temperature"]):
        return "`temperature` must be a number"
    if "params" in obj and not isinstance(obj["params"], dict):
        return "`params` must be an object"
    return None


def parse_item(obj: Any) -> tuple[Item | None, str | None]:
    """One decoded line -> (Item, None) or (None, what is wrong)."""
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    if err := _check_fields(obj):
        return None, err
    grader, err = _grader_of(obj)
    if err or (err := _check_grader(grader, obj)):
        return None, err
    keys = {"choices": ("choices", "answer"), "number": ("number", "tolerance")}.get(grader, (grader,))
    spec = {k: obj[k] for k in keys if k in obj}
    ref = obj.get("reference")
    if grader == "judge":
        j = obj["judge"]
        ref = j if isinstance(j, str) else j["reference"]
    return Item(id=str(obj["id"]), grader=grader, spec=spec, messages=obj.get("messages"),
                prompt=obj.get("prompt"), max_tokens=obj.get("max_tokens"), tags=list(obj.get("tags", [])),
                context_tokens=obj.get("context_tokens"), temperature=obj.get("temperature"),
                params=dict(obj.get("params", {})), reference=ref if isinstance(ref, str) else None,
                meta={k: v for k, v in obj.items() if k not in KNOWN}), None


def parse_lines(lines, strict: bool = False) -> tuple[list[Item], list[Problem]]:
    """Parse JSONL lines; blank lines are skipped silently, duplicate ids are problems."""
    items, problems, seen = [], [], set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(n, f"not valid JSON: {err.msg}"))
            continue
        item, err = parse_item(obj)
        if item is not None and item.id in seen:
            item, err = None, f"duplicate id {item.id!r}"
        if item is None:
            problems.append(Problem(n, err))
            continue
        seen.add(item.id)
        items.append(item)
    if problems and strict:
        raise DatasetError(f"{len(problems)} malformed line(s):\n" + "\n".join(map(str, problems)))
    return items, problems


def load_dataset(ref: str, strict: bool = False, max_context: int = 4096) -> tuple[str, list[Item], list[Problem]]:
    """(dataset name, items, problems) for a JSONL path or `builtin:SUITE`."""
    if ref.startswith("builtin:"):
        from hybridserve.eval.suites import build_suite

        try:
            items = build_suite(ref.split(":", 1)[1], max_context=max_context)
        except KeyError as err:
            raise DatasetError(str(err.args[0])) from None
        if not items:
            raise DatasetError(f"{ref}: no items (passkey needs --max-context >= 512)")
        return ref, items, []
    p = Path(ref)
    if not p.is_file():
        raise DatasetError(f"{ref}: no such file (or use builtin:facts|arith|format|passkey|all)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{ref}: cannot read: {err}") from None
    items, problems = parse_lines(text.splitlines(), strict=strict)
    for pr in problems:
        logger.warning("%s %s (skipped)", ref, pr)
    if not items:
        raise DatasetError(f"{ref}: no usable item" + (f" ({len(problems)} malformed)" if problems else ""))
    return p.stem, items, problems
