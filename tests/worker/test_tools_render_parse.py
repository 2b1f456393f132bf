"""Tool calling without a model: request shapes, prompt rendering, grammars and call parsing.

The parser is checked against itself (any split of a stream gives the one-piece answer) and
against the grammar it reads: text the worker's structural tags accept parses into the calls,
and the tagged form the prompt teaches is what the grammar generates.
"""
import json
import random
import re

import pytest

from hybridserve import protocol as P
from hybridserve.engine.guided import Guide
from hybridserve.errors import InvalidRequestError
from hybridserve.gateway.admission import prompt_bounds, prompt_bytes
from hybridserve.models.tokenizer import EOS_ID, VOCAB_USED, build_tokenizer
from hybridserve.worker import tools as T
from hybridserve.worker.serving import Renderer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
NOARGS = {"type": "function", "function": {"name": "now"}}
NAMES = ["get_weather", "now"]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa}ris \\"{x", "n": [1, {"a": 2}]}}</tool_call>'
OUTPUTS = [
    "just text, no call",
    "Sure.\n" + CALL + '\n<tool_call>{"name": "now", "arguments": {}}</tool_call>',
    'Half a tag <tool_cal and a bracket < here',
    '<tool_call>{"name": "nope", "arguments": {}}</tool_call> unknown tool',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "P"}</tool_call> envelope not closed',
    '<tool_call>{"name":"get_weather","arguments":{"city":"P"}}</tool_call>after',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "P"}}',   # a stop string took the end tag
]


def chat(**fields) -> P.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return P.validate_request(P.ChatCompletionRequest, body)


def parse_whole(text: str) -> T.ToolCallParser:
    p = T.ToolCallParser(NAMES)
    p.feed(text)
    p.finish()
    return p


def parse_split(text: str, rng: random.Random) -> tuple[T.ToolCallParser, list[T.Event]]:
    p, events, i = T.ToolCallParser(NAMES), [], 0
    while i < len(text):
        k = rng.randint(1, 5)
        events += p.feed(text[i:i + k])
        i += k
    return p, events + p.finish()


def calls_of(message) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message[1]]


# ------------------------------------------------------------------ parsing

