"""Engine settings, validated once: a bad value is a clear error before any memory is allocated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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
    # Prefill and mixed steps of up to this many tokens replay CUDA graphs (engine/token_graphs.py); 0: eager.
    token_graph_tokens: int = 2048
    max_lazy_graphs: int = 64  # graphs a lazily capturing backend keeps (least recently replayed dropped first)
    stream_text: bool = True  # detokenize every step (servers); off: decode once at the end (offline batches)
    # After start-up, keep what is alive (weights, tokenizer tables, compiled kernels) out of the cyclic garbage
    # collector's walks (gc.freeze): a full collection over all of it pauses a step for 0.1-0.2 s.
    freeze_gc: bool = True
    seed: int = 0
    # Speculative decoding (engine/spec/): a proposer name from PROPOSERS ("draft", "ngram") or None (off).
    speculative: str | None = None
    spec_model: str | None = None  # draft: the smaller model (same tokenizer)
    spec_k: int | str = "smart"  # tokens proposed per step: "smart" (SmartSpec, 0..spec_max_k) or a fixed k
    spec_max_k: int = 5  # K, the longest proposal SmartSpec considers
    spec_profile: str | None = None  # SmartSpec warm start: a latency/acceptance profile JSON from an earlier run
    spec_ngram_min_n: int = 1  # ngram: shortest suffix that counts as a match
    spec_ngram_max_n: int = 4  # ngram: longest suffix tried first

    max_model_len_cap: int = 32768

    def __post_init__(self) -> None:
        positive = {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                    "block_size": self.block_size, "max_lazy_graphs": self.max_lazy_graphs}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise LmstackError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise LmstackError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise LmstackError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise LmstackError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if not isinstance(self.token_graph_tokens, int) or self.token_graph_tokens < 0:
            raise LmstackError(f"token_graph_tokens must be an integer >= 0 (0: prefill steps run eagerly), got "
                               f"{self.token_graph_tokens!r}")
        if not isinstance(self.attention_options, dict):
            raise LmstackError(f"attention_options must be a dict, got {type(self.attention_options).__name__}")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise LmstackError(f"gpu_memory_utilization must be in [0.05, 0.99], got {self.gpu_memory_utilization}")
        self._check_speculative()

    def _check_speculative(self) -> None:
        from lmstack.engine.spec.proposers import PROPOSERS  # here: the proposers import the runner, which imports us

        if self.speculative is None:
            if self.spec_model is not None or self.spec_profile is not None:
                raise LmstackError("spec_model/spec_profile need speculative decoding on: set speculative='draft'")
            return
        if self.speculative not in PROPOSERS:
            raise LmstackError(f"unknown speculative proposer {self.speculative!r}; choose from {', '.join(PROPOSERS)}")
        if isinstance(self.spec_k, str) and self.spec_k.strip().isdigit():
            self.spec_k = int(self.spec_k)
        if self.spec_k != "smart" and not (isinstance(self.spec_k, int) and self.spec_k >= 0):
            raise LmstackError(f"spec_k must be 'smart' or an integer >= 0, got {self.spec_k!r}")
        if not isinstance(self.spec_max_k, int) or self.spec_max_k < 1:
            raise LmstackError(f"spec_max_k must be a positive integer, got {self.spec_max_k!r}")
        if not 1 <= self.spec_ngram_min_n <= self.spec_ngram_max_n:
            raise LmstackError(f"need 1 <= spec_ngram_min_n <= spec_ngram_max_n, got {self.spec_ngram_min_n} and "
                               f"{self.spec_ngram_max_n}")
        if self.speculative != "draft" and self.spec_model is not None:
            raise LmstackError(f"spec_model is for the draft proposer, not {self.speculative!r}")
        if self.spec_profile is not None and not Path(self.spec_profile).is_file():
            raise LmstackError(f"spec_profile {self.spec_profile} does not exist")
