"""Where a decode step's time goes at a given batch: scheduling, the forward (attention inside it), sampling,
and the Python bookkeeping after it, so the gap to the hardware is visible.

The forward is timed with a device sync after it (the normal loop only syncs when it reads the sampled ids);
attention is timed on one eager pass with device events around each layer's attention call, since a
captured graph cannot be split.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.sampling_params import SamplingParams
from lmstack.errors import LmstackError

_PHASES = ("schedule_s", "forward_s", "sample_s", "postprocess_s")


def _run(engine: LLMEngine, steps: int) -> tuple[dict[str, float], float]:
    before = {k: engine.stats[k] for k in _PHASES}
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    return {k: (engine.stats[k] - before[k]) / steps for k in _PHASES}, wall / steps


def measure_step_split(
    engine: LLMEngine, batch: int, prompt_len: int, steps: int = 20, seed: int = 0
) -> dict[str, Any]:
    """Per-step milliseconds for `batch` sequences decoding at context ≈ prompt_len; leaves the engine empty."""
    if engine.has_unfinished:
        raise RuntimeError("measure_step_split needs an idle engine")
    need = batch * -(-engine.max_model_len // engine.config.block_size)
    if need > engine.blocks.num_blocks - 1:
        # Short of room the scheduler preempts the last prompts over and over while the first ones decode to
        # the end of the window: the batch never decodes together.
        raise LmstackError(
            f"{batch} sequences of up to {engine.max_model_len} tokens need {need} KV blocks but the cache has "
            f"{engine.blocks.num_blocks - 1}: lower the batch or the context, or give the cache more memory "
            "(EngineConfig.kv_cache_memory / gpu_memory_utilization)")
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    # All the room the context window leaves: with chunked prefill the first sequences decode while the
    # last prompts are still being read, and none may finish before the timed steps are over.
    params = SamplingParams(max_tokens=engine.max_model_len - prompt_len, ignore_eos=True, temperature=0.0)
    ids = [engine.add_request(torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), params,
                              request_id=f"split-{i}") for i in range(batch)]
    runner = engine.runner
    graphs = runner.use_graphs
    try:
        while any(engine.requests[r].num_output_tokens == 0 for r in ids):
            engine.step()  # prefill every sequence first: what follows are pure decode steps
        engine.step()  # one untimed decode step: a backend that captures graphs lazily captures here
        runner.sync_timing = True
        split, wall = _run(engine, steps)
        runner.use_graphs = False
        runner.backend.timed = []
        eager_split, eager_wall = _run(engine, steps // 2)
        attention = runner.backend.timed_seconds() / (steps // 2)
    finally:
        runner.sync_timing = False
        runner.backend.timed = None
        runner.use_graphs = graphs
        for r in ids:
            engine.abort_request(r)
    ms = {k.removesuffix("_s") + "_ms": v * 1e3 for k, v in split.items()}
    return {
        "batch": batch, "context_len": prompt_len, "cuda_graphs": graphs, "step_ms": wall * 1e3, **ms,
        "other_ms": (wall - sum(split.values())) * 1e3,
        "eager_forward_ms": eager_split["forward_s"] * 1e3, "eager_attention_ms": attention * 1e3,
        "attention_share_of_forward": attention / eager_split["forward_s"] if eager_split["forward_s"] else None,
        "eager_step_ms": eager_wall * 1e3,
    }