def test_calls_are_parsed_with_openai_ids_and_the_text_around_them_is_content():
    content, calls = parse_whole(OUTPUTS[1]).message()
    assert content == "Sure.\n\n"
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": 'Pa}ris "{x', "n": [1, {"a": 2}]}
    assert calls[1]["function"]["arguments"] == "{}"
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_only_whitespace_beside_calls_is_null_content():
    content, calls = parse_whole(CALL + "\n").message()
    assert content is None and len(calls) == 1


@pytest.mark.parametrize("text", OUTPUTS[2:5])
def test_text_that_is_not_a_call_stays_content(text):
    content, calls = parse_whole(text).message()
    assert calls == [] and content == text


def test_a_call_whose_end_tag_a_stop_string_removed_still_counts():
    content, calls = parse_whole(OUTPUTS[6]).message()
    assert content is None and calls_of((content, calls)) == [("get_weather", '{"city": "P"}')]


@pytest.mark.parametrize("text", OUTPUTS)
def test_any_split_of_the_stream_gives_the_one_piece_answer(text):
    whole = parse_whole(text).message()
    rng = random.Random(text)
    for _ in range(40):
        parser, events = parse_split(text, rng)
        assert parser.message()[0] == whole[0]
        assert calls_of(parser.message()) == calls_of(whole)
        streamed = {}
        for e in events:
            if e.call is not None:
                streamed[e.call.index] = streamed.get(e.call.index, "") + e.text
        started = [s for s in parser.segments if isinstance(s, T.ParsedCall)]
        if all(c.complete for c in started):   # a call broken after its header streamed as a call
            assert [streamed[c.index] for c in started] == [a for _, a in calls_of(whole)]


def test_text_that_may_begin_a_call_is_held_back_until_it_cannot():
    p = T.ToolCallParser(NAMES)
    assert [e.text for e in p.feed("Hi <tool")] == ["Hi "]
    assert [e.text for e in p.feed("box")] == ["<toolbox"]
    assert p.feed("<") == []
    assert [e.text for e in p.finish()] == ["<"]


def test_stream_deltas_follow_openai_first_delta_then_argument_fragments():
    p = T.ToolCallParser(NAMES)
    first = T.stream_deltas(p.feed('ok <tool_call>{"name": "get_weather", "arguments": {"ci'))
    later = T.stream_deltas(p.feed('ty": "P"}}</tool_call>') + p.finish())
    assert first[0] == {"content": "ok "}
    head = first[1]["tool_calls"][0]
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert later == [{"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "P"}'}}]}]
    assert p.calls[0].arguments == '{"city": "P"}'


def test_match_header_says_more_or_never():
    assert T.match_header('{"name": "f", "arguments": {') == ("f", 26)
    assert T.match_header('{"na') is None and T.match_header('{"name": "get_wea') is None
    assert T.match_header('{"nam": ') is False and T.match_header("hello") is False
    assert T.match_header('{"name": "' + "x" * 65) is False


# ------------------------------------------------------------------ prompts

def test_fallback_prompt_lists_tools_and_renders_calls_and_results():
    tok = build_tokenizer()
    req = chat(tools=[WEATHER], messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}])
    r = Renderer(tok, 2048)
    assert not r.template_reads_tools
    text = r.render_chat(req.messages, req.tools)
    system = text.split("<|end_of_text|>")[0]
    assert system.startswith("<|start_of_role|>system<|end_of_role|>Be brief.\n\n")
    assert json.dumps(WEATHER) in system and "<tool_call>" in system
    assert text.count("<|start_of_role|>system") == 1
    assert ('<|start_of_role|>assistant<|end_of_role|><tool_call>{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}</tool_call><|end_of_text|>') in text
    assert "<|start_of_role|>tool<|end_of_role|><tool_response>18 C</tool_response>" in text


def test_fallback_adds_a_system_message_when_there_is_none():
    msgs, extra = T.chat_messages(chat(tools=[NOARGS]).messages, chat(tools=[NOARGS]).tools, native=False)
    assert extra == {} and [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"].startswith("You may call functions")
    assert '"name": "now"' in msgs[0]["content"]


def test_a_template_that_reads_tools_gets_them_and_calls_as_data():
    tok = build_tokenizer()
    tok.chat_template = (
        "{% if tools %}TOOLS {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n"
        "{% endif %}{% for m in messages %}[{{ m.role }}]"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{{ m.content }}{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %};{% endfor %}")
    req = chat(tools=[WEATHER, NOARGS], messages=[
        {"role": "assistant", "tool_calls": [{"id": "c9", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c9", "content": "cold"}])
    r = Renderer(tok, 2048)
    assert r.template_reads_tools
    assert r.render_chat(req.messages, req.tools) == (
        "TOOLS get_weather,now\n[assistant]CALL get_weather Oslo;[tool]cold for c9;")


# ------------------------------------------------------------------ grammars

@pytest.fixture(scope="module")
def guide():
    return Guide(build_tokenizer(), VOCAB_USED, (EOS_ID,))


def accepts(guide, spec, text: str) -> bool:
    """Whether the spec's grammar takes `text` and then may end."""
    matcher = guide.matcher(spec)
    ids = build_tokenizer()(text, add_special_tokens=False).input_ids
    return all(matcher.accept_token(i) for i in ids) and matcher.accept_token(EOS_ID)


def test_named_choice_forces_one_tagged_call_the_parser_reads(guide):
    plan = T.plan_tools(chat(tools=[WEATHER, NOARGS], tool_choice={"type": "function",
                                                                    "function": {"name": "get_weather"}}))
    good = T.call_text("get_weather", '{"city": "Rome", "days": 2}')
    assert plan.tool_names == frozenset(NAMES) and plan.stop == ()
    assert accepts(guide, plan.guided, good)
    assert calls_of(parse_whole(good).message()) == [("get_weather", '{"city": "Rome", "days": 2}')]
    assert not accepts(guide, plan.guided, T.call_text("now", "{}"))
    assert not accepts(guide, plan.guided, T.call_text("get_weather", '{"days": 2}'))   # city is required
    assert not accepts(guide, plan.guided, "hello " + good)


def test_required_takes_any_tool_but_only_one_call(guide):
    spec = T.plan_tools(chat(tools=[WEATHER, NOARGS], tool_choice="required")).guided
    assert accepts(guide, spec, T.call_text("now", "{}"))
    assert accepts(guide, spec, T.call_text("get_weather", '{"city": "x"}'))
    assert not accepts(guide, spec, T.call_text("now", "{}") * 2)
    assert not accepts(guide, spec, "plain text")


def test_auto_allows_text_and_calls_and_parallel_false_stops_after_one(guide):
    plan = T.plan_tools(chat(tools=[WEATHER]))
    assert accepts(guide, plan.guided, "plain text")
    assert accepts(guide, plan.guided, "a " + T.call_text("get_weather", '{"city": "x"}') + " b")
    assert not accepts(guide, plan.guided, T.call_text("get_weather", '{"town": "x"}'))
    assert plan.stop == ()
    assert T.plan_tools(chat(tools=[WEATHER], parallel_tool_calls=False)).stop == (T.CALL_END,)


def test_auto_with_a_json_format_is_one_call_or_the_json_answer(guide):
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}
    spec = T.plan_tools(chat(tools=[WEATHER], response_format=fmt)).guided
    assert accepts(guide, spec, '{"n": 3}') and accepts(guide, spec, T.call_text("get_weather", '{"city": "x"}'))
    assert not accepts(guide, spec, "plain text")


def test_none_and_no_tools_parse_nothing_and_response_format_alone_is_json():
    assert T.plan_tools(chat(tools=[WEATHER], tool_choice="none")) == T.ToolPlan()
    assert T.plan_tools(chat()) == T.ToolPlan()
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    plan = T.plan_tools(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    assert plan.tool_names is None and plan.guided.kind == "json_schema"
    assert json.loads(plan.guided.value) == schema
    assert T.plan_tools(chat(response_format={"type": "json_object"})).guided.kind == "json_object"
    assert T.plan_tools(chat(response_format={"type": "text"})).guided is None


def test_parameters_without_a_type_are_an_object():
    fn = P.FunctionDefinition(name="f", parameters={"properties": {"a": {"type": "string"}}})
    assert T.arguments_schema(fn) == {"properties": {"a": {"type": "string"}}, "type": "object"}
    assert T.arguments_schema(P.FunctionDefinition(name="g")) == {"type": "object"}


# ------------------------------------------------------------------ request shapes

BAD = [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools", "function 'f': parameters must describe a JSON object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}]}, "tools", "not a valid JSON Schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", "parameters"),
    ({"tools": [NOARGS, NOARGS]}, "tools", "two tools are named 'now'"),
    ({"tools": [NOARGS] * 129}, "tools", "at most 128"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools.0.type"),
    ({"tools": [NOARGS], "tool_choice": "always"}, "tool_choice", '"none", "auto", "required"'),
    ({"tools": [NOARGS], "tool_choice": {"type": "function", "function": {"name": "later"}}},
     "tool_choice", "'later', which is not among"),
    ({"tool_choice": "auto"}, "tool_choice", "no `tools`"),
    ({"functions": [{"name": "f"}]}, "functions", "use `tools`"),
    ({"function_call": "auto"}, "function_call", "use `tool_choice`"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"response_format": {"type": "xml"}}, "response_format", "'text', 'json_object' or 'json_schema'"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a `json_schema`"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}, "response_format", "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"minimum": "0"}}}},
     "response_format", "json_schema 'a': schema is not a valid JSON Schema"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages", "needs `tool_call_id`"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages", "only assistant messages"),
]


