"""The native inference engine: continuous batching over a paged KV cache and Mamba state slots."""
from hybridserve.engine.async_engine import AsyncEngine
from hybridserve.engine.engine import EngineConfig, EngineStats, LLMEngine
from hybridserve.engine.guided import GuidedSpec
from hybridserve.engine.outputs import FinishReason, RequestMetrics, RequestOutput, TokenLogprob
from hybridserve.engine.params import SamplingParams

__all__ = ["AsyncEngine", "EngineConfig", "EngineStats", "FinishReason", "GuidedSpec", "LLMEngine",
           "RequestMetrics", "RequestOutput", "SamplingParams", "TokenLogprob"]
