"""Engine settings, validated once: a bad value is a clear error before any memory is allocated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmstack.errors import LmstackError


@dataclass
class EngineConfig:
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 8192  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # context window; default: the model's, capped by max_model_len_cap
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit KV pool size (overrides the memory budget)
    kv_cache_memory: float | None = None  # bytes for the KV pool; default 2 GiB on CPU, from the GPU budget
    gpu_memory_utilization: float = 0.90
    policy: str = "fcfs"
    policy_options: dict[str, Any] = field(default_factory=dict)
    attention_backend: str = "auto"  # "triton" on CUDA, "torch" elsewhere
    attention_options: dict[str, Any] = field(default_factory=dict)  # backend settings, e.g. double_sparse's
    enforce_eager: bool = False  # no CUDA graphs
    stream_text: bool = True  # detokenize every step (servers); off: decode once at the end (offline batches)
    seed: int = 0

    max_model_len_cap: int = 32768

    def __post_init__(self) -> None:
        positive = {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                    "block_size": self.block_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise LmstackError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise LmstackError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise LmstackError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise LmstackError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if not isinstance(self.attention_options, dict):
            raise LmstackError(f"attention_options must be a dict, got {type(self.attention_options).__name__}")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise LmstackError(f"gpu_memory_utilization must be in [0.05, 0.99], got {self.gpu_memory_utilization}")
