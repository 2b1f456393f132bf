"""Dataset parsing: good items, malformed lines with their numbers, skip vs strict."""
from __future__ import annotations

import json

import pytest

from hybridserve.eval.dataset import DatasetError, load_dataset, parse_lines

GOOD = [
    {"id": "a", "messages": [{"role": "user", "content": "2+2?"}], "number": 4, "tags": ["arith"]},
    {"id": 7, "prompt": "Capital of France:", "answer": "Paris", "max_tokens": 8, "context_tokens": 100},
    {"id": "c", "prompt": "Pick", "choices": ["x", "y"], "answer": "B", "depth": 0.5},
    {"id": "d", "prompt": "judge me", "judge": {"reference": "yes", "model": "big"}},
]
BAD = [
    "{not json",                                                       # bad JSON
    json.dumps({"prompt": "no id", "answer": "x"}),                    # no id
    json.dumps({"id": "e", "prompt": "p"}),                            # no grader
    json.dumps({"id": "f", "prompt": "p", "answer": "x", "regex": "y"}),    # two graders
    json.dumps({"id": "g", "answer": "x"}),                            # neither messages nor prompt
    json.dumps({"id": "h", "prompt": "p", "number": "four"}),          # bad type
    json.dumps({"id": "i", "prompt": "p", "answer": "x", "max_tokens": -1}),
    json.dumps({"id": "a", "prompt": "dup", "answer": "x"}),           # duplicate id
    json.dumps({"id": "j", "messages": [{"role": "user"}], "answer": "x"}),
    json.dumps({"id": "k", "prompt": "p", "regex": "(unclosed"}),
    json.dumps([1, 2]),
]


def lines():
    out = [json.dumps(GOOD[0]), json.dumps(GOOD[1]), ""]
    out += BAD
    out += [json.dumps(GOOD[2]), json.dumps(GOOD[3])]
    return out


def test_good_items_parsed():
    items, problems = parse_lines(lines())
    assert [i.id for i in items] == ["a", "7", "c", "d"]
    a, b, c, d = items
    assert a.chat and a.grader == "number" and a.tags == ["arith"]
    assert not b.chat and b.max_tokens == 8 and b.context_tokens == 100 and b.grader == "answer"
    assert c.grader == "choices" and c.spec == {"choices": ["x", "y"], "answer": "B"} and c.meta == {"depth": 0.5}
    assert d.grader == "judge" and d.reference == "yes"


def test_malformed_lines_reported_with_numbers_and_skipped():
    _, problems = parse_lines(lines())
    assert [p.line for p in problems] == list(range(4, 4 + len(BAD)))
    text = [p.message for p in problems]
    assert "not valid JSON" in text[0] and "id" in text[1] and "no grader" in text[2]
    assert "more than one grader" in text[3] and "messages" in text[4] and "number" in text[5]
    assert "duplicate" in text[7]


def test_strict_refuses(tmp_path):
    with pytest.raises(DatasetError) as err:
        parse_lines(lines(), strict=True)
    assert "line 4" in str(err.value)
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines()))
    with pytest.raises(DatasetError):
        load_dataset(str(p), strict=True)
    name, items, problems = load_dataset(str(p))
    assert name == "d" and len(items) == 4 and len(problems) == len(BAD)


def test_unusable_datasets_refused(tmp_path):
    with pytest.raises(DatasetError):
        load_dataset(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "e.jsonl"
    empty.write_text("{bad\n")
    with pytest.raises(DatasetError):
        load_dataset(str(empty))
    with pytest.raises(DatasetError):
        load_dataset("builtin:nope")
    bin_ = tmp_path / "b.jsonl"
    bin_.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DatasetError):
        load_dataset(str(bin_))


def test_unusable_schema_is_a_malformed_line():
    line = json.dumps({"id": "s", "prompt": "p", "json_schema": {"type": 5}})
    items, problems = parse_lines([line])
    assert not items and "json_schema" in problems[0].message
