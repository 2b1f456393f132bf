"""A small multi-step agent that runs through the hybridserve gateway and shows what each step cost.

The agent answers one question in at most `--max-steps` steps: it plans (step kind `plan`),
looks a topic up in a local file (`tool`), computes with a calculator (`tool`) and answers
(`answer`). Every call carries the same `X-Session-Id` and its step's `X-Step-Kind`, so the
gateway books them as one session; after the run the agent reads that session back from
`GET /v1/sessions/{id}` and prints its trajectory next to its own per-step table.

A 135M model is weak at choosing tools, so the agent never asks it to: each tool step names
its function in `tool_choice` (the worker's grammar makes the call valid JSON of that
function's parameters), and the answer step sends no tools at all. `lookup`'s topic is an
enum of the file's topics, so every call names one; the calculator evaluates arithmetic
with an AST walk (numbers and + - * / // % ** only, never `eval`), and an expression it
cannot evaluate comes back to the model as an error message, as a tool's failure would.

`--budget` caps the session's $ on the client side: no step starts once the receipts
(`x-hybridserve-cost-usd`) add up to it, and the answer step runs only while some is left.
The gateway's own session caps (`gateway.session_max_tokens` / `session_max_usd`) end the
run the same way when the gateway refuses a step (429 `session_budget_exceeded`).

Run it against `hybridserve up` (the default profile serves SmolLM2-135M-Instruct):

    python examples/agent.py --question "How long does light take from the Earth to the Moon?"

`--json` adds one last line, a JSON object of the steps and the session as the gateway reports it.
"""
from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

FACTS = Path(__file__).with_name("data") / "facts.md"
DEFAULT_QUESTION = "How many seconds does light take to travel from the Earth to the Moon?"
PLAN_TOKENS, TOOL_TOKENS, ANSWER_TOKENS = 48, 160, 96
MAX_EXPRESSION_CHARS = 40
SYSTEM = ("You are a careful assistant. Work step by step: plan, look facts up, compute, then answer "
          "in one or two sentences.")


# ------------------------------------------------------------------ local tools

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64


def calculate(expression: str) -> float | int:
    """The value of an arithmetic expression; ValueError for anything else (names, calls, ...)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {err.msg}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        try:
            return _OPS[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as err:
            raise ValueError(str(err)) from None
    raise ValueError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def load_facts(path: Path) -> dict[str, str]:
    """The file's topics: each `## name` heading and the text under it."""
    facts, name = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            name = line[3:].strip()
            facts[name] = ""
        elif name is not None and line.strip():
            facts[name] = (facts[name] + " " + line.strip()).strip()
    return facts


def tool_specs(topics: list[str]) -> list[dict]:
    """OpenAI tool definitions: `lookup` over the file's topics, and the calculator."""
    return [
        {"type": "function", "function": {
            "name": "lookup", "description": "Look a topic up in the fact file.",
            "parameters": {"type": "object", "additionalProperties": False, "required": ["topic"],
                           "properties": {"topic": {"enum": topics}}}}},
        {"type": "function", "function": {
            "name": "calculator", "description": "Evaluate an arithmetic expression.",
            "parameters": {"type": "object", "additionalProperties": False, "required": ["expression"],
                           "properties": {"expression": {
                               "type": "string", "pattern": f"^[0-9+*/(). -]{{1,{MAX_EXPRESSION_CHARS}}}$"}}}}}]


def run_tool(name: str, arguments: str, facts: dict[str, str]) -> str:
    """A tool call's result as the model will read it (errors included, as text)."""
    try:
        args = json.loads(arguments)
    except ValueError:
        return f"error: the arguments are not JSON: {arguments[:80]!r}"
    if name == "lookup":
        topic = args.get("topic") if isinstance(args, dict) else None
        return facts.get(topic, f"error: no topic {topic!r}; known: {', '.join(facts)}")
    if name == "calculator":
        expr = args.get("expression") if isinstance(args, dict) else None
        try:
            return f"{expr} = {calculate(str(expr)):g}"
        except ValueError as err:
            return f"error: {err}"
    return f"error: no tool {name!r}"


# ------------------------------------------------------------------ one step through the gateway

@dataclass
class Step:
    n: int
    kind: str
    backend: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    usd: float
    latency_s: float
    detail: str                      # the plan, the tool call and its result, or the answer


@dataclass
class Run:
    session_id: str
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    stopped: str = "answered"        # or why the run ended early

    @property
    def usd(self) -> float:
        return sum(s.usd for s in self.steps)


class BudgetRefused(Exception):
    """The gateway refused a step: the session has spent its cap."""


