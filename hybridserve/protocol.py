"""OpenAI request models and response builders shared by the gateway and the worker.

Requests are pydantic models in strict mode, so a wrong JSON type (`"max_tokens": "9"`)
is a 400 naming the field rather than a silent coercion; unknown OpenAI fields are
kept (`extra="allow"`) so newer clients still work. Responses are plain dicts built
by small functions: they sit on the hot path and need no validation.

Chat requests carry OpenAI's tool calling and structured outputs: `tools` (function
definitions whose `parameters` are JSON Schemas), `tool_choice`, `parallel_tool_calls`,
`response_format`, and assistant `tool_calls` / `tool` results in `messages`. Every
schema is checked against JSON Schema's 2020-12 metaschema here, so a bad one is a 400
naming `tools` or `response_format` on the gateway before any upstream call; the legacy
`functions` / `function_call` are refused with a pointer to their successors.

The `usage` object may carry hybridserve's measurements next to OpenAI's three
counts (`device_seconds`, `ttft_s`, `queue_s`, `e2e_s`, `thinking_tokens`; the gateway
adds its cost receipt: `cost_usd`, `route_policy`, …); the `openai` client keeps
unknown usage fields as extras, so callers read them as `usage.device_seconds`.
"""
from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from hybridserve.errors import InvalidRequestError, PayloadTooLargeError

MAX_N = 16
PRIORITIES = ("interactive", "batch")  # `hybridserve_priority`: batch runs on what interactive work leaves
MAX_LOGPROBS = 20
MAX_TOOLS = 128
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"   # a function's or a json_schema response format's name
TOOL_CHOICE_MODES = ("none", "auto", "required")

# What a request body may hold (`parse_body`); beyond these it is a 400 that says which limit
MAX_BODY_BYTES = 32 << 20       # a larger body is a 413 before it is read (`read_body`)
MAX_DEPTH = 32                  # nesting of arrays and objects, the body itself counting as 1
MAX_STRING_CHARS = 4 << 20      # characters in one string (an object key included)
MAX_MEMBERS = 1 << 20           # items of one array, or members of one object
INT64 = (-(1 << 63), (1 << 63) - 1)   # integers fit in int64 (token ids, seeds, counts)
_SURROGATE = re.compile("[\ud800-\udfff]")
# a JSON string (group 1: its text; group 2: the colon when it is an object key), or a bracket
_JSON_TOKEN = re.compile(r'"([^"\\]*(?:\\.[^"\\]*)*)"(\s*:)?|[\[\]{}]')


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Model):
    include_usage: bool = False


