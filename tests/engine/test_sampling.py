"""Sampling controls: seeds, stop strings and ids, logprobs, top-k, device-seconds accounting."""
import math

from hybridserve.engine import FinishReason, SamplingParams


def test_seed_reproducible_and_seeds_differ(make_engine, tokenizer):
    engine = make_engine()
    p = tokenizer.encode("sample me")
    a = engine.generate([p], SamplingParams(max_tokens=24, temperature=1.0, seed=7))[0].token_ids
    b = engine.generate([p], SamplingParams(max_tokens=24, temperature=1.0, seed=7))[0].token_ids
    c = engine.generate([p], SamplingParams(max_tokens=24, temperature=1.0, seed=8))[0].token_ids
    assert a == b and a != c


def test_top_k_one_is_greedy(make_engine, tokenizer):
    engine = make_engine()
    p = tokenizer.encode("top k")
    greedy = engine.generate([p], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    topk1 = engine.generate([p], SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3,
                                                ignore_eos=True))[0]
    assert greedy.token_ids == topk1.token_ids


def test_stop_token_id_and_stop_string(make_engine, tokenizer):
    engine = make_engine()
    p = tokenizer.encode("stop here")
    free = engine.generate([p], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    target = free.token_ids[5]
    by_id = engine.generate([p], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                stop_token_ids=[target]))[0]
    assert by_id.finish_reason is FinishReason.STOP
    assert by_id.token_ids == free.token_ids[:free.token_ids.index(target) + 1]
    text = free.text
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable()), None)
    assert stop is not None, f"no usable stop string in {text!r}"
    by_str = engine.generate([p], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                 stop=[stop]))[0]
    assert by_str.finish_reason is FinishReason.STOP
    assert by_str.text == text[:text.find(stop)]


def _stream(engine, request_id, prompt, params):
    engine.add_request(request_id, prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == request_id]
    return outs


def test_streamed_deltas_add_up_and_hold_back_stop_prefix(make_engine, tokenizer):
    engine = make_engine()
    prompt = tokenizer.encode("stream")
    free = _stream(engine, "free", prompt, SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True))
    text = free[-1].text
    ends = {len(o.text) for o in free}  # where the text stood after each step (no stop: nothing held back)
    # a 3-character stop string that first occurs at i and straddles a step: its head is generated a
    # step before the whole of it, so only the hold-back keeps that head from being streamed
    fits = [i for i in range(2, len(text) - 3) if text.find(text[i:i + 3]) == i
            and text[i:i + 3].isprintable() and any(i < b < i + 3 for b in ends)]
    fits.sort(key=lambda i: "\ufffd" in text[i:i + 3])  # rather whole characters than replacement ones
    assert fits, f"no usable stop string in {text!r}"
    i = fits[0]
    stop, cut = text[i:i + 3], text[:i]
    outs = _stream(engine, "stop", prompt, SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True,
                                                          stop=[stop]))
    sent, ids = "", []
    for out in outs:
        sent += out.delta_text
        ids += out.delta_token_ids
        assert out.text == sent
        assert cut.startswith(sent), f"streamed {sent!r} runs past the cut {cut!r} (stop {stop!r})"
    last = outs[-1]
    assert last.finished and last.finish_reason is FinishReason.STOP
    assert sent == last.text == cut and stop not in sent
    assert ids == last.token_ids == free[-1].token_ids[:len(ids)]


def test_logprobs(make_engine, tokenizer):
    engine = make_engine()
    out = engine.generate([tokenizer.encode("lp")], SamplingParams(max_tokens=6, temperature=0.0,
                                                                   logprobs=3, ignore_eos=True))[0]
    engine.add_request("l", tokenizer.encode("lp"), SamplingParams(max_tokens=6, temperature=0.0, logprobs=3,
                                                                   ignore_eos=True))
    records = []
    while engine.has_unfinished():
        for o in engine.step():
            records += o.delta_logprobs
    assert [r.token_id for r in records] == out.token_ids
    for r in records:
        assert len(r.top) == 3 and r.top[0][0] == r.token_id  # greedy picks the top token
        assert math.isclose(r.top[0][1], r.logprob, rel_tol=1e-6) and r.logprob <= 0
        assert r.top[0][1] >= r.top[1][1] >= r.top[2][1]


def test_device_seconds_and_ttft_are_measured(make_engine, tokenizer):
    engine = make_engine()
    outs = engine.generate([tokenizer.encode("a" * 200), tokenizer.encode("b")],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    long_, short = outs[0].metrics, outs[1].metrics
    assert long_.device_seconds > short.device_seconds > 0  # split by tokens processed
    assert long_.ttft_s is not None and long_.ttft_s > 0 and long_.completion_tokens == 8
    assert long_.prompt_tokens == 200 and long_.e2e_s >= long_.ttft_s
