"""Decode with the KV cache in pinned host memory: Double Sparsity offload vs FlexGen-style full streaming.

The whole model decodes `batch` sequences whose K/V (every layer) live in host memory, at the longest
power-of-two context whose cache takes at most half of the host's available memory. The cached K/V are
random (the speed does not depend on their values) with the label cache made from that K, so no prompt has
to be prefilled. A step is one forward plus the greedy pick, timed on the host clock between device
synchronizations; the median of several steps is reported, with the bytes each mode moves over the bus.
Before timing, one decode step at a short context is compared across dense GPU attention, full streaming
and Double Sparsity offload with a budget of every token (all three must agree).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.engine.attention import AttentionMetadata, TritonAttention
from lmstack.engine.attention.ds_host_kv import HostKVCache
from lmstack.engine.attention.ds_offload import DoubleSparseOffload, FullKVStreaming, OffloadConfig
from lmstack.errors import LmstackError
from lmstack.models.config import ModelConfig
from lmstack.models.llama import LlamaModel, Rotary

BLOCK = 16
HOST_SHARE = 0.5  # of the host's available memory, for the offloaded cache


def host_available_bytes() -> int:
    """MemAvailable, lowered to the cgroup's remaining allowance when the process runs under a limit."""
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * torch.empty((), dtype=dtype).itemsize


def choose_context(per_token: int, batch: int, available: int, cap: int) -> int:
    """The longest power-of-two context (8K up to `cap`) whose cache fits HOST_SHARE of `available` bytes."""
    ctx = 8192
    while 2 * ctx <= cap and 2 * ctx * per_token * batch <= HOST_SHARE * available:
        ctx *= 2
    if ctx * per_token * batch > HOST_SHARE * available:
        raise LmstackError(f"not even an 8K context of {batch} sequence(s) fits in host memory "
                           f"({available / 2**30:.1f} GiB available)")
    return ctx


def _metadata(positions: list[int], tables: torch.Tensor, tables_cpu: list[list[int]]) -> AttentionMetadata:
    """Decode metadata: sequence b's new token at position positions[b]."""
    dev = tables.device
    slots = [tables_cpu[b][p // BLOCK] * BLOCK + p % BLOCK for b, p in enumerate(positions)]
    lens = [p + 1 for p in positions]
    n = len(positions)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), block_tables=tables,
        query_start_loc_cpu=list(range(n + 1)), seq_lens_cpu=lens, max_query_len=1, max_seq_len=max(lens))


