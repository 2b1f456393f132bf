"""vLLM backends behind the gateway with tools and structured outputs, guided by vLLM itself.

One `hybridserve up` serves the module: the tiny transformer on vLLM's CPU build, with the
`vllm:` options this needs (`tool_call_parser`, `structured_outputs_backend`,
`structured_outputs_compact`). What vLLM 0.32's CPU build does, found by hand first:

* `response_format: json_schema` is guided with the default backend, but the grammar lets
  free whitespace in between tokens, and a model of random weights picks it over and over:
  the answer runs into max_tokens. `structured_outputs_compact` (vLLM's
  `disable_any_whitespace`, which it accepts with xgrammar or guidance only) closes it, and
  bounded strings, arrays and integers make every answer short;
* any `tool_choice` but 'none' (named included) is refused unless a tool-call parser is set;
  with one, vLLM guides a named call through the parser's structural tag (`<tool_call>` for
  hermes), whose arguments are free JSON unless the function is `strict`, and whose
  whitespace is free whatever the whitespace option says. With
  `VLLM_ENFORCE_STRICT_TOOL_CALLING=0` in `vllm.env` vLLM guides a named call by the
  function's parameter schema instead, compact, and returns it as a `tool_calls` entry.
"""
from __future__ import annotations

import json

import jsonschema
import pytest
from openai import OpenAI

import tests.serving.conftest as serving
from tests.serving.conftest import free_port, log_tail, start_stack, stop_process
from tests.vllm.conftest import needs_vllm, vllm_options

pytestmark = [pytest.mark.vllm, needs_vllm, pytest.mark.timeout(600)]

NAME = "vllm-tools"
MAX_TOKENS = 64
SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
               "properties": {"name": {"type": "string", "maxLength": 8},
                              "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    "choice": {"type": "object", "additionalProperties": False, "required": ["color", "ok"],
               "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}}},
    "tags": {"type": "object", "additionalProperties": False, "required": ["tags"],
             "properties": {"tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                     "items": {"type": "string", "maxLength": 4}}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["point"],
               "properties": {"point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                        "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                       "y": {"type": "integer", "minimum": -9, "maximum": 9}}}}},
}
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "evaluate arithmetic",
                                           "parameters": {"type": "object", "additionalProperties": False,
                                                          "required": ["expression"],
                                                          "properties": {"expression": {"type": "string",
                                                                                        "maxLength": 16}}}}},
         {"type": "function", "function": {"name": "lookup", "description": "look a fact up",
                                           "parameters": {"type": "object", "additionalProperties": False,
                                                          "required": ["key", "limit"],
                                                          "properties": {"key": {"enum": ["a", "b"]},
                                                                         "limit": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 5}}}}}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-tools")
    opts = vllm_options(tool_call_parser="hermes", structured_outputs_backend="xgrammar",
                        structured_outputs_compact=True,
                        env={"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"})
    backend = {"name": NAME, "arch": "transformer", "engine": "vllm", "checkpoint": "builtin:tiny-transformer",
               "dtype": "float32", "max_context": 1024, "price_per_hour": 0.5, "port": free_port(), "vllm": opts}
    old = serving.STARTUP_TIMEOUT_S
    serving.STARTUP_TIMEOUT_S = 300.0
    try:
        s = start_stack(tmp, [backend])
    finally:
        serving.STARTUP_TIMEOUT_S = old
    c = OpenAI(base_url=s.base_url, api_key=s.key, timeout=120, max_retries=0)
    yield c
    c.close()
    stop_process(s.proc)
    assert s.proc.returncode == 0, log_tail(s.log)


def chat(client, **kw):
    return client.chat.completions.create(model=NAME, max_tokens=MAX_TOKENS, temperature=0,
                                          messages=[{"role": "user", "content": "Answer in JSON."}], **kw)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_parse_and_validate(client, name):
    r = chat(client, response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
    assert r.usage.completion_tokens < MAX_TOKENS


@pytest.mark.parametrize("tool", [t["function"] for t in TOOLS], ids=lambda f: f["name"])
def test_a_named_tool_choice_is_a_valid_call_of_that_function(client, tool):
    r = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": tool["name"]}})
    calls = r.choices[0].message.tool_calls
    assert calls and len(calls) == 1, r.choices[0].message
    assert calls[0].type == "function" and calls[0].function.name == tool["name"] and calls[0].id
    jsonschema.validate(json.loads(calls[0].function.arguments), tool["parameters"])