class Gateway:
    def __init__(self, url: str, api_key: str | None, model: str, session_id: str, timeout_s: float = 300.0):
        headers = {"X-Session-Id": session_id}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, trust_env=False)
        self.model = model
        self.session_id = session_id

    def chat(self, n: int, kind: str, messages: list[dict], max_tokens: int, **extra) -> tuple[dict, Step]:
        t0 = time.perf_counter()
        r = self.http.post("/v1/chat/completions", headers={"X-Step-Kind": kind},
                           json={"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                 "temperature": 0, **extra})
        latency = time.perf_counter() - t0
        if r.status_code == 429 and "session_budget_exceeded" in r.text:
            raise BudgetRefused(r.json()["error"]["message"])
        r.raise_for_status()
        body = r.json()
        usage = body.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        step = Step(n, kind, r.headers.get("x-hybridserve-backend", "?"), int(usage.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or 0), int(cached),
                    float(r.headers.get("x-hybridserve-cost-usd") or 0.0), latency, "")
        return body["choices"][0]["message"], step

    def session(self) -> dict:
        r = self.http.get(f"/v1/sessions/{self.session_id}")
        r.raise_for_status()
        return r.json()


# ------------------------------------------------------------------ the agent

def plan_steps(max_steps: int) -> list[tuple[str, str | None]]:
    """(step kind, forced tool) for each step: plan, lookup, calculator, answer, cut to the cap
    (the answer always stays last)."""
    full = [("plan", None), ("tool", "lookup"), ("tool", "calculator")]
    return full[:max(0, max_steps - 1)] + [("answer", None)]


def run_agent(gw: Gateway, question: str, facts: dict[str, str], max_steps: int, budget: float | None) -> Run:
    run = Run(gw.session_id)
    tools = tool_specs(list(facts))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    for n, (kind, tool) in enumerate(plan_steps(max_steps), 1):
        if budget is not None and run.usd >= budget:
            run.stopped = f"budget spent (${run.usd:.6f} of ${budget:g}) before step {n}"
            break
        try:
            if kind == "plan":
                ask = messages + [{"role": "user", "content": "Before answering, write a one-sentence plan."}]
                msg, step = gw.chat(n, kind, ask, PLAN_TOKENS)
                step.detail = (msg.get("content") or "").strip()
                messages.append({"role": "assistant", "content": step.detail})
            elif tool is not None:
                msg, step = gw.chat(n, kind, messages, TOOL_TOKENS, tools=tools,
                                    tool_choice={"type": "function", "function": {"name": tool}})
                calls = msg.get("tool_calls") or []
                if not calls:
                    step.detail = f"no {tool} call came back"
                else:
                    call = calls[0]
                    result = run_tool(call["function"]["name"], call["function"]["arguments"], facts)
                    step.detail = f"{call['function']['name']}({call['function']['arguments']}) -> {result}"
                    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                                 {"role": "tool", "tool_call_id": call["id"], "content": result}]
            else:
                ask = messages + [{"role": "user", "content": "Now answer my question in one or two plain "
                                                              "sentences, using the results above."}]
                msg, step = gw.chat(n, kind, ask, ANSWER_TOKENS)
                run.answer = step.detail = (msg.get("content") or "").strip()
        except BudgetRefused as err:
            run.stopped = f"the gateway refused step {n}: {err}"
            break
        except httpx.HTTPStatusError as err:
            run.stopped = f"step {n} failed: {err.response.status_code} {shorten(err.response.text, 200)}"
            break
        run.steps.append(step)
    return run


# ------------------------------------------------------------------ output

def shorten(text: str, width: int) -> str:
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= width else text[:width - 1] + "…"


def step_table(steps: list[Step]) -> str:
    head = (f"{'#':>2}  {'kind':<7} {'backend':<18} {'prompt':>6} {'compl':>5} {'cached':>6} {'$':>11} "
            f"{'latency':>8}  detail")
    rows = [f"{s.n:>2}  {s.kind:<7} {s.backend:<18} {s.prompt_tokens:>6} {s.completion_tokens:>5} "
            f"{s.cached_tokens:>6} {s.usd:>11.8f} {s.latency_s:>7.2f}s  {shorten(s.detail, 60)}" for s in steps]
    return "\n".join([head, "-" * len(head), *rows])


def session_summary(s: dict) -> str:
    lines = [f"session {s['id']}: {s['calls']} calls, {s['prompt_tokens']} prompt + {s['completion_tokens']} "
             f"completion tokens ({s['cached_tokens']} cached), ${s['usd']:.8f}, wall {s['wall_s']:.2f}s, "
             f"{s['tool_calls']} tool calls, {s['retries']} retries ({s['failovers']} failovers, "
             f"{s['client_retries']} client retries), backends {s['backends']}",
             f"  {'step kind':<12} {'calls':>5} {'prompt':>6} {'compl':>5} {'cached':>6} {'$':>11} {'wall':>7} "
             f"{'tools':>5}"]
    for kind, row in s["steps"].items():
        lines.append(f"  {kind:<12} {row['calls']:>5} {row['prompt_tokens']:>6} {row['completion_tokens']:>5} "
                     f"{row['cached_tokens']:>6} {row['usd']:>11.8f} {row['wall_s']:>6.2f}s "
                     f"{row['tool_calls']:>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)")
    ap.add_argument("--api-key", default=None, help="a gateway key, when its auth is required")
    ap.add_argument("--model", default="smollm2-135m", help="backend, tier or alias (default: %(default)s)")
    ap.add_argument("--max-steps", type=int, default=4,
                    help="step cap, the answer included (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=None,
                    help="the session's $ cap on this side (default: none)")
    ap.add_argument("--question", default=DEFAULT_QUESTION)
    ap.add_argument("--facts", type=Path, default=FACTS, help="the lookup tool's file (default: examples/data)")
    ap.add_argument("--session", default=None, help="session id (default: a new one)")
    ap.add_argument("--json", action="store_true", help="end with one JSON line: the steps and the session")
    args = ap.parse_args(argv)
    if args.max_steps < 1:
        ap.error("--max-steps must be at least 1 (the answer step)")
    if args.budget is not None and args.budget <= 0:
        ap.error("--budget must be a positive $ amount")
    gw = Gateway(args.url, args.api_key, args.model, args.session or f"agent-{uuid.uuid4().hex[:12]}")
    run = run_agent(gw, args.question, load_facts(args.facts), args.max_steps, args.budget)
    print(f"question: {args.question}\n")
    print(step_table(run.steps))
    print(f"\nanswer: {run.answer if run.answer is not None else '(none)'}  [{run.stopped}]\n")
    session = gw.session() if run.steps else None
    if session is not None:
        print(session_summary(session))
    if args.json:
        print(json.dumps({"session_id": run.session_id, "stopped": run.stopped, "answer": run.answer,
                          "steps": [asdict(s) for s in run.steps], "session": session}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
