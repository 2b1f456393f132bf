"""Built-in suites: deterministic, self-consistent, sized as asked."""
from __future__ import annotations

import json

import pytest

from hybridserve.eval.dataset import parse_item
from hybridserve.eval.graders import grade
from hybridserve.eval.suites import SUITES, build_suite, estimate_tokens


@pytest.mark.parametrize("name", SUITES)
def test_deterministic_and_own_reference_passes(name):
    a, b = build_suite(name), build_suite(name)
    assert [x.to_json() for x in a] == [x.to_json() for x in b]
    assert len({x.id for x in a}) == len(a)
    for it in a:
        assert it.reference is not None and grade(it, it.reference).correct, it.id
        assert it.tags == [name] and it.max_tokens


@pytest.mark.parametrize("name", SUITES)
def test_items_survive_the_jsonl_round_trip(name):
    for it in build_suite(name):
        again, err = parse_item(json.loads(json.dumps(it.to_json())))
        assert err is None and again.grader == it.grader and again.spec == it.spec


def test_sizes_and_defaults():
    facts = build_suite("facts")
    assert len(facts) >= 100
    assert len({x.question for x in facts}) == len(facts)
    assert all(x.max_tokens == 24 and x.messages[0]["role"] == "system" for x in facts)
    assert len(build_suite("arith")) == 60 and len(build_suite("format")) == 20
    assert len(build_suite("all")) == sum(len(build_suite(s)) for s in SUITES)


def test_facts_accept_sentences_and_reject_wrong():
    facts = {x.question: x for x in build_suite("facts")}
    q = facts["What is the capital of France?"]
    assert grade(q, "The capital of France is Paris.").correct
    assert not grade(q, "The capital of France is Lyon.").correct


def test_arith_integer_results_all_ops():
    items = build_suite("arith")
    assert {x.meta["op"] for x in items} == {"+", "-", "*", "/"}
    for x in items:
        a, b = [int(w) for w in x.question.replace("?", "").split() if w.isdigit()][:2]
        op = x.meta["op"]
        expect = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        assert float(x.spec["number"]) == expect and float(expect).is_integer()
        assert a < 1000 and b < 1000


def test_format_wrong_json_fails():
    it = build_suite("format")[0]
    assert not grade(it, '{"unrelated": 1}').correct


@pytest.mark.parametrize("max_context", [1024, 4096])
def test_passkey_contexts_and_depths(max_context):
    items = build_suite("passkey", max_context=max_context)
    contexts = sorted({x.context_tokens for x in items})
    assert contexts == [c for c in (512, 1024, 2048, 4096) if c <= max_context]
    assert {x.meta["depth"] for x in items} == {0.1, 0.5, 0.9}
    for x in items:
        text = x.messages[-1]["content"]
        est, chars = estimate_tokens(text), len(text) / 4
        assert 0.8 * x.context_tokens <= est <= x.context_tokens, (x.id, est)
        assert 0.75 * x.context_tokens <= chars <= x.context_tokens
        key = x.spec["contains"]
        assert text.count(key) == 2 and len(key) == 5
        pos = text.index(key) / len(text)
        assert abs(pos - x.meta["depth"]) < 0.1, (x.id, pos)
        assert not grade(x, "The pass key is 00000.").correct
