"""The OpenAPI document the gateway and the worker serve at /openapi.json (Swagger UI: /docs).

Handlers read raw JSON and `protocol` validates it (on the gateway the governor and the
router check their own fields); FastAPI never parses a body. The models here only describe
those bodies. They subclass protocol's request models, so every bound protocol declares
(strict JSON types, ge/le, min_length) reaches the document unchanged, and they add what
protocol and the handlers check in code: at most 4 stop strings, `echo` false, text-only
content parts, non-empty prompt lists, integers within int64, messages by role (a tool
result names its call), tools and response formats and, on the gateway, the fields the
governor and the router read. Unknown fields are kept, and documented as
`JsonValue`: any JSON within parse_body's limits. Every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}`; the gateway's /v1 routes carry the
bearer scheme when keys are required. The Batch API's bodies (a multipart upload, the
strict `BatchCreateRequest`) and objects (File, Batch, their lists) are described here too.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from hybridserve import __version__
from hybridserve import protocol as P

TokenId = Annotated[int, Field(ge=0, description="a token id of the model's vocabulary (others: 400)")]
StopStrings = Annotated[list[str], Field(max_length=4)]
NonEmpty = Field(min_length=1)
# JSON Schema counts 6.0 as an integer; protocol's strict types do not (nor "6" as a number)
STRICT_TYPES = ("Types are strict: an integer field takes an integer literal (`6`, not `6.0` or "
                "`\"6\"`), a boolean takes true or false; a wrong type is a 400 naming the field.")
STOP_DOC = "a string or at most 4 strings; generation ends before any of them"


# ------------------------------------------------------------------ request bodies

class TextPart(P.ContentPart):
    """A content part: only text is served."""

    type: Literal["text"]


class Message(P.ChatMessage):
    """A system, developer or user message."""

    role: Literal["system", "developer", "user"]
    content: str | list[TextPart] | None = None
    tool_calls: None = None
    tool_call_id: None = None


class AssistantMessage(Message):
    """An assistant's turn: its text, or the tool calls it made (content may then be null)."""

    role: Literal["assistant"]
    tool_calls: list[P.ToolCall] | None = None


class ToolMessage(Message):
    """A tool's result, answering the call `tool_call_id`."""

    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1)


SCHEMA_DOC = "a JSON Schema (draft 2020-12; others: 400)"
ANY_JSON = {"$ref": "#/components/schemas/JsonValue"}


class FunctionDefinition(P.FunctionDefinition):
    parameters: dict[str, Any] | None = Field(
        None, json_schema_extra={"properties": {"type": {"const": "object"}}, "additionalProperties": ANY_JSON},
        description=f"the arguments object: {SCHEMA_DOC} of `\"type\": \"object\"` (the default)")


class Tool(P.Tool):
    function: FunctionDefinition


class JsonSchemaFormat(P.JsonSchemaFormat):
    schema_: dict[str, Any] | None = Field(None, alias="schema", description=SCHEMA_DOC,
                                           json_schema_extra={"additionalProperties": ANY_JSON})


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object"]


class JsonSchemaResponseFormat(P.ResponseFormat):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


TOOLS_DOC = ("functions the model may call (names unique); see docs/tools.md. `tool_choice` needs "
             "`tools` and may only name one of them")


class CacheFields(BaseModel):
    """Prompt caching: vLLM's `cache_salt` and OpenAI's `prompt_cache_key`."""

    cache_salt: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^@/\\\x00]+$",
                                   description="prefix-cache namespace: requests share cached prefixes only "
                                               "with the same salt (the gateway folds in the caller's key)")
    prompt_cache_key: str | None = Field(None, description="requests with the same key go where their "
                                                           "prefix is cached (gateway routing)")


class CompletionBody(CacheFields, P.CompletionRequest):
    """POST /v1/completions. Unknown fields are kept (and forwarded by the gateway)."""

    prompt: (str | Annotated[list[str], NonEmpty] | Annotated[list[TokenId], NonEmpty]
             | Annotated[list[Annotated[list[TokenId], NonEmpty]], NonEmpty]) = Field(
        description="text, token ids, or a batch of either (each gets `n` completions)")
    stop: str | StopStrings | None = Field(None, description=STOP_DOC)
    stop_token_ids: list[TokenId] | None = None
    echo: Literal[False] = Field(False, description="not supported; leave it false")
    best_of: int | None = Field(None, ge=1, le=P.MAX_N, description="only 1 or `n`")