@torch.inference_mode()
def decode_step(model: LlamaModel, backend: Any, tokens: torch.Tensor, positions: list[int], tables: torch.Tensor,
                tables_cpu: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step through `backend` → (logits [B, V], greedy next tokens [B])."""
    backend.meta = _metadata(positions, tables, tables_cpu)
    logits = model.compute_logits(model(tokens, torch.tensor(positions, device=tokens.device), backend))
    return logits, logits.argmax(-1)


def _fill(backend: DoubleSparseOffload, dense: list[tuple[torch.Tensor, torch.Tensor]] | None, seed: int,
          chunk: int = 2048) -> None:
    """Random K/V for every block of every layer: into the host cache, the label cache and `dense` caches."""
    host = backend.host
    gen = torch.Generator(device=backend.device).manual_seed(seed)
    num_blocks, shape, dtype = host.k[0].shape[0], host.k[0].shape[1:], host.k[0].dtype
    for layer in range(backend.num_layers):
        for start in range(0, num_blocks, chunk):
            n = min(chunk, num_blocks - start)
            k = torch.randn(n, *shape, generator=gen, device=backend.device, dtype=dtype)
            v = torch.randn(n, *shape, generator=gen, device=backend.device, dtype=dtype)
            backend.import_blocks(layer, start, k, v)
            if dense is not None:
                dense[layer][0][start:start + n].copy_(k)
                dense[layer][1][start:start + n].copy_(v)
    torch.cuda.synchronize()


def _tables(batch: int, per_seq: int, device: torch.device) -> tuple[torch.Tensor, list[list[int]]]:
    tables = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    return tables.to(device), tables.tolist()


def check(cfg: ModelConfig, channels: torch.Tensor, dtype: torch.dtype, device: torch.device, batch: int = 2,
          ctx: int = 3000, seed: int = 1) -> dict[str, float]:
    """One decode layer at a short context on fresh random bf16 data: full streaming must equal dense attention
    exactly, offload with a budget of every token within bf16 rounding (the gathered order and splits differ).
    Zero-copy reads and writes of host memory are what this proves on a new machine."""
    per_seq = -(-(ctx + 1) // BLOCK)
    n_kv, head_dim = cfg.num_key_value_heads, cfg.head_dim
    host = HostKVCache(cfg.num_hidden_layers, batch * per_seq, BLOCK, n_kv, head_dim, dtype, device)
    shape = host.k[0].shape
    dense = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
             for _ in range(cfg.num_hidden_layers)]
    filler = DoubleSparseOffload(host, channels, OffloadConfig(prefetch=False), max_batch=batch)
    _fill(filler, dense, seed=seed)
    tables, tables_cpu = _tables(batch, per_seq, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, n, head_dim, generator=gen, device=device, dtype=dtype)
               for n in (cfg.num_attention_heads, n_kv, n_kv))
    meta = _metadata([ctx - 1 - 7 * b for b in range(batch)], tables, tables_cpu)
    scale = head_dim**-0.5
    reference = TritonAttention(dense)
    reference.meta = meta
    want = reference.attention(0, q, k, v, scale)
    candidates: dict[str, Any] = {"full_kv_streaming": FullKVStreaming(host)}
    for selection in ("head", "kv_group"):
        candidates[f"offload_{selection}_every_token"] = DoubleSparseOffload(
            host, channels, OffloadConfig(token_budget=1.0, selection=selection, prefetch=False), max_batch=batch,
            labels=filler.labels)
    errors = {}
    for name, backend in candidates.items():
        backend.meta = meta
        got = backend.attention(0, q, k, v, scale)
        errors[name] = float("nan") if got.isnan().any() else ((got - want).float().norm() / want.float().norm()).item()
    written = host.k[0].view(-1, n_kv, head_dim)[meta.slot_mapping.cpu()]
    errors["host_write_mismatch"] = 0.0 if torch.equal(written, k.cpu()) else 1.0
    bounds = {"full_kv_streaming": 0.0, "host_write_mismatch": 0.0}
    bad = {name: err for name, err in errors.items() if not err <= bounds.get(name, 1e-2)}
    if bad:
        raise LmstackError(f"offload decode disagrees with dense attention (relative error): {bad}")
    return errors


def h2d_bandwidth(host: torch.Tensor, repeats: int = 5) -> float:
    """Bytes/s of a plain pinned host-to-device copy of `host` (the bus's practical ceiling)."""
    dst = torch.empty(host.shape, dtype=host.dtype, device="cuda")
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return host.numel() * host.element_size() / statistics.median(times[1:])


def time_offload(model: LlamaModel, cfg: ModelConfig, channels: torch.Tensor, ctx: int, batch: int, steps: int,
                 fraction: float) -> dict[str, Any]:
    """Median decode step of full streaming and of Double Sparsity offload (both selections) at `ctx`."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    per_seq = ctx // BLOCK  # the pool holds exactly ctx tokens per sequence (pinned sizes round to powers of 2)
    past = ctx - steps - 3
    old_rotary = model.rotary
    if ctx > cfg.max_position_embeddings:  # a longer rotary table; the speed does not depend on the values
        model.rotary = Rotary(dataclasses.replace(cfg, max_position_embeddings=ctx)).to(device)
    t0 = time.perf_counter()
    host = HostKVCache(cfg.num_hidden_layers, batch * per_seq, BLOCK, cfg.num_key_value_heads, cfg.head_dim, dtype,
                       device)
    filler = DoubleSparseOffload(host, channels, OffloadConfig(prefetch=False), max_batch=batch)
    _fill(filler, None, seed=2)
    setup_s = time.perf_counter() - t0
    tables, tables_cpu = _tables(batch, per_seq, device)
    bandwidth = h2d_bandwidth(host.k[0])
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    keep = OffloadConfig(token_budget=fraction).keep(past)
    row_bytes = 2 * cfg.head_dim * torch.empty((), dtype=dtype).itemsize  # one token's K and V of one head
    modes: dict[str, tuple[Any, int]] = {
        "full_kv_streaming": (lambda: FullKVStreaming(host), host.nbytes),
    }
    for selection, prefetch in (("head", True), ("kv_group", True), ("kv_group", False)):
        rows = cfg.num_attention_heads if selection == "head" else cfg.num_key_value_heads
        name = f"ds_offload_{selection}" + ("" if prefetch else "_no_prefetch")
        bus_bytes = cfg.num_hidden_layers * batch * rows * keep * row_bytes
        modes[name] = (lambda s=selection, p=prefetch: DoubleSparseOffload(
            host, channels, OffloadConfig(token_budget=fraction, selection=s, prefetch=p), model=model,
            max_batch=batch, max_context=ctx, labels=filler.labels), bus_bytes)
    results: dict[str, Any] = {}
    try:
        for name, (make, bus_bytes) in modes.items():
            backend = make()
            tokens = torch.zeros(batch, dtype=torch.long, device=device)
            times = []
            for i in range(steps + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                _, tokens = decode_step(model, backend, tokens, [past + i] * batch, tables, tables_cpu)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            if isinstance(backend, DoubleSparseOffload):
                backend.close()
            del backend
            torch.cuda.empty_cache()
            step_s = statistics.median(times[1:])
            results[name] = {"step_ms": step_s * 1e3, "tok_s": batch / step_s, "bus_gb_per_step": bus_bytes / 1e9,
                             "steps_ms": [t * 1e3 for t in times]}
    finally:
        model.rotary = old_rotary
    full = results["full_kv_streaming"]["step_ms"]
    for row in results.values():
        row["speedup_vs_full"] = full / row["step_ms"]
    return {"context": ctx, "batch": batch, "past_tokens": past, "k": keep, "host_kv_gib": host.nbytes / 2**30,
            "setup_s": setup_s, "h2d_gb_s": bandwidth / 1e9,
            "full_streaming_floor_ms": host.nbytes / bandwidth * 1e3, "group": group, "modes": results}
