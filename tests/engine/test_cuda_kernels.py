"""On CUDA: the engine with the Triton kernels gives the reference path's greedy tokens.

Runs only where a GPU is present (a lent H200 in some sessions); on CPU it is
skipped with that reason, and the kernels themselves are tested against their
references under the Triton interpreter in tests/kernels.
"""
import pytest
import torch

from hybridserve.engine import EngineConfig, LLMEngine, SamplingParams
from hybridserve.models.builtin import materialize
from hybridserve.models.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-transformer", "tiny-hybrid", "small-hybrid"])
def test_triton_path_matches_reference_greedy(name, monkeypatch):
    from transformers import AutoTokenizer

    path = materialize(name)
    tok = AutoTokenizer.from_pretrained(str(path))
    prompts = [tok.encode(t) for t in ["Hello from the GPU. " * 9, "abc", "x" * 300, "state slots " * 20]]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("ref", "triton"):
        monkeypatch.setenv("HYBRIDSERVE_KERNELS", backend)
        engine = LLMEngine(load_model(path, "float32", "cuda"), tok,
                           EngineConfig(max_context=2048, max_num_batched_tokens=256, cache_memory_gb=0.5,
                                        device="cuda"), name)
        outs[backend] = [o.token_ids for o in engine.generate(prompts, params)]
    for ref, tri in zip(outs["ref"], outs["triton"]):
        same = sum(a == b for a, b in zip(ref, tri))
        print(f"{name}: {same}/{len(ref)} tokens equal")
        assert tri == ref
