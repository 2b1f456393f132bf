"""Built-in suites, generated locally and deterministically (same items on every machine).

- `facts`: the questions in `facts.py`, graded by `contains` (max_tokens 24).
- `arith`: 60 seeded problems, 1-3 digit operands, + - * / with integer results
  (divisions are built from a product), graded by `number` (max_tokens 16).
- `format`: 20 "answer as JSON with keys ..." extractions graded by `json_schema`
  (max_tokens 64).
- `passkey`: a 5-digit pass key hidden at depth 0.1, 0.5 and 0.9 of filler text, for
  contexts 512, 1024, ... up to `max_context`, graded by `contains` (max_tokens 16);
  each item records `context_tokens` (the nominal context) and `depth` in its meta.
- `all`: every suite above.

Every item carries `reference`, an answer its own grader accepts. Token counts are
estimated by `estimate_tokens` (word pieces, close to BPE counts for English text).
"""
from __future__ import annotations

import json
import logging
import math
import random
import re

from hybridserve.eval.dataset import Item
from hybridserve.eval.facts import FACTS

logger = logging.getLogger(__name__)

SYSTEM = "Answer briefly."
SUITES = ("facts", "arith", "format", "passkey")
DEPTHS = (0.1, 0.5, 0.9)
PASSKEY_SAMPLES = 2      # items per (context, depth)
_PIECE = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def estimate_tokens(text: str) -> int:
    """~BPE token count: a word per ~6 letters (at least 1), one per digit and symbol."""
    return sum(math.ceil(len(p) / 6) if p[0].isalpha() else 1 for p in _PIECE.findall(text))


def _chat(question: str, system: str | None = SYSTEM) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def facts() -> list[Item]:
    return [Item(id=f"facts-{i:03d}", grader="contains", spec={"contains": accepted},
                 messages=_chat(q), max_tokens=24, tags=["facts"], reference=accepted[0],
                 meta={"category": cat})
            for i, (cat, q, accepted) in enumerate(FACTS, start=1)]


def _arith_problem(rng: random.Random, op: str) -> tuple[int, int, int]:
    if op == "+":
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        return a, b, a + b
    if op == "-":
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        return max(a, b), min(a, b), max(a, b) - min(a, b)
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 20)
        return a, b, a * b
    b = rng.randint(2, 20)
    q = rng.randint(2, 999 // b)
    return b * q, b, q


def arith(n: int = 60, seed: int = 1234) -> list[Item]:
    rng = random.Random(seed)
    words = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
    items = []
    for i in range(n):
        op = "+-*/"[i % 4]
        a, b, result = _arith_problem(rng, op)
        q = f"What is {a} {words[op]} {b}? Answer with just the number."
        items.append(Item(id=f"arith-{i + 1:03d}", grader="number", spec={"number": result},
                          messages=_chat(q), max_tokens=16, tags=["arith"], reference=str(result),
                          meta={"op": op}))
    return items


_PEOPLE = ["Alice", "Bob", "Carlos", "Dana", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
_CITIES = [("Paris", "France"), ("Tokyo", "Japan"), ("Lima", "Peru"), ("Oslo", "Norway"),
           ("Cairo", "Egypt"), ("Madrid", "Spain"), ("Seoul", "South Korea"), ("Rome", "Italy")]
_THINGS = ["lamp", "chair", "notebook", "kettle", "backpack", "umbrella", "guitar", "bicycle"]
_COLORS = ["red", "blue", "green", "yellow", "black", "white"]


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props)}


def _format_person(rng: random.Random) -> tuple[str, dict, dict]:
    name, age = rng.choice(_PEOPLE), rng.randint(18, 80)
    return (f'{name} is {age} years old. Answer as JSON with keys "name" (string) and "age" (integer).',
            _obj({"name": {"type": "string"}, "age": {"type": "integer"}}), {"name": name, "age": age})