class _SamplingFields(_Model):
    """Fields completions and chat share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM extension; 0 or -1 means off
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    max_thinking_tokens: int | None = Field(None, ge=0)  # budget forcing (hybridserve extension)

    @field_validator("stop")
    @classmethod
    def _stop_ok(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("`echo` is not supported; leave it false")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("`best_of` other than n is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("`prompt` must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Model):
    type: str
    text: str | None = None


class FunctionCall(_Model):
    name: str
    arguments: str   # JSON text, as the model wrote it


class ToolCall(_Model):
    """A call an assistant message made (sent back in the next turn's `messages`)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None   # assistant messages only
    tool_call_id: str | None = None            # tool messages: the call this result answers

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a `tool` message needs `tool_call_id`, the id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise InvalidRequestError(f"content part type '{part.type}' is not supported; "
                                          "only 'text'", param="messages")
            parts.append(part.text or "")
        return "".join(parts)


def check_json_schema(schema: dict[str, Any], what: str) -> None:
    """Raise ValueError (a 400 through validate_request) when `schema` is not a JSON Schema."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as err:
        where = err.json_path.removeprefix("$").lstrip(".") or "its root"
        raise ValueError(f"{what} is not a valid JSON Schema: {err.message} (at {where})") from None


class FunctionDefinition(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None   # a JSON Schema of the arguments object
    strict: bool | None = None

    @model_validator(mode="after")
    def _parameters_ok(self) -> "FunctionDefinition":
        if self.parameters is None:
            return self
        kind = self.parameters.get("type", "object")
        if kind != "object" and not (isinstance(kind, list) and "object" in kind):
            raise ValueError(f"function '{self.name}': parameters must describe a JSON object "
                             f"(`\"type\": \"object\"`), not {json.dumps(kind)}")
        check_json_schema(self.parameters, f"function '{self.name}': parameters")
        return self


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_ok(self) -> "JsonSchemaFormat":
        if self.schema_ is not None:
            check_json_schema(self.schema_, f"json_schema '{self.name}': schema")
        return self


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('`"type": "json_schema"` needs a `json_schema` object: {name, schema}')
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_legacy_functions(cls, data: Any) -> Any:
        for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
            if isinstance(data, dict) and data.get(old) is not None:
                raise InvalidRequestError(f"`{old}` is deprecated and not served; use `{new}`", param=old)
        return data

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        seen: set[str] = set()
        for t in tools or ():
            if t.function.name in seen:
                raise ValueError(f"two tools are named '{t.function.name}'; function names must be unique")
            seen.add(t.function.name)
        return tools

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _tool_choice_ok(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        try:
            choice = handler(value)
        except ValidationError:
            raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": '
                             '{"name": ...}}') from None
        if choice is None:
            return None
        if "tools" not in info.data:  # `tools` itself was invalid: that error is reported
            return choice
        names = [t.function.name for t in info.data["tools"] or ()]
        if not names:
            raise ValueError("there are no `tools` to choose from")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"names function '{choice.function.name}', which is not among `tools` "
                             f"({', '.join(names)})")
        return choice

    @model_validator(mode="after")
    def _logprobs_pair(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_text_bytes(self) -> int:
        """UTF-8 bytes of what the prompt is rendered from: message texts, the calls assistant
        messages made (names and arguments) and the tools' definitions as JSON."""
        n = sum(len(m.text().encode()) for m in self.messages)
        for m in self.messages:
            for c in m.tool_calls or ():
                n += len(c.function.name.encode()) + len(c.function.arguments.encode())
        if self.tools:
            n += len(json.dumps(tool_dicts(self.tools), separators=(",", ":"), ensure_ascii=False).encode())
        return n


def tool_dicts(tools: list[Tool]) -> list[dict[str, Any]]:
    """Tool definitions as the client sent them (unset fields left out), for templates and sizes."""
    return [t.model_dump(exclude_none=True, by_alias=True) for t in tools]


async def read_body(request: Any, limit: int = MAX_BODY_BYTES) -> bytes:
    """A Starlette request's body, refusing (413) one larger than `limit` before reading it all."""
    too_big = PayloadTooLargeError(f"request body exceeds {limit >> 20} MiB")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


def is_int(v: Any) -> bool:
    """A JSON integer (Python's bool is an int subclass, and JSON's true is not a number)."""
    return isinstance(v, int) and not isinstance(v, bool)


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body or raise a 400 that says what is wrong and where.

    Accepted: strict UTF-8 (so no encoded surrogates such as ED A0 80) holding one JSON
    object, nested at most MAX_DEPTH deep, with strings of at most MAX_STRING_CHARS and
    free of lone surrogates (`"\\ud800"`, which no Unicode text can carry), arrays and
    objects of at most MAX_MEMBERS, finite numbers (no NaN, Infinity or 1e999) and integers
    within int64. Anything else never reaches validation, tokenizers or encoders."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidRequestError(f"request body is not valid UTF-8 (byte {err.start}: {err.reason})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:     # far deeper than MAX_DEPTH: find the field it happened in
        raise _limit_error(_too_deep_at(text), _TOO_DEEP) from None
    except ValueError as err:   # bad JSON, NaN/Infinity, an integer of thousands of digits
        raise InvalidRequestError(f"request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    check_limits(data)
    return data


_TOO_DEEP = f"arrays and objects nest deeper than {MAX_DEPTH} levels"


def _too_deep_at(text: str) -> tuple:
    """The top-level field (as a path) in which JSON text first nests deeper than MAX_DEPTH;
    () when that is not inside a field. Scans only up to that point."""
    depth, key = 0, None
    for m in _JSON_TOKEN.finditer(text):
        if m.group(1) is not None:
            if depth == 1 and m.group(2):
                key = m.group(1)
        elif m.group() in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return () if key is None or depth == 1 else (key,)
        else:
            depth -= 1
    return ()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _where(path: tuple) -> str:
    """A value's place in the body as `messages.0.content` (long keys shortened)."""
    return ".".join(str(p) if len(str(p)) <= 40 else str(p)[:37] + "..." for p in path) or "body"


def _limit_error(path: tuple, problem: str) -> InvalidRequestError:
    top = path[0] if path and isinstance(path[0], str) else None
    return InvalidRequestError(f"{_where(path)}: {problem}", param=top)


def _check_str(s: str, path: tuple, what: str = "string") -> None:
    if len(s) > MAX_STRING_CHARS:
        raise _limit_error(path, f"{what} of {len(s)} characters; at most {MAX_STRING_CHARS}")
    if not s.isascii():
        bad = _SURROGATE.search(s)
        if bad:
            raise _limit_error(path, f"{what} holds a lone surrogate (U+{ord(bad.group()):04X} at "
                                     f"character {bad.start()}), which is not valid Unicode text")


def _check_scalar(v: Any, path: tuple, k: Any) -> None:
    """One string or number at `path` + `k` (the path is only built for an error)."""
    t = type(v)
    if t is str:
        if len(v) > 64 or not v.isascii():
            _check_str(v, (*path, k))
    elif t is int and not INT64[0] <= v <= INT64[1]:
        raise _limit_error((*path, k), "integer outside the 64-bit range")
    elif t is float and not math.isfinite(v):
        raise _limit_error((*path, k), "number too large to be finite")


def check_limits(data: dict) -> None:
    """Walk a decoded body (without recursion) and raise a 400 naming the first value that
    breaks one of parse_body's limits: depth, sizes, lone surrogates, non-finite numbers."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise _limit_error(path, _TOO_DEEP)
        if len(node) > MAX_MEMBERS:
            raise _limit_error(path, f"{len(node)} members; at most {MAX_MEMBERS}")
        is_obj = isinstance(node, dict)
        for k, v in (node.items() if is_obj else enumerate(node)):
            if is_obj:
                _check_str(k, path, "an object key")
            if isinstance(v, (dict, list)):
                stack.append((v, (*path, k)))
            else:
                _check_scalar(v, path, k)


def validate_request(model_cls: type[_Model], data: dict[str, Any]) -> Any:
    """Validate a decoded body against a request model; 400 names the first bad field."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            msg = "required field is missing"
        top = str(first["loc"][0]) if first["loc"] else None
        raise InvalidRequestError(f"{loc}: {msg}" if loc else msg, param=top) from None


# ---------------------------------------------------------------- responses


def new_id(prefix: str, request_id: str) -> str:
    return f"{prefix}-{request_id}"


def check_priority(value: Any) -> str:
    """`hybridserve_priority` (default interactive), or a 400 naming the field."""
    if value is None:
        return "interactive"
    if value not in PRIORITIES:
        raise InvalidRequestError(f"hybridserve_priority must be one of {', '.join(PRIORITIES)}",
                                  param="hybridserve_priority")
    return value


def check_cache_salt(salt: Any) -> None:
    """vLLM's rule for `cache_salt` (a prefix-cache namespace): None, or 1-128 characters without
    '@', '/', '\\' or NUL; anything else is a 400 naming the field."""
    if salt is None:
        return
    if not isinstance(salt, str) or not 0 < len(salt) <= 128 or any(c in salt for c in "@/\\\0"):
        raise InvalidRequestError("cache_salt must be a string of 1-128 characters without '@', '/', "
                                  "'\\' or NUL", param="cache_salt")


def usage_dict(prompt_tokens: int, completion_tokens: int, **extra: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def completion_response(rid: str, model: str, choices: list[dict], usage: dict) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def chat_response(rid: str, model: str, choices: list[dict], usage: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def completion_chunk(rid: str, model: str, created: int, choices: list[dict],
                     usage: dict | None = None, with_usage: bool = False) -> dict[str, Any]:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": choices}
    if with_usage:
        out["usage"] = usage
    return out


def chat_chunk(rid: str, model: str, created: int, choices: list[dict],
               usage: dict | None = None, with_usage: bool = False) -> dict[str, Any]:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices}
    if with_usage:
        out["usage"] = usage
    return out


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def model_card(name: str, owned_by: str = "hybridserve", **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owned_by, **extra}
