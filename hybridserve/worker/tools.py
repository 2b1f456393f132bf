"""Tool calling and structured outputs on a native worker: prompts, grammars and parsed calls.

Calls travel in one format, Hermes' (the one vLLM's `hermes` parser reads), whatever the model:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

* Prompt (`chat_messages`): a chat template that reads `tools` gets them, with assistant
  `tool_calls` and `tool` results, from `apply_chat_template` itself. One that does not (the
  built-in models', SmolLM2's) gets them spelled out: a system message (merged into the first
  one) lists the tools as JSON and the call format, past calls are the assistant's text in
  that format, tool results are `tool` messages reading `<tool_response>…</tool_response>`.
* Grammar (`plan_tools`): `tool_choice` "auto" lets the model write text, but once it starts
  `<tool_call>` the call must name a tool and match its parameters; "required" or a named
  function makes the whole output one such tagged call (a structural tag without triggers);
  with a json `response_format` too, "auto" means one call or the JSON answer. "none", or no
  tools, leaves tools to the prompt. `response_format` alone is a JSON grammar.
* Answer (`ToolCallParser`): the output split into content and OpenAI `tool_calls`, as it
  streams or at once (the same code, so the streamed argument fragments concatenate to the
  non-streamed arguments). Text that may begin `<tool_call>` is held back until it is known
  not to; a call commits once its header names a tool. A malformed call, which only an
  unguided output can hold, stays content in the non-streamed answer.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable

from hybridserve import protocol as P
from hybridserve.engine.guided import GuidedSpec

CALL_BEGIN, CALL_END = "<tool_call>", "</tool_call>"
RESPONSE_BEGIN, RESPONSE_END = "<tool_response>", "</tool_response>"
TOOLS_PREAMBLE = (
    "You may call functions to help answer. They are listed below as JSON, one a line:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call one, write the call on a line of its own in exactly this form (several calls: one "
    "a line):\n"
    '<tool_call>{{"name": <function name>, "arguments": <arguments as a JSON object>}}</tool_call>\n'
    "Each call's result comes back in a `tool` message as <tool_response>…</tool_response>.")
_NAME_STRING = re.compile(r'"([a-zA-Z0-9_-]{1,64})"')
_NAME_PREFIX = re.compile(r'"[a-zA-Z0-9_-]{0,64}')
_HEADER = ("{", '"name"', ":", None, ",", '"arguments"', ":")   # None: the name's JSON string
_WS = " \t\n\r"


# ------------------------------------------------------------------ prompt

def template_reads_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template (or one of its named templates) renders `tools`."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and "tools" in t for t in texts)


_NOT_JSON = object()


def _json_value(text: str, default: Any = _NOT_JSON) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default


def call_text(name: str, arguments: str) -> str:
    """One call in the tagged format; arguments go in as written when they are JSON."""
    args = arguments if _json_value(arguments) is not _NOT_JSON else json.dumps(arguments)
    return f'{call_prefix(name)}{args}}}{CALL_END}'


def call_prefix(name: str) -> str:
    """What a call to `name` starts with, up to its arguments (names need no JSON escaping)."""
    return f'{CALL_BEGIN}{{"name": "{name}", "arguments": '


def chat_messages(messages: list[P.ChatMessage], tools: list[P.Tool] | None,
                  native: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages for `apply_chat_template`, and its extra keyword arguments: with `native`
    the template renders tools and calls itself, otherwise they are written out as text."""
    if native:
        return [_native_message(m) for m in messages], ({"tools": P.tool_dicts(tools)} if tools else {})
    msgs = [_text_message(m) for m in messages]
    if tools:
        preamble = TOOLS_PREAMBLE.format(tools="\n".join(
            json.dumps(t, ensure_ascii=False) for t in P.tool_dicts(tools)))
        first = next((m for m in msgs if m["role"] == "system"), None)
        if first is None:
            msgs.insert(0, {"role": "system", "content": preamble})
        else:
            first["content"] = f"{first['content']}\n\n{preamble}" if first["content"] else preamble
    return msgs, {}


def _native_message(m: P.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:   # templates index arguments as data (`arguments | tojson`, `.items()`)
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _json_value(c.function.arguments, c.function.arguments)}}
            for c in m.tool_calls]
    return out


def _text_message(m: P.ChatMessage) -> dict[str, Any]:
    text = m.text()
    if m.role == "tool":
        return {"role": "tool", "content": f"{RESPONSE_BEGIN}{text}{RESPONSE_END}"}
    if m.tool_calls:
        calls = "\n".join(call_text(c.function.name, c.function.arguments) for c in m.tool_calls)
        text = f"{text}\n{calls}" if text else calls
    return {"role": m.role, "content": text}


