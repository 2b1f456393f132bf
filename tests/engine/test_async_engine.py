"""AsyncEngine: concurrent streams, typed errors before the first output, abort on early close."""
import asyncio

import pytest

from hybridserve.config import BackendConfig
from hybridserve.engine import AsyncEngine, SamplingParams
from hybridserve.errors import ContextLengthExceededError, InvalidRequestError
from tests.engine.conftest import hf_greedy


@pytest.fixture
def backend(model_name):
    return BackendConfig(name=model_name, arch="hybrid" if "hybrid" in model_name else "transformer",
                         checkpoint=f"builtin:{model_name}", price_per_hour=1.0, max_context=256)


async def _collect(engine, rid, prompt, params):
    ids, text, last = [], "", None
    async for out in engine.generate(rid, prompt, params):
        ids += out.delta_token_ids
        text += out.delta_text
        last = out
    return ids, text, last


def test_concurrent_streams_match_transformers(backend, model_name):
    async def main():
        engine = AsyncEngine.from_backend(backend)
        await engine.start()
        prompts = [engine.tokenizer.encode(f"request number {i} " * (i + 1)) for i in range(6)]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        results = await asyncio.gather(*[_collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts)])
        await engine.shutdown()
        return prompts, results

    prompts, results = asyncio.run(main())
    for p, (ids, text, last) in zip(prompts, results):
        assert ids == last.token_ids == hf_greedy(model_name, tuple(p), 12)
        assert text == last.text and last.finish_reason == "length"


def test_errors_surface_before_first_output_and_engine_survives(backend):
    async def main():
        engine = AsyncEngine.from_backend(backend)
        await engine.start()
        with pytest.raises(InvalidRequestError):
            await _collect(engine, "a", [], SamplingParams())
        with pytest.raises(ContextLengthExceededError):
            await _collect(engine, "b", [1] * 250, SamplingParams(max_tokens=10))
        ids, _, last = await _collect(engine, "c", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
        await engine.shutdown()
        return ids, last

    ids, last = asyncio.run(main())
    assert len(ids) == 4 and last.finished


def test_closing_the_stream_aborts_and_frees_cache(backend):
    async def main():
        engine = AsyncEngine.from_backend(backend)
        await engine.start()
        stream = engine.generate("long", [5] * 20, SamplingParams(max_tokens=200, ignore_eos=True))
        async for out in stream:
            if len(out.token_ids) >= 3:
                break
        busy = engine.stats()
        await stream.aclose()  # what a client disconnect does
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.stats().num_running == 0:
                break
        idle = engine.stats()
        await engine.shutdown()
        return busy, idle

    busy, idle = asyncio.run(main())
    assert busy.num_running == 1 and busy.kv_cache_usage > 0
    assert idle.num_running == 0 and idle.num_waiting == 0 and idle.kv_cache_usage == 0.0
