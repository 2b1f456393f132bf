"""Every grader on right, wrong and malformed answers."""
from __future__ import annotations

import pytest

from hybridserve.eval.dataset import parse_item
from hybridserve.eval.graders import grade, last_number, normalize
from hybridserve.eval.judge import parse_verdict
from hybridserve.eval.schema import extract_json, mini_validate


def item(**grader):
    it, err = parse_item({"id": "x", "prompt": "q", **grader})
    assert err is None, err
    return it


def test_normalize_drops_case_punctuation_and_spacing():
    assert normalize("  Paris,\tFRANCE!! ") == "paris france"


@pytest.mark.parametrize("answer,ok", [("Paris", True), ("paris.", True), ("  PARIS ", True),
                                       ("The capital is Paris.", False), ("Lyon", False), ("", False)])
def test_answer_exact_after_normalising(answer, ok):
    assert grade(item(answer="Paris"), answer).correct is ok


def test_answers_any_of():
    it = item(answers=["New Delhi", "Delhi"])
    assert grade(it, "delhi").correct and grade(it, "New  Delhi!").correct
    assert not grade(it, "Mumbai").correct


@pytest.mark.parametrize("answer,ok", [("The capital of France is Paris.", True), ("PARIS", True),
                                       ("Parisian food", False), ("Lyon", False), ("", False)])
def test_contains_whole_word(answer, ok):
    assert grade(item(contains="Paris"), answer).correct is ok


def test_contains_phrase_and_list():
    it = item(contains=["blue whale", "whale"])
    assert grade(it, "It is the Blue  Whale.").correct
    assert grade(item(contains="blue whale"), "the blue\nwhale").correct
    assert not grade(item(contains="blue whale"), "a blue car and a whale").correct


def test_regex_as_written():
    assert grade(item(regex=r"\b4\d\b"), "It is 42.").correct
    assert not grade(item(regex=r"\b4\d\b"), "It is 142.").correct
    assert not grade(item(regex="(?i)yes"), "no").correct


@pytest.mark.parametrize("text,value", [("1,234", 1234), ("it is -3.", -3), ("2.50", 2.5), ("10 - 3 = 7", 7),
                                        ("costs $1,234,567.5 total", 1234567.5), ("none", None),
                                        ("\u22125", -5)])
def test_last_number(text, value):
    assert last_number(text) == value


def test_number_grader_tolerance_and_malformed():
    assert grade(item(number=1234), "The answer is 1,234.").correct
    assert not grade(item(number=1234), "The answer is 1,235.").correct
    assert grade(item(number=2.5, tolerance=0.1), "about 2.56").correct
    assert not grade(item(number=2.5, tolerance=0.01), "about 2.56").correct
    g = grade(item(number=7), "seven")
    assert not g.correct and "no number" in g.detail


def test_choices_letter_or_text():
    it = item(choices=["Paris", "Paris, Texas", "Lyon"], answer="A")
    assert grade(it, "A").correct and grade(it, "(A) Paris").correct and grade(it, "The answer is A").correct
    assert grade(it, "Paris is the capital.").correct          # only choice A's text, B's also holds "Paris"
    assert not grade(it, "B) Paris, Texas").correct
    assert not grade(it, "Lyon").correct
    assert not grade(it, "no idea").correct
    by_text = item(choices=["red", "green"], answer="green")
    assert grade(by_text, "B").correct and not grade(by_text, "A").correct


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "kind": {"enum": ["cat", "dog"]},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("answer,ok", [
    ('{"name": "Bo", "age": 3}', True),
    ('Sure!\n```json\n{"name": "Bo", "age": 3, "kind": "cat"}\n```', True),
    ('Here: {"name": "Bo {x}", "age": 3} done', True),
    ('{"name": "Bo"}', False),                               # missing required
    ('{"name": "Bo", "age": "3"}', False),                   # wrong type
    ('{"name": "Bo", "age": 3, "kind": "cow"}', False),      # not in enum
    ('{"name": "Bo", "age": 3, "extra": 1}', False),         # additionalProperties
    ('{"name": "Bo", "age": 3, "tags": [1]}', False),        # items
    ('{"name": "Bo", "age": 3', False), ("no json", False), ("", False)])
def test_json_schema(answer, ok):
    assert grade(item(json_schema=SCHEMA), answer).correct is ok


@pytest.mark.parametrize("value,ok", [({"name": "a", "age": 1}, True), ({"name": "a", "age": True}, False),
                                      ({"name": "a", "age": 1, "extra": 0}, False), ({"name": "a"}, False),
                                      ({"name": "a", "age": 1, "tags": ["x", 2]}, False), ([], False)])
def test_mini_validator_agrees(value, ok):
    assert (mini_validate(value, SCHEMA) == []) is ok


def test_extract_json_prefers_fence():
    assert extract_json('x {"a": 1} ```json\n{"b": 2}\n```')[0] == {"b": 2}


def test_no_answer_is_wrong():
    assert not grade(item(answer="x"), None).correct


def test_judge_verdict_parsing_keeps_reason():
    g = parse_verdict("PASS\nIt names the same city.")
    assert g.correct and "same city" in g.detail
    assert not parse_verdict("FAIL: wrong year").correct
    bad = parse_verdict("I think it is fine")
    assert not bad.correct and "no verdict" in bad.detail
