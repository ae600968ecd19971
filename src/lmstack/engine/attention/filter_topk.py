"""Top-k of long score rows by sampling a pivot, filtering the row down to candidates, and ranking those only.

`torch.topk` over the whole row was the largest stage of a Double Sparsity decode step on the H200 (502 of 940
us at batch 32, 128K context), and our radix select was slower still. Here the row is read once by a filter,
and only ~1.5k candidates per row reach `torch.topk`:

- Pivot (one program per row): `samples` scores at stratified, hashed positions below seq_len; the pivot is the
  sample whose rank among them predicts OVERSELECT x k scores at or above it, compared as order-preserving
  integer keys (`radix_topk.order_key`). Rows of at most `capacity` scores take the lowest key: all of them
  are candidates.
- Filter (grid rows x tiles): every score >= pivot is appended to its row's candidates (score and position),
  each tile reserving its range with one atomic.
- `torch.topk` of the candidates (unused slots score -inf, position -1), mapped back to positions.

The result equals `torch.topk`'s set (up to ties) whenever a row's candidates number k..capacity. The row takes
enough samples that ~SAMPLES_ABOVE of them lie above the pivot (8,192 at 1/16 of the longest row), which puts
both ends of that range over 6 sigma away; where k is so small a part of the row that this would take more than
MAX_SAMPLES, the whole row goes to `torch.topk` instead. Outside the range the result degrades rather than
fails: with fewer than k candidates the row keeps them all and pads with -1; with more than capacity it ranks
the first `capacity` to arrive. `filter_topk(..., counts=True)` returns the candidate counts to check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmstack.engine.attention.radix_topk import order_key

SAMPLES_ABOVE = 400  # samples expected at or above the pivot: its count is then within ~5% (1 / sqrt(400))
MAX_SAMPLES = 16384  # per row; a budget too small for this many to find SAMPLES_ABOVE goes to torch.topk
OVERSELECT = 1.5  # expected candidates per kept position
CAPACITY = 2.0  # candidate slots per kept position
_BLOCK = 4096  # scores per filter program


@triton.jit
def _pivot_kernel(
    scores_ptr, lens_ptr, pivot_ptr, heads, k, capacity, stride_r,
    NS: tl.constexpr, OVER_NUM: tl.constexpr, OVER_DEN: tl.constexpr,
):  # fmt: skip
    """One row: the order key at or above which ~OVER_NUM / OVER_DEN x k of its scores lie (0, the lowest key,
    when all of them are candidates). The sample of that rank is found bit by bit, from the top: the largest
    key t with more than `rank` samples >= t (32 counts over the samples; no sort)."""
    row = tl.program_id(0)
    n = tl.load(lens_ptr + row // heads).to(tl.int64)
    if n <= capacity:
        tl.store(pivot_ptr + row, (n * 0).to(tl.int64))
        return
    i = tl.arange(0, NS).to(tl.int64)
    step = tl.maximum(n // NS, 1)
    jitter = ((i * 2654435761) & 0xFFFFFFFF) % step  # one position per stratum, not a fixed stride
    pos = tl.minimum((i * n) // NS + jitter, n - 1)
    key = order_key(tl.load(scores_ptr + row.to(tl.int64) * stride_r + pos).to(tl.float32))
    rank = (NS * OVER_NUM * k) // (OVER_DEN * n)  # < NS: n > capacity >= OVERSELECT x k
    t = (n * 0).to(tl.int64)
    for bit in tl.static_range(31, -1, -1):
        trial = t | (1 << bit)
        t = tl.where(tl.sum((key >= trial).to(tl.int32), axis=0) > rank, trial, t)
    tl.store(pivot_ptr + row, t)


@triton.jit
def _filter_kernel(
    scores_ptr, lens_ptr, pivot_ptr, count_ptr, cand_s_ptr, cand_i_ptr,
    heads, k, capacity, stride_r,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid (rows, tiles): appends this tile's scores >= the row's pivot to the row's candidates."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    n = tl.load(lens_ptr + row // heads)
    if (n <= k) | (tile * BLOCK >= n):  # rows within the budget are the caller's
        return
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(scores_ptr + row.to(tl.int64) * stride_r + offs, mask=offs < n, other=float("-inf"))
    keep = (offs < n) & (order_key(x.to(tl.float32)) >= tl.load(pivot_ptr + row))
    start = tl.atomic_add(count_ptr + row, tl.sum(keep.to(tl.int32), axis=0))
    slot = start + tl.cumsum(keep.to(tl.int32), axis=0) - 1
    ok = keep & (slot < capacity)
    base = row.to(tl.int64) * capacity + slot
    tl.store(cand_s_ptr + base, x, mask=ok)
    tl.store(cand_i_ptr + base, offs.to(tl.int32), mask=ok)


def filter_capacity(k: int, s_max: int) -> int:
    """Candidate slots per row for keeping k of at most s_max scores."""
    return min(s_max, max(k + 1, int(CAPACITY * k)))


def filter_samples(k: int, s_max: int) -> int | None:
    """Samples per row that put ~SAMPLES_ABOVE above the pivot in a row of s_max scores (a power of two), or
    None where that takes more than MAX_SAMPLES."""
    need = triton.next_power_of_2(max(1, -(-SAMPLES_ABOVE * s_max // int(OVERSELECT * k))))
    return max(1024, need) if need <= MAX_SAMPLES else None


def filter_topk(
    scores: torch.Tensor, seq_lens: torch.Tensor, k: int, *, counts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """scores [B, H, S] (fp32/fp16/bf16, last dim contiguous) · seq_lens [B] → idx [B, H, k] int32.

    Row (b, h) gets the positions of its k largest scores among positions < seq_lens[b], in no particular
    order (see the module docstring for when that is exact). Rows with seq_lens[b] <= k hold no defined
    values: the caller fills them. With counts=True, also the candidate count per row, [B, H] int32 (-1 where
    the rows went to `torch.topk` whole).
    """
    batch, heads, s_max = scores.shape
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"filter top-k takes fp32, fp16 or bf16 scores, got {scores.dtype}")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    rows = batch * heads
    samples = filter_samples(k, s_max)
    if samples is None:  # positions past seq_len masked: they are never read on the filter path either
        lens = seq_lens.to(device=scores.device).view(batch, 1, 1)
        past_end = torch.arange(s_max, device=scores.device) >= lens  # [B, 1, S]
        idx = scores.masked_fill(past_end, float("-inf")).topk(k, dim=-1, sorted=False).indices.to(torch.int32)
        return (idx, torch.full((batch, heads), -1, dtype=torch.int32, device=scores.device)) if counts else idx
    flat = scores.view(rows, s_max) if scores.is_contiguous() else scores.reshape(rows, s_max)
    lens = seq_lens.to(device=scores.device, dtype=torch.int32)
    capacity = filter_capacity(k, s_max)
    pivot = torch.empty(rows, dtype=torch.int64, device=scores.device)
    count = torch.zeros(rows, dtype=torch.int32, device=scores.device)
    cand_s = torch.full((rows, capacity), float("-inf"), dtype=scores.dtype, device=scores.device)
    cand_i = torch.full((rows, capacity), -1, dtype=torch.int32, device=scores.device)
    over = OVERSELECT.as_integer_ratio()
    _pivot_kernel[(rows,)](flat, lens, pivot, heads, k, capacity, flat.stride(0),
                           NS=samples, OVER_NUM=over[0], OVER_DEN=over[1],
                           num_warps=min(32, max(8, samples // 512)))  # fmt: skip
    _filter_kernel[(rows, triton.cdiv(s_max, _BLOCK))](flat, lens, pivot, count, cand_s, cand_i, heads, k,
                                                       capacity, flat.stride(0), BLOCK=_BLOCK, num_warps=8)  # fmt: skip
    top = cand_s.topk(min(k, capacity), dim=-1, sorted=False).indices  # [rows, k]
    idx = cand_i.gather(-1, top).view(batch, heads, -1)
    return (idx, count.view(batch, heads)) if counts else idx