# ------------------------------------------------------------------ grammar

@dataclass(frozen=True)
class ToolPlan:
    """How one chat request's tools and response_format shape its generation and its answer."""

    guided: GuidedSpec | None = None
    tool_names: frozenset[str] | None = None   # None: the answer is text, nothing is parsed
    stop: tuple[str, ...] = ()                 # stop strings to add (parallel_tool_calls false)


def arguments_schema(fn: P.FunctionDefinition) -> dict[str, Any]:
    """The JSON Schema a call's arguments must match: always an object."""
    params = fn.parameters or {}
    return params if "type" in params else {**params, "type": "object"}


def _structure(fn: P.FunctionDefinition) -> dict[str, Any]:
    return {"begin": call_prefix(fn.name), "schema": arguments_schema(fn), "end": "}" + CALL_END}


def response_guide(fmt: P.ResponseFormat | None) -> GuidedSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema.schema_ is not None:
        return GuidedSpec.json_schema(fmt.json_schema.schema_)
    return GuidedSpec.json_object()


def _answer_structure(fmt: P.ResponseFormat) -> dict[str, Any]:
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
    return {"begin": "", "schema": schema if schema is not None else {"type": "object"}, "end": ""}


def plan_tools(req: P.ChatCompletionRequest) -> ToolPlan:
    tools = req.tools or []
    choice = req.tool_choice or "auto"
    if not tools or choice == "none":
        return ToolPlan(guided=response_guide(req.response_format))
    names = frozenset(t.function.name for t in tools)
    if isinstance(choice, P.NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        return ToolPlan(GuidedSpec.structural_tag([_structure(t.function) for t in chosen], []), names)
    structures = [_structure(t.function) for t in tools]
    if choice == "required":
        return ToolPlan(GuidedSpec.structural_tag(structures, []), names)
    if response_guide(req.response_format) is not None:   # one call, or the answer as JSON
        return ToolPlan(GuidedSpec.structural_tag([*structures, _answer_structure(req.response_format)], []),
                        names)
    stop = () if req.parallel_tool_calls else (CALL_END,)
    return ToolPlan(GuidedSpec.structural_tag(structures, [CALL_BEGIN]), names, stop)


# ------------------------------------------------------------------ answer

@dataclass
class ParsedCall:
    index: int
    name: str
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))
    arguments: str = ""
    raw: str = CALL_BEGIN    # all of the call's text, for a malformed call to stay content
    complete: bool = False
    depth: int = 0           # the arguments' JSON nesting, strings tracked so braces in them don't count
    in_string: bool = False
    escaped: bool = False

    def scan(self, ch: str) -> None:
        """Track the arguments' nesting through one more character of them."""
        if self.escaped:
            self.escaped = False
        elif self.in_string:
            self.escaped = ch == "\\"
            self.in_string = ch != '"'
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Event:
    """A piece of streamed answer: content text, or a call's fragment of arguments (`first`: the
    call's first event, which carries its id and name)."""

    text: str
    call: ParsedCall | None = None
    first: bool = False


def _skip_ws(s: str, pos: int) -> int:
    while pos < len(s) and s[pos] in _WS:
        pos += 1
    return pos


def match_header(s: str) -> tuple[str, int] | None | bool:
    """A call's header `{"name": "<name>", "arguments":` at the start of `s`: (name, end) when
    it is all there, None when `s` may still become one, False when it cannot."""
    pos, name = 0, ""
    for piece in _HEADER:
        pos = _skip_ws(s, pos)
        if piece is None:
            m = _NAME_STRING.match(s, pos)
            if m is None:
                return None if _NAME_PREFIX.fullmatch(s, pos) or pos == len(s) else False
            name, pos = m.group(1), m.end()
        elif s.startswith(piece, pos):
            pos += len(piece)
        else:
            return None if piece.startswith(s[pos:]) else False
    return name, pos


def _held_suffix(s: str) -> int:
    """Length of the longest end of `s` that could be the start of CALL_BEGIN."""
    for n in range(min(len(s), len(CALL_BEGIN) - 1), 0, -1):
        if CALL_BEGIN.startswith(s[-n:]):
            return n
    return 0