def _format_city(rng: random.Random) -> tuple[str, dict, dict]:
    city, country = rng.choice(_CITIES)
    return (f'{city} is a city in {country}. Answer as JSON with keys "city" and "country" (strings).',
            _obj({"city": {"type": "string"}, "country": {"type": "string"}}), {"city": city, "country": country})


def _format_product(rng: random.Random) -> tuple[str, dict, dict]:
    thing, price = rng.choice(_THINGS), rng.randint(5, 300)
    return (f'A {thing} costs {price} dollars. Answer as JSON with keys "product" (string) and '
            f'"price" (number).', _obj({"product": {"type": "string"}, "price": {"type": "number"}}),
            {"product": thing, "price": price})


def _format_colors(rng: random.Random) -> tuple[str, dict, dict]:
    picks = rng.sample(_COLORS, 2)
    return (f'My favourite colors are {picks[0]} and {picks[1]}. Answer as JSON with the key "colors" '
            '(a list of strings).', _obj({"colors": {"type": "array", "items": {"type": "string"}}}),
            {"colors": picks})


def _format_flag(rng: random.Random) -> tuple[str, dict, dict]:
    name, ok = rng.choice(_PEOPLE), rng.random() < 0.5
    verb = "passed" if ok else "failed"
    return (f'{name} {verb} the exam. Answer as JSON with keys "name" (string) and "passed" (true or false).',
            _obj({"name": {"type": "string"}, "passed": {"type": "boolean"}}), {"name": name, "passed": ok})


def format_suite(n: int = 20, seed: int = 4321) -> list[Item]:
    rng = random.Random(seed)
    makers = [_format_person, _format_city, _format_product, _format_colors, _format_flag]
    items = []
    for i in range(n):
        q, schema, ref = makers[i % len(makers)](rng)
        items.append(Item(id=f"format-{i + 1:02d}", grader="json_schema", spec={"json_schema": schema},
                          messages=_chat(q, "Reply with JSON only."), max_tokens=64, tags=["format"],
                          reference=json.dumps(ref)))
    return items


_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. ")
_ASK = "What is the pass key? The pass key is"


def _passkey_prompt(key: int, context: int, depth: float) -> str:
    head = ("There is a pass key hidden inside a lot of irrelevant text. Find it and remember it. "
            "I will ask you for the pass key.\n")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = f"\n{_ASK}"
    budget = max(0, context - 64 - estimate_tokens(head + needle + tail))  # room for template + answer
    reps = max(1, round(budget / estimate_tokens(_FILLER)))
    before = round(reps * depth)
    return head + _FILLER * before + needle + _FILLER * (reps - before) + tail


def passkey_contexts(max_context: int, min_context: int = 512) -> list[int]:
    out, c = [], min_context
    while c <= max_context:
        out.append(c)
        c *= 2
    return out


def passkey(max_context: int = 4096, samples: int = PASSKEY_SAMPLES, seed: int = 99) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for ctx in passkey_contexts(max_context):
        for depth in DEPTHS:
            for s in range(samples):
                key = rng.randint(10000, 99999)
                items.append(Item(id=f"passkey-{ctx}-d{depth}-{s}", grader="contains", spec={"contains": str(key)},
                                  messages=_chat(_passkey_prompt(key, ctx, depth), None), max_tokens=16,
                                  tags=["passkey"], context_tokens=ctx, reference=str(key),
                                  meta={"depth": depth}))
    return items


def build_suite(name: str, max_context: int = 4096) -> list[Item]:
    """Items of `name` (one of SUITES or `all`); KeyError naming the known suites."""
    makers = {"facts": facts, "arith": arith, "format": format_suite,
              "passkey": lambda: passkey(max_context)}
    if name == "all":
        return [it for s in SUITES for it in makers[s]()]
    if name not in makers:
        raise KeyError(f"no built-in suite {name!r}; known: {', '.join(SUITES)}, all")
    return makers[name]()
