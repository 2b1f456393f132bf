"""Target specs, backend discovery filter, request bodies and logprob extraction."""
from __future__ import annotations

import pytest

from hybridserve.eval.client import mean_logprob, request_body
from hybridserve.eval.dataset import parse_item
from hybridserve.eval.targets import is_backend_card, parse_target, parse_targets


def test_parse_target_label_model_and_json_params():
    t = parse_target("deep=smollm2-135m+n=5+hybridserve_vote=true+temperature=0.7+note=hi there")
    assert (t.label, t.model) == ("deep", "smollm2-135m")
    assert t.params == {"n": 5, "hybridserve_vote": True, "temperature": 0.7, "note": "hi there"}
    floor = parse_target("floor=auto:economics+hybridserve_quality_floor=0.5")
    assert floor.model == "auto:economics" and floor.params == {"hybridserve_quality_floor": 0.5}
    plain = parse_target("auto:cascade")
    assert (plain.label, plain.model, plain.params) == ("auto:cascade", "auto:cascade", {})
    assert parse_target("m+stop=[\"\\n\"]").params == {"stop": ["\n"]}


@pytest.mark.parametrize("bad", ["", "a=", "m+novalue", "m+=3"])
def test_bad_target_specs(bad):
    with pytest.raises(ValueError):
        parse_target(bad)


def test_duplicate_labels_refused():
    with pytest.raises(ValueError):
        parse_targets(["x=a", "x=b"])


def test_backend_cards_only():
    assert is_backend_card({"id": "small-hybrid", "owned_by": "hybridserve"})
    assert is_backend_card({"id": "some-vllm-model", "owned_by": "vllm"})
    assert not is_backend_card({"id": "auto", "owned_by": "hybridserve-alias", "backends": ["a"]})
    assert not is_backend_card({"id": "standard", "owned_by": "hybridserve-alias"})
    assert not is_backend_card({"id": "auto:economics", "owned_by": "hybridserve"})


def test_request_body_precedence():
    chat, _ = parse_item({"id": 1, "messages": [{"role": "user", "content": "q"}], "answer": "a",
                          "max_tokens": 8, "params": {"top_p": 0.5, "seed": 1}})
    body = request_body(parse_target("m+seed=7"), chat)
    assert body == {"model": "m", "max_tokens": 8, "temperature": 0.0, "messages": chat.messages,
                    "logprobs": True, "top_p": 0.5, "seed": 7}
    comp, _ = parse_item({"id": 2, "prompt": "p", "answer": "a", "temperature": 0.3})
    body = request_body(parse_target("m+temperature=0.9"), comp)
    assert body["prompt"] == "p" and body["logprobs"] == 1 and body["temperature"] == 0.9
    assert request_body(parse_target("m"), comp)["temperature"] == 0.3


def test_mean_logprob_shapes():
    chat = {"logprobs": {"content": [{"logprob": -1.0}, {"logprob": -3.0}, {"logprob": None}]}}
    assert mean_logprob(chat, chat=True) == -2.0
    assert mean_logprob({"logprobs": {"token_logprobs": [None, -0.5, -1.5]}}, chat=False) == -1.0
    assert mean_logprob({"logprobs": None}, chat=True) is None
    assert mean_logprob({"logprobs": {"content": []}}, chat=True) is None
    assert mean_logprob({"logprobs": "junk"}, chat=False) is None


def test_task_tag_placeholder_becomes_each_items_first_tag():
    tagged, _ = parse_item({"id": 1, "prompt": "p", "answer": "a", "tags": ["arith", "easy"]})
    untagged, _ = parse_item({"id": 2, "prompt": "p", "answer": "a"})
    target = parse_target("auto:economics+hybridserve_task=@tag")
    assert request_body(target, tagged)["hybridserve_task"] == "arith"
    assert request_body(target, untagged)["hybridserve_task"] == "all"
    assert request_body(parse_target("m+hybridserve_task=facts"), tagged)["hybridserve_task"] == "facts"
