"""One decode layer's attention: dense Triton paged decode vs Double Sparsity, over contexts and batch sizes.

The dense side is our split-K paged decode kernel (the engine's real decode path). The Double Sparsity side is
everything a decode query costs: gathering q's label channels, scoring every cached token from the label
cache, top-k, and exact attention over the selected tokens, with k = context x fraction. Two selections are
timed: one list per query head (the `double_sparse` backend) and one per KV head (`kv_group`). Caches are
random bf16 with blocks shuffled within each sequence; every op is timed as a replayed CUDA graph (the
engine's decode path), `do_bench` flushing the L2 between runs and reporting medians. Correctness is checked
against the torch reference before anything is timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from triton.testing import do_bench

from lmstack.engine.attention import double_sparse_ref as ref
from lmstack.engine.attention.double_sparse_triton import ds_label_scores, ds_sparse_attention, ds_topk
from lmstack.engine.attention.torch_ref import paged_attention_ref
from lmstack.engine.attention.triton_paged import paged_decode_attention
from lmstack.errors import LmstackError


@dataclass
class OpShape:
    """One attention layer of the benchmarked model (Llama-3-8B by default) and the sparsity setting."""

    n_heads: int = 32
    n_kv: int = 8
    head_dim: int = 128
    r: int = 8
    fraction: float = 1 / 16
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv

    def kv_bytes(self, batch: int, ctx: int) -> int:
        """K and V bytes of the batch, which dense decode reads in full."""
        return 2 * batch * ctx * self.n_kv * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def keep(self, ctx: int) -> int:
        return max(1, round(ctx * self.fraction))


@dataclass
class LayerInputs:
    q: torch.Tensor  # [B, Hq, D]
    k: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v: torch.Tensor
    labels: torch.Tensor  # [num_blocks, block_size, Hkv, r]
    channels: torch.Tensor  # [Hkv, r]
    tables: torch.Tensor  # [B, blocks per sequence] int32
    lens: torch.Tensor  # [B] int32


def layer_inputs(shape: OpShape, batch: int, ctx: int, seed: int, device: str = "cuda") -> LayerInputs:
    """Random caches for `batch` sequences of `ctx` tokens; each sequence's blocks are listed shuffled."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n_blocks = -(-ctx // shape.block_size)
    cache_shape = (batch * n_blocks, shape.block_size, shape.n_kv, shape.head_dim)
    k = torch.randn(cache_shape, generator=gen, device=device, dtype=shape.dtype)
    v = torch.randn(cache_shape, generator=gen, device=device, dtype=shape.dtype)
    order = torch.argsort(torch.rand(batch, n_blocks, generator=gen, device=device), dim=1)
    tables = (order + torch.arange(batch, device=device)[:, None] * n_blocks).to(torch.int32)
    channels = torch.argsort(torch.rand(shape.n_kv, shape.head_dim, generator=gen, device=device), dim=1)[:, :shape.r]
    labels = k.gather(3, channels.view(1, 1, shape.n_kv, shape.r).expand(*cache_shape[:3], -1)).contiguous()
    q = torch.randn(batch, shape.n_heads, shape.head_dim, generator=gen, device=device, dtype=shape.dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return LayerInputs(q, k, v, labels, channels, tables, lens)


def q_labels(inp: LayerInputs, shape: OpShape, shared: bool) -> torch.Tensor:
    """[B, Hq, r] the query's label channels, or [B, Hkv, r] summed over each KV group."""
    batch = inp.q.shape[0]
    ql = inp.q.gather(2, inp.channels.repeat_interleave(shape.group, 0).expand(batch, -1, -1))
    return ql.view(batch, shape.n_kv, shape.group, shape.r).sum(2) if shared else ql


def ds_decode(inp: LayerInputs, shape: OpShape, ctx: int, shared: bool,
              score_dtype: torch.dtype = torch.float32, topk: str = "torch") -> torch.Tensor:
    """The whole Double Sparsity decode op: label channels → scores → top-k → sparse attention."""
    scores = ds_label_scores(q_labels(inp, shape, shared), inp.labels, inp.tables, inp.lens, max_seq_len=ctx,
                             out_dtype=score_dtype)
    idx = ds_topk(scores, inp.lens, shape.keep(ctx), method=topk)
    return ds_sparse_attention(inp.q, inp.k, inp.v, inp.tables, idx, shape.head_dim**-0.5)


def _rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def check(shape: OpShape, batch: int = 3, ctx: int = 5000, seed: int = 1) -> dict[str, float]:
    """Triton ops vs the torch reference on fresh random bf16 inputs; raises when an error is out of bounds.

    Thresholds (METHOD.md): bf16 operands 1e-2 at most; label scores are exact products summed in fp32.
    """
    inp = layer_inputs(shape, batch, ctx, seed)
    scale = shape.head_dim**-0.5
    errors: dict[str, float] = {}
    for shared in (False, True):
        tag = "kv_group" if shared else "head"
        ql = q_labels(inp, shape, shared)
        got = ds_label_scores(ql, inp.labels, inp.tables, inp.lens, max_seq_len=ctx)
        want = ref.ds_label_scores(ql, inp.labels, inp.tables, inp.lens)
        errors[f"label_scores_{tag}"] = _rel_err(got, want)
        # Equal scores may tie at the k-th place, so compare the chosen scores rather than the positions.
        for scores in (want, want.to(torch.bfloat16)):
            expected = scores.gather(-1, ref.ds_topk(scores, inp.lens, shape.keep(ctx)).long()).sort(-1).values
            for method in ("torch", "radix", "filter"):
                chosen = scores.gather(-1, ds_topk(scores, inp.lens, shape.keep(ctx), method).long()).sort(-1).values
                name = f"topk_mismatch_{method}_{str(scores.dtype).removeprefix('torch.')}_{tag}"
                errors[name] = 0.0 if torch.equal(chosen, expected) else 1.0
        idx = ds_topk(want, inp.lens, shape.keep(ctx))
        out = torch.full_like(inp.q, float("nan"))
        ds_sparse_attention(inp.q, inp.k, inp.v, inp.tables, idx, scale, out=out)
        per_head = idx.repeat_interleave(shape.group, 1) if shared else idx
        errors[f"sparse_attention_{tag}"] = float("nan") if out.isnan().any() else _rel_err(
            out, ref.ds_sparse_attention(inp.q, inp.k, inp.v, inp.tables, per_head, scale))
    every = ds_topk(ds_label_scores(inp.q, inp.k, inp.tables, inp.lens), inp.lens, ctx)  # r = D, k = all
    dense = paged_attention_ref(inp.q, inp.k, inp.v, inp.tables, list(range(batch + 1)), [ctx] * batch, scale)
    errors["full_budget_vs_dense"] = _rel_err(ds_sparse_attention(inp.q, inp.k, inp.v, inp.tables, every, scale),
                                              dense)
    bounds = {"label_scores": 1e-3, "topk_mismatch": 0.0, "sparse_attention": 1e-2, "full_budget": 1e-2}
    bad = [f"{name}={err:.2e}" for name, err in errors.items()
           if not err <= next(b for key, b in bounds.items() if name.startswith(key))]
    if bad:
        raise LmstackError(f"Triton Double Sparsity ops disagree with the torch reference: {', '.join(bad)}")
    return errors


def _bench_ms(fn: Any) -> float:
    """Median ms of `fn` replayed from a CUDA graph, as the engine's decode steps run: what is timed is the
    kernels, not the host launching a dozen small ops one by one."""
    for _ in range(2):  # compile and settle allocations outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def time_config(shape: OpShape, batch: int, ctx: int, seed: int = 0) -> dict[str, Any]:
    """Median microseconds of dense and Double Sparsity decode, and of each stage, for both selections."""
    inp = layer_inputs(shape, batch, ctx, seed)
    scale = shape.head_dim**-0.5
    out = torch.empty_like(inp.q)
    keep = shape.keep(ctx)
    us = {
        "dense_us": _bench_ms(lambda: paged_decode_attention(inp.q, inp.k, inp.v, inp.tables, inp.lens, scale,
                                                             out=out, max_seq_len=ctx)),
        "ds_head_us": _bench_ms(lambda: ds_decode(inp, shape, ctx, False)),
        "ds_kv_group_us": _bench_ms(lambda: ds_decode(inp, shape, ctx, True)),
        "ds_kv_group_s16_us": _bench_ms(lambda: ds_decode(inp, shape, ctx, True, torch.bfloat16)),
        "ds_kv_group_s16_radix_us": _bench_ms(lambda: ds_decode(inp, shape, ctx, True, torch.bfloat16, "radix")),
        "ds_kv_group_s16_filter_us": _bench_ms(lambda: ds_decode(inp, shape, ctx, True, torch.bfloat16, "filter")),
    }
    for shared, tag in ((False, ""), (True, "_kv_group")):
        ql = q_labels(inp, shape, shared)
        scores = ds_label_scores(ql, inp.labels, inp.tables, inp.lens, max_seq_len=ctx)
        idx = ds_topk(scores, inp.lens, keep)
        us[f"stage_scores{tag}_us"] = _bench_ms(
            lambda: ds_label_scores(ql, inp.labels, inp.tables, inp.lens, max_seq_len=ctx))  # noqa: B023
        us[f"stage_topk{tag}_us"] = _bench_ms(lambda: ds_topk(scores, inp.lens, keep))  # noqa: B023
        us[f"stage_topk_radix{tag}_us"] = _bench_ms(lambda: ds_topk(scores, inp.lens, keep, "radix"))  # noqa: B023
        us[f"stage_topk_filter{tag}_us"] = _bench_ms(lambda: ds_topk(scores, inp.lens, keep, "filter"))  # noqa: B023
        us[f"stage_sparse{tag}_us"] = _bench_ms(
            lambda: ds_sparse_attention(inp.q, inp.k, inp.v, inp.tables, idx, scale))  # noqa: B023
    us = {name: ms * 1e3 for name, ms in us.items()}
    return {"batch": batch, "context": ctx, "k": keep, "kv_gb": shape.kv_bytes(batch, ctx) / 1e9, **us,
            "speedup_head": us["dense_us"] / us["ds_head_us"],
            "speedup_kv_group": us["dense_us"] / us["ds_kv_group_us"],
            "speedup_kv_group_s16": us["dense_us"] / us["ds_kv_group_s16_us"],
            "speedup_kv_group_s16_radix": us["dense_us"] / us["ds_kv_group_s16_radix_us"],
            "speedup_kv_group_s16_filter": us["dense_us"] / us["ds_kv_group_s16_filter_us"],
            "dense_gb_s": shape.kv_bytes(batch, ctx) / us["dense_us"] / 1e3}


def sweep(shape: OpShape, contexts: list[int], batches: list[int], max_kv_bytes: float) -> list[dict[str, Any]]:
    """Every (context, batch) whose K/V fit in `max_kv_bytes`; the others are listed as skipped."""
    rows = []
    for ctx in contexts:
        for batch in batches:
            if shape.kv_bytes(batch, ctx) > max_kv_bytes:
                rows.append({"batch": batch, "context": ctx, "skipped": "K/V do not fit in GPU memory"})
                continue
            rows.append(time_config(shape, batch, ctx))
            torch.cuda.empty_cache()
    return rows
