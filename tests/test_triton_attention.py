"""Triton paged attention against the torch reference, on random paged caches.

Without CUDA the kernels run in Triton's interpreter (small shapes; bf16 dots are wrong there, so CPU runs
fp32/fp16 and bf16 is covered by the gpu tests). Unused cache slots and blocks hold NaN: a kernel that reads
past a sequence's length, or follows an unused block-table entry, poisons its output.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit
pytest.importorskip("triton")

from lmstack.engine.attention.torch_ref import paged_attention_ref  # noqa: E402
from lmstack.engine.attention.triton_paged import (  # noqa: E402
    paged_decode_attention,
    paged_prefill_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_paged_kv(
    seq_lens: list[int], block_size: int, n_kv: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches and block tables: shuffled blocks, NaN in every slot no sequence owns."""
    need = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(need, default=0) + 1
    num_blocks = sum(need) + 2
    dev_gen = torch.Generator(device=DEVICE).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    shape = (num_blocks, block_size, n_kv, head_dim)
    k = torch.randn(shape, generator=dev_gen, device=DEVICE, dtype=dtype)
    v = torch.randn(shape, generator=dev_gen, device=DEVICE, dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen)
    spare = order[sum(need) :]
    tables = spare[torch.randint(len(spare), (len(seq_lens), max_blocks), generator=gen)].to(torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    used = 0
    for i, (s, n) in enumerate(zip(seq_lens, need, strict=True)):
        blocks = order[used : used + n]
        used += n
        tables[i, :n] = blocks.to(torch.int32)
        slots = torch.zeros(n * block_size, dtype=torch.bool)
        slots[:s] = True
        owned[blocks] = slots.view(n, block_size)
    unowned = ~owned.to(DEVICE)
    k[unowned] = float("nan")
    v[unowned] = float("nan")
    return k, v, tables.to(DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 1e-2


def check_decode(
    seq_lens: list[int],
    n_heads: int,
    n_kv: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    **kwargs: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    k, v, tables = make_paged_kv(seq_lens, block_size, n_kv, head_dim, dtype, gen)
    batch = len(seq_lens)
    # q as a strided view of a wider projection output, like a fused qkv matmul gives.
    qkv = torch.randn(batch, n_heads + 2 * n_kv, head_dim, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, :n_heads]
    scale = head_dim**-0.5
    out = torch.full((batch, n_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    res = paged_decode_attention(q, k, v, tables, lens, scale, out=out, **kwargs)
    assert res.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "unwritten or NaN-poisoned output"
    live = [i for i, s in enumerate(seq_lens) if s > 0]
    assert (out[[i for i, s in enumerate(seq_lens) if s == 0]] == 0).all(), "padding rows must be zeros"
    live_lens = [seq_lens[i] for i in live]
    ref = paged_attention_ref(q[live], k, v, tables[live], list(range(len(live) + 1)), live_lens, scale)
    err = rel_err(out[live], ref)
    assert err < tol(dtype), f"relative error {err:.2e}"


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim", "block_size", "dtype", "splits"),
    [
        (8, 2, 64, 16, torch.float32, None),
        (8, 2, 64, 16, torch.float32, 3),
        (4, 4, 128, 32, torch.float16, 2),
        (14, 2, 64, 32, torch.float16, None),
        (8, 2, 128, 16, torch.float32, 4),
        (4, 2, 32, 128, torch.float16, 2),
        (8, 8, 256, 64, torch.float32, None),
    ],
)
def test_decode_matches_reference(
    n_heads: int, n_kv: int, head_dim: int, block_size: int, dtype: torch.dtype, splits: int | None
) -> None:
    check_decode([1, 75, 0, 130, 33], n_heads, n_kv, head_dim, block_size, dtype, seed=17, num_splits=splits)


def test_decode_max_seq_len_hint() -> None:
    check_decode([40, 129, 0], 8, 2, 64, 16, torch.float32, seed=3, max_seq_len=129, num_splits=5)


def test_decode_all_padding() -> None:
    gen = torch.Generator().manual_seed(5)
    k, v, tables = make_paged_kv([0, 0], 16, 2, 64, torch.float32, gen)
    q = torch.randn(2, 4, 64, device=DEVICE)
    for splits in (1, 2):
        out = torch.full_like(q, float("nan"))
        lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
        paged_decode_attention(q, k, v, tables, lens, 0.125, out=out, max_seq_len=200, num_splits=splits)
        assert (out == 0).all()


def check_prefill(
    q_lens: list[int],
    seq_lens: list[int],
    n_heads: int,
    n_kv: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    k, v, tables = make_paged_kv(seq_lens, block_size, n_kv, head_dim, dtype, gen)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], n_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    res = paged_prefill_attention(
        q,
        k,
        v,
        tables,
        torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        max(q_lens),
        scale,
        out=out,
    )
    assert res.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "unwritten or NaN-poisoned output"
    err = rel_err(out, paged_attention_ref(q, k, v, tables, starts, seq_lens, scale))
    assert err < tol(dtype), f"relative error {err:.2e}"


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim", "block_size", "dtype"),
    [
        (8, 2, 64, 16, torch.float32),
        (4, 4, 128, 32, torch.float16),
        (14, 2, 64, 16, torch.float32),
        (4, 2, 32, 128, torch.float16),
        (2, 1, 256, 64, torch.float32),
    ],
)
def test_prefill_matches_reference(
    n_heads: int, n_kv: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    # A fresh prompt, a chunk over cached context, a decode row, a sequence with no new tokens.
    check_prefill([37, 21, 1, 0], [37, 90, 50, 12], n_heads, n_kv, head_dim, block_size, dtype, seed=11)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_decode_llama8b_shapes(batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 8193, (batch,), generator=gen).tolist()
    lens[0] = 8192
    if batch > 1:
        lens[1] = 0
    check_decode(lens, 32, 8, 128, 16, torch.bfloat16, seed=batch)


@gpu
@needs_cuda
def test_decode_cuda_graph_replay() -> None:
    """Captured once, replayed with new lengths (padding rows included) and new queries."""
    gen = torch.Generator().manual_seed(0)
    batch, n_heads, n_kv, head_dim = 8, 32, 8, 128
    k, v, tables = make_paged_kv([4096] * batch, 16, n_kv, head_dim, torch.bfloat16, gen)
    q = torch.randn(batch, n_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    lens = torch.full((batch,), 4096, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    paged_decode_attention(q, k, v, tables, lens, head_dim**-0.5, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k, v, tables, lens, head_dim**-0.5, out=out)
    new_lens = [4096, 1, 0, 17, 2500, 0, 4000, 64]
    lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert not out.isnan().any()
    live = [i for i, s in enumerate(new_lens) if s > 0]
    assert (out[[2, 5]] == 0).all()
    ref = paged_attention_ref(
        q[live], k, v, tables[live], list(range(len(live) + 1)), [new_lens[i] for i in live], head_dim**-0.5
    )
    assert rel_err(out[live], ref) < 1e-2


@gpu
@needs_cuda
def test_prefill_llama8b_shapes() -> None:
    q_lens = [2048, 512, 1, 300, 1, 1000]
    seq_lens = [2048, 8192, 5000, 300, 1, 3000]
    check_prefill(q_lens, seq_lens, 32, 8, 128, 16, torch.bfloat16, seed=1)
