"""lmstack: serve, route, compose, evaluate, secure and adapt language models on one engine."""

from lmstack.engine import LLM, SamplingParams
from lmstack.errors import LmstackError

__all__ = ["LLM", "LmstackError", "SamplingParams"]
__version__ = "0.1.0"