class ToolCallParser:
    """One choice's output split into content and tagged tool calls, fed as it streams.

    `feed` and `finish` return what became known (`Event`s); `message` is the whole answer."""

    def __init__(self, tool_names: Iterable[str]):
        self.tool_names = frozenset(tool_names)
        self.buf = ""
        self.state = "text"   # text | header | arguments | tail
        self.segments: list[str | ParsedCall] = []
        self.call: ParsedCall | None = None

    @property
    def calls(self) -> list[ParsedCall]:
        return [s for s in self.segments if isinstance(s, ParsedCall) and s.complete]

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        return self._run(final=True)

    def message(self) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of the whole answer: content is the text outside the calls
        (a malformed call's text included), None when calls leave nothing but whitespace."""
        content = "".join(s if isinstance(s, str) else ("" if s.complete else s.raw) for s in self.segments)
        calls = [c.openai() for c in self.calls]
        return (content if content.strip() or not calls else None), calls

    def _run(self, final: bool) -> list[Event]:
        events: list[Event] = []
        step = {"text": self._text, "header": self._header, "arguments": self._arguments, "tail": self._tail}
        while step[self.state](events, final):
            pass
        return events

    def _content(self, events: list[Event], text: str) -> None:
        if text:
            self.segments.append(text)
            events.append(Event(text))

    def _take(self, n: int) -> str:
        """The next n characters of the buffer, counted into the open call's text."""
        head, self.buf = self.buf[:n], self.buf[n:]
        self.call.raw += head
        return head

    def _text(self, events: list[Event], final: bool) -> bool:
        i = self.buf.find(CALL_BEGIN)
        if i < 0:
            keep = 0 if final else _held_suffix(self.buf)
            self._content(events, self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        self._content(events, self.buf[:i])
        self.buf = self.buf[i + len(CALL_BEGIN):]
        self.state = "header"
        return True

    def _header(self, events: list[Event], final: bool) -> bool:
        found = match_header(self.buf)
        if found is None and not final:
            return False
        if not found or found[0] not in self.tool_names:   # not a call after all: the tag is text
            self._content(events, CALL_BEGIN)
            self.state = "text"
            return True
        name, end = found
        index = sum(isinstance(s, ParsedCall) for s in self.segments)
        self.call = ParsedCall(index, name)
        self.segments.append(self.call)
        self._take(end)
        events.append(Event("", self.call, first=True))
        self.state = "arguments"
        return True

    def _arguments(self, events: list[Event], final: bool) -> bool:
        call = self.call
        if not call.arguments:   # before the opening brace
            self._take(_skip_ws(self.buf, 0))
            if not self.buf:
                return self._close(valid=False) if final else False
            if self.buf[0] != "{":
                return self._close(valid=False)
        n = 0
        while n < len(self.buf) and not (call.arguments and call.depth == 0):
            n += 1
            call.arguments += self.buf[n - 1]
            call.scan(self.buf[n - 1])
        fragment = self._take(n)
        if fragment:
            events.append(Event(fragment, call))
        if call.depth == 0:
            self.state = "tail"
            return True
        return self._close(valid=False) if final else False

    def _tail(self, events: list[Event], final: bool) -> bool:
        """After the arguments: the envelope's `}`, then CALL_END (or the output's end, where a
        stop string took the end tag away)."""
        pos = _skip_ws(self.buf, 0)
        if pos == len(self.buf):
            return self._close(valid=False) if final else False
        if self.buf[pos] != "}":
            return self._close(valid=False)
        after = _skip_ws(self.buf, pos + 1)
        rest = self.buf[after:]
        if rest.startswith(CALL_END) or (final and not rest):
            self._take(after + len(CALL_END) if rest else after)
            return self._close(valid=isinstance(_json_value(self.call.arguments, None), dict))
        if CALL_END.startswith(rest) and not final:
            return False
        return self._close(valid=False)

    def _close(self, valid: bool) -> bool:
        """The call ends: `valid` when it followed the format to its end (a malformed call's
        text stays content in `message`); what follows is text again."""
        self.call.complete = valid
        self.call = None
        self.state = "text"
        return True


def stream_deltas(events: list[Event]) -> list[dict[str, Any]]:
    """Events as OpenAI chat deltas, in order: runs of content become one `content`, runs of call
    fragments one `tool_calls` list (a call's first entry carries id, type and name)."""
    deltas: list[dict[str, Any]] = []
    for e in events:
        if e.call is None:
            if deltas and "content" in deltas[-1]:
                deltas[-1]["content"] += e.text
            else:
                deltas.append({"content": e.text})
            continue
        if not deltas or "tool_calls" not in deltas[-1]:
            deltas.append({"tool_calls": []})
        entries = deltas[-1]["tool_calls"]
        if entries and entries[-1]["index"] == e.call.index and not e.first:
            entries[-1]["function"]["arguments"] += e.text
        elif e.first:
            entries.append({"index": e.call.index, "id": e.call.id, "type": "function",
                            "function": {"name": e.call.name, "arguments": e.text}})
        else:
            entries.append({"index": e.call.index, "function": {"arguments": e.text}})
    return deltas