class ChatCompletionBody(CacheFields, P.ChatCompletionRequest):
    """POST /v1/chat/completions. Unknown fields are kept (and forwarded by the gateway)."""

    model_config = ConfigDict(json_schema_extra={"dependentSchemas": {"tool_choice": {
        "required": ["tools"], "properties": {"tools": {"type": "array"}}}}})
    messages: Annotated[list[Message | AssistantMessage | ToolMessage], NonEmpty]
    stop: str | StopStrings | None = Field(None, description=STOP_DOC)
    stop_token_ids: list[TokenId] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=P.MAX_LOGPROBS, description="needs `logprobs: true`")
    tools: Annotated[list[Tool], Field(min_length=1, max_length=P.MAX_TOOLS,
                                       json_schema_extra={"uniqueItems": True})] | None = Field(
        None, description=TOOLS_DOC)
    response_format: TextFormat | JsonSchemaResponseFormat | None = None


def gateway_bodies(efforts: Sequence[str]) -> tuple[type[BaseModel], type[BaseModel]]:
    """The gateway's completion and chat bodies: the worker's plus the governor's and the
    router's fields; `efforts` are the names of `gateway.thinking_budgets`."""
    # no budgets configured: any effort but null is a 400
    effort_type: Any = Literal[tuple(efforts)] if efforts else type(None)   # type: ignore[valid-type]

    class GatewayFields(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        model: str = Field(min_length=1, description="a backend, an alias, `auto` or `auto:<policy>`")
        mode: Literal["fast", "deep"] | None = Field(
            None, description="`fast`: no thinking, cheapest route; `deep`: effort high, top tier")
        reasoning_effort: effort_type | None = Field(None, description="a thinking budget by name")
        hybridserve_vote: bool = Field(False, description="self-consistency over `n` >= 2 samples; "
                                                          "not with `stream`")
        hybridserve_quality_floor: float | None = Field(
            None, ge=0, le=1, description="least measured accuracy the backend must have")
        hybridserve_task: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$",
                                             description="the task tag the quality floor is read for")

    class GatewayCompletionBody(GatewayFields, CompletionBody):
        """POST /v1/completions through the gateway."""

    class GatewayChatCompletionBody(GatewayFields, ChatCompletionBody):
        """POST /v1/chat/completions through the gateway."""

    return GatewayCompletionBody, GatewayChatCompletionBody


# ------------------------------------------------------------------ responses

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field at fault, when one is")
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body; every 4xx and 5xx of the gateway and the workers has it."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    model_config = ConfigDict(extra="allow")
    cached_tokens: int = Field(description="prompt tokens served from the backend's prefix cache")


class Usage(BaseModel):
    """OpenAI's three counts plus hybridserve's measurements (device_seconds, ttft_s, cost_usd, ...)."""

    model_config = ConfigDict(extra="allow")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Completion(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage


class ChatCompletion(Completion):
    object: Literal["chat.completion"]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]


# ------------------------------------------------------------------ the Batch API (gateway/batch_api.py)

FILE_UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "JSONL, one request per line: at most 64 MiB and 50,000 lines"},
                   "purpose": {"type": "string", "enum": ["batch"]}}}}}}}