@pytest.mark.parametrize("fields,param,words", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_shapes_are_400s_naming_the_field(fields, param, words):
    with pytest.raises(InvalidRequestError) as err:
        chat(**fields)
    assert err.value.status_code == 400 and err.value.param == param
    assert words in err.value.message


def test_good_shapes_pass():
    req = chat(tools=[WEATHER, NOARGS], tool_choice={"type": "function", "function": {"name": "now"}},
               parallel_tool_calls=False, response_format={"type": "json_schema", "json_schema": {
                   "name": "out", "schema": {"type": "object"}, "strict": True}},
               messages=[{"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c", "content": "12:00", "name": "now"}])
    assert req.tool_choice.function.name == "now" and req.response_format.json_schema.schema_ == {"type": "object"}
    assert req.messages[1].name == "now"


def test_prompt_bounds_count_tools_and_call_arguments():
    plain = chat()
    lower0, upper0 = prompt_bounds(plain, chat=True)
    big = {"type": "function", "function": {"name": "f", "description": "d" * 6400}}
    lower1, upper1 = prompt_bounds(chat(tools=[big]), chat=True)
    assert lower1 >= lower0 + 6400 // 32 and upper1 >= upper0 + 6400
    args = json.dumps({"text": "a" * 3200})
    with_call = chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}]}])
    lower2, upper2 = prompt_bounds(with_call, chat=True)
    assert lower2 >= lower0 + 3200 // 32 and upper2 >= upper0 + 3200


def test_the_routing_estimate_counts_tools_as_the_bound_does():
    """The router's prompt size (`prompt_bytes`) and the bound read the same chat text."""
    big = {"type": "function", "function": {"name": "f", "description": "d" * 6400}}
    plain, with_tools = chat(), chat(tools=[big])
    assert prompt_bytes(with_tools, chat=True) >= prompt_bytes(plain, chat=True) + 6400
    assert prompt_bytes(with_tools, chat=True) == with_tools.prompt_text_bytes()
    assert prompt_bounds(with_tools, chat=True) == prompt_bounds(with_tools, True, prompt_bytes(with_tools, True))
