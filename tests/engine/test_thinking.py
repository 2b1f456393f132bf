"""Budget forcing: the engine closes <think> itself when the thinking budget is spent."""
import pytest

from hybridserve.engine import SamplingParams
from hybridserve.errors import InvalidRequestError
from hybridserve.models.tokenizer import THINK_END_ID, THINK_START_ID


def _params(**kw):
    base = dict(max_tokens=40, temperature=0.0, ignore_eos=True, think_start_id=THINK_START_ID,
                think_end_ids=[THINK_END_ID], starts_in_thinking=True)
    return SamplingParams(**{**base, **kw})


def test_budget_forces_end_of_thinking_then_answer_continues(make_engine, tokenizer):
    engine = make_engine()
    prompt = tokenizer.encode("question<think>")
    free = engine.generate([prompt], _params())[0]
    capped = engine.generate([prompt], _params(max_thinking_tokens=5))[0]
    assert capped.token_ids[:5] == free.token_ids[:5]  # same thinking until the cap
    assert capped.token_ids[5] == THINK_END_ID  # then the forced marker, not what the model chose
    assert len(capped.token_ids) == 40 and "</think>" in capped.text
    assert capped.token_ids.count(THINK_END_ID) >= 1


def test_no_budget_means_no_forcing(make_engine, tokenizer):
    engine = make_engine()
    prompt = tokenizer.encode("q<think>")
    plain = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    tracked = engine.generate([prompt], _params(max_tokens=30, max_thinking_tokens=None))[0]
    assert tracked.token_ids == plain.token_ids


def test_budget_without_end_marker_is_refused(make_engine, tokenizer):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match="end-of-thinking"):
        engine.add_request("x", tokenizer.encode("q"), SamplingParams(max_thinking_tokens=3))


def test_partial_character_is_flushed_at_length_finish(tokenizer):
    from hybridserve.engine.outputs import FinishReason
    from hybridserve.engine.sequence import Sequence

    snowman = list("a☃".encode())  # 1 + 3 bytes, one token each
    seq = Sequence("s", [1], SamplingParams(max_tokens=3, ignore_eos=True), tokenizer, eos_ids=())
    streamed = ""
    for t in snowman[:3]:  # stops one byte short of the snowman
        seq.append_token(t, None, 0.0)
        streamed += seq.take_output().delta_text
    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.text == "a\ufffd" and streamed == seq.text  # the held-back bytes are not lost