class BatchCreateRequest(BaseModel):
    """POST /v1/batches. The window is OpenAI's `24h`, or `<N>s`, `<N>m`, `<N>h` up to 168h."""

    model_config = ConfigDict(extra="forbid", strict=True)
    input_file_id: str = Field(min_length=1, description="a file of the caller's, uploaded with purpose `batch`")
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: str = Field(pattern=r"^[1-9][0-9]{0,5}[smh]$",
                                   description="lines not run within it end with error code `batch_expired`")
    metadata: dict[Annotated[str, Field(min_length=1, max_length=64)],
                   Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    output_expires_after: dict[str, Any] | None = Field(None, description="accepted and ignored: files are kept")


class FileObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"]


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchObject(BaseModel):
    """OpenAI's Batch, plus `hybridserve_totals` ($ cost, gateway tokens, device-seconds)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                    "cancelling", "cancelled"]
    created_at: int
    expires_at: int
    request_counts: dict[str, int]
    errors: dict[str, Any] | None = Field(None, description="why validation failed: "
                                          "{object: list, data: [{code, message, param, line}]}")
    output_file_id: str | None = None
    error_file_id: str | None = None
    usage: dict[str, Any] | None = None
    hybridserve_totals: dict[str, Any] | None = None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


ERRORS = {400: "malformed or unservable request; `param` names the field",
          401: "missing, malformed or unknown API key", 404: "no such model, session, file, batch or route",
          413: f"body larger than {P.MAX_BODY_BYTES >> 20} MiB", 429: "a key or session budget is spent",
          500: "internal error (the connection stays usable)", 502: "the backend answered garbage",
          503: "no backend available, or shared state unreachable", 504: "the backend timed out"}
GATEWAY_HEADERS = [
    {"name": "x-session-id", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "an agent session (its calls, tokens and $ are totalled and capped)"},
    {"name": "x-step-kind", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "the agent step's kind, for routing rules"},
    {"name": "x-hybridserve-quality-floor", "in": "header", "required": False,
     "schema": {"type": "string"}, "description": "as `hybridserve_quality_floor` (the body wins)"},
    {"name": "x-hybridserve-task", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "as `hybridserve_task` (the body wins)"},
]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for error statuses, each with OpenAI's error body."""
    return {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}


def answers(model: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a generation endpoint: JSON, or server-sent events with `stream`."""
    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    return {200: {"model": model, "description": "the answer (with `stream`: server-sent events)",
                  "content": sse}, **errors(*statuses)}


def request_body(model: type[BaseModel], **extra: Any) -> dict[str, Any]:
    """`openapi_extra=` documenting a JSON body the handler reads itself; `install` adds the schema."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}, **extra}


# ------------------------------------------------------------------ the document

def install(app: FastAPI, bodies: Sequence[type[BaseModel]], *, bearer: bool = False) -> None:
    """Make `app.openapi()` (served at /openapi.json) FastAPI's document of `app`'s routes plus
    the schemas of `bodies` (named by `request_body`); with `bearer`, every /v1 operation
    needs an API key. FastAPI's 422 answers are dropped: no route here has one."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, bodies, bearer)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def build(app: FastAPI, bodies: Sequence[type[BaseModel]], bearer: bool) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=__version__, routes=app.routes,
                      description=f"{app.description} {STRICT_TYPES}".strip())
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _, defs = models_json_schema([(m, "validation") for m in bodies],
                                 ref_template="#/components/schemas/{model}")
    for name, schema in defs.get("$defs", {}).items():
        if schema.get("additionalProperties") is True:   # unknown fields are kept, within limits
            schema["additionalProperties"] = {"$ref": "#/components/schemas/JsonValue"}
        schemas[name] = bound_integers(schema)
    schemas["JsonValue"] = JSON_VALUE
    for path, item in doc["paths"].items():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
            if bearer and path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if bearer:
        components["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer", "description": "`Authorization: Bearer KEY`, a key "
            "whose sha256 is in gateway.api_key_hashes or $HYBRIDSERVE_API_KEYS"}}
    return doc


_ANY = {"$ref": "#/components/schemas/JsonValue"}
JSON_VALUE = {
    "description": f"any JSON value within the body's limits: integers within int64, finite numbers, "
                   f"nesting at most {P.MAX_DEPTH} deep, strings of at most {P.MAX_STRING_CHARS} "
                   f"characters, arrays and objects of at most {P.MAX_MEMBERS} members",
    "anyOf": [{"type": "null"}, {"type": "boolean"}, {"type": "string"},
              {"type": "integer", "minimum": P.INT64[0], "maximum": P.INT64[1]},
              {"type": "number", "not": {"type": "integer"}},
              {"type": "array", "items": _ANY}, {"type": "object", "additionalProperties": _ANY}]}


def bound_integers(schema: Any) -> Any:
    """Give every integer in a JSON schema int64 bounds where it has none (parse_body refuses
    integers outside int64)."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema.setdefault("minimum", P.INT64[0])
            schema.setdefault("maximum", P.INT64[1])
        for v in schema.values():
            bound_integers(v)
    elif isinstance(schema, list):
        for v in schema:
            bound_integers(v)
    return schema
