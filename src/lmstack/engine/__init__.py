"""Continuous-batching engine over a paged KV cache."""

from lmstack.engine.async_engine import AsyncEngine
from lmstack.engine.config import EngineConfig
from lmstack.engine.llm import LLM
from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.outputs import CompletionOutput, RequestOutput
from lmstack.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
