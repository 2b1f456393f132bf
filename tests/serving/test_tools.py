"""Tool calling through the gateway to native workers, with the real `openai` client.

One `hybridserve up` (gateway + tiny-transformer + tiny-hybrid) serves the module. The tiny
models have random weights, so what they call is the grammar's doing: forced calls must name
the chosen function with arguments that validate against its schema, and with `auto` a
greedy answer that never starts `<tool_call>` is exactly the unguided answer. Bad shapes are
400s at the gateway that never reach a worker.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from hybridserve import protocol as P
from hybridserve.models.tokenizer import build_tokenizer
from hybridserve.worker.serving import Renderer
from tests.serving.conftest import TINY, openai_client_of, tiny_stack
from tests.serving.test_stack import scrape

pytestmark = pytest.mark.timeout(180)

WEATHER_PARAMS = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                  "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
NOTE_PARAMS = {"type": "object", "additionalProperties": False, "required": ["text"],
               "properties": {"text": {"type": "string", "maxLength": 8}, "urgent": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "take_note", "parameters": NOTE_PARAMS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "take_note": NOTE_PARAMS}
MESSAGES = [{"role": "system", "content": "You are a helpful agent."},
            {"role": "user", "content": "What will the weather be in Paris for three days?"}]
ASK = dict(messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=160, seed=7)
CONTEXT = 2048   # the byte tokenizer spends a token per byte of the tools' JSON


@pytest.fixture(scope="module")
def engine_stack(tmp_path_factory):
    yield from tiny_stack(tmp_path_factory.mktemp("tools"), max_context=CONTEXT)


@pytest.fixture(scope="module")
def openai_client(engine_stack):
    yield from openai_client_of(engine_stack)


def check_call(choice, name: str | None = None):
    """The choice made exactly one call (to `name` if given) whose arguments fit its schema."""
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return call


@pytest.mark.parametrize("model", list(TINY))
def test_named_tool_choice_forces_a_valid_call(openai_client, model):
    out = openai_client.chat.completions.create(
        model=model, **ASK, tool_choice={"type": "function", "function": {"name": "take_note"}})
    check_call(out.choices[0], "take_note")
    assert out.choices[0].message.content is None


def test_logprobs_of_a_forced_call_are_finite(openai_client):
    """The grammar leaves most tokens -inf; top_logprobs must still be JSON (vLLM's -9999.0)."""
    out = openai_client.chat.completions.create(
        model=list(TINY)[0], **ASK, logprobs=True, top_logprobs=3,
        tool_choice={"type": "function", "function": {"name": "take_note"}})
    check_call(out.choices[0], "take_note")
    entries = out.choices[0].logprobs.content
    assert entries and all(-9999.0 <= t.logprob <= 0 for e in entries for t in [e, *e.top_logprobs])
    assert any(t.logprob == -9999.0 for e in entries for t in e.top_logprobs), "forced tokens leave no rival"


@pytest.mark.parametrize("model", list(TINY))
def test_required_tool_choice_calls_one_of_the_tools(openai_client, model):
    out = openai_client.chat.completions.create(model=model, **ASK, tool_choice="required")
    assert check_call(out.choices[0]).function.name in SCHEMAS


@pytest.mark.parametrize("model", list(TINY))
def test_auto_answering_in_text_makes_no_call(openai_client, model):
    auto = openai_client.chat.completions.create(model=model, **ASK, max_completion_tokens=24)
    unguided = openai_client.chat.completions.create(model=model, **ASK, max_completion_tokens=24,
                                                     tool_choice="none")
    text = unguided.choices[0].message.content
    assert "<tool_call>" not in text   # so the grammar never engaged: auto must write the same
    assert auto.choices[0].message.tool_calls is None
    assert auto.choices[0].message.content == text
    assert auto.choices[0].finish_reason == unguided.choices[0].finish_reason == "length"


def test_a_call_and_its_result_round_trip_into_the_next_turn(openai_client):
    first = openai_client.chat.completions.create(
        model="tiny-transformer", **ASK, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = check_call(first.choices[0], "get_weather")
    history = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    second = openai_client.chat.completions.create(
        model="tiny-transformer", messages=history, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    assert second.choices[0].finish_reason == "length" and second.choices[0].message.content
    # the worker's prompt is what the documented format renders: the byte tokenizer counts it exactly
    req = P.validate_request(P.ChatCompletionRequest, {"model": "m", "messages": history, "tools": TOOLS})
    rendered = Renderer(build_tokenizer(), 4096).render_chat(req.messages, req.tools)
    assert (f'<|start_of_role|>assistant<|end_of_role|><tool_call>{{"name": "get_weather", "arguments": '
            f'{call.function.arguments}}}</tool_call><|end_of_text|>') in rendered
    assert "<|start_of_role|>tool<|end_of_role|><tool_response>Sunny, 21 C</tool_response>" in rendered
    assert second.usage.prompt_tokens == len(Renderer(build_tokenizer(), 4096).encode_chat(req.messages, req.tools))


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_streamed_call_deltas_reassemble_into_the_unary_call(openai_client, choice):
    kw = dict(model="tiny-hybrid", **ASK, tool_choice=choice)
    unary = check_call(openai_client.chat.completions.create(**kw).choices[0])
    chunks = list(openai_client.chat.completions.create(**kw, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    head, rest = deltas[0], deltas[1:]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == unary.function.name
    assert rest and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments or "" for d in deltas) == unary.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}]},
     "tools"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "send_email"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "orphan result"}]}, "messages"),
]


def test_bad_shapes_are_400s_at_the_gateway_and_reach_no_worker(engine_stack):
    before = scrape(engine_stack.url)
    for fields, param in BAD:
        body = {"model": "tiny-transformer", "messages": MESSAGES, "max_tokens": 4, **fields}
        r = httpx.post(engine_stack.base_url + "/chat/completions", json=body, headers=engine_stack.headers(),
                       timeout=30, trust_env=False)
        assert r.status_code == 400, (fields, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, (fields, err)
    after = scrape(engine_stack.url)
    upstream = "hybridserve_gateway_upstream_latency_seconds_count"
    assert after.get(upstream, 0) == before.get(upstream, 0)
    assert after["hybridserve_gateway_requests_total"] - before.get("hybridserve_gateway_requests_total", 0) \
        == len(BAD)


def test_tools_count_toward_the_gateways_prompt_bound(engine_stack):
    huge = {"type": "function", "function": {"name": "f", "description": "word " * 20000}}
    r = httpx.post(engine_stack.base_url + "/chat/completions", headers=engine_stack.headers(), timeout=30,
                   json={"model": "tiny-transformer", "messages": MESSAGES, "tools": [huge], "max_tokens": 4},
                   trust_env=False)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
