"""Top-k of long score rows by radix select in Triton: a few histogram passes and one compaction pass.

Double Sparsity keeps k = S/16 of S approximate scores per row, and `torch.topk(sorted=False)` was the largest
stage of its decode step on the H200 (502 of 940 us at batch 32, 128K context: the scores are 134 MB, a few
tens of microseconds to read). Here every pass reads the scores once:

- A score's float bits become an integer key with the same order (negative floats: bits flipped, then offset
  into [0, 2^32)). Digits of 8 bits, from the top: four passes for fp32, three for fp16, two for bf16 (a 16-bit
  float's low bits carry nothing once it is widened to fp32).
- Pass p: each program takes a tile of a row, keeps the keys whose digits above p equal the prefix found so
  far, and adds its `tl.histogram` of digit p into the row's histogram (atomics). The prefix itself is not
  stored: each program rebuilds it from the earlier passes' histograms (256 bins each, next to nothing).
- After the last pass the prefix is T, the k-th largest key. The compaction keeps every key above T and the
  first `need` keys equal to T, each tile reserving its output range with one atomic per row.

Result: exactly k positions per row, as a set equal to `torch.topk`'s (up to which of tied scores are taken),
in no particular order. Rows whose length is <= k are left to the caller (`ds_topk` keeps them whole).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

RADIX_BITS = 8
NUM_BINS = 1 << RADIX_BITS
_DIGIT: tl.constexpr = tl.constexpr(RADIX_BITS)  # the same, as the kernels see it
_BLOCK = 4096  # scores per program
_SIGNIFICANT_BITS = {torch.float32: 32, torch.float16: 19, torch.bfloat16: 16}  # sign + exponent + mantissa


def num_passes(dtype: torch.dtype) -> int:
    if dtype not in _SIGNIFICANT_BITS:
        raise ValueError(f"radix top-k takes fp32, fp16 or bf16 scores, got {dtype}")
    return -(-_SIGNIFICANT_BITS[dtype] // RADIX_BITS)


@triton.jit
def order_key(x):
    """fp32 values → int64 keys in [0, 2^32) ordered as the floats are."""
    bits = x.to(tl.int32, bitcast=True)
    flipped = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order = float order
    return flipped.to(tl.int64) + 2147483648


@triton.jit
def _prefix(hist_ptr, row, num_rows, k, PASSES: tl.constexpr, NB: tl.constexpr):
    """The top PASSES digits of the k-th largest key of `row`, and how many keys with exactly that prefix are
    still to be taken (the rest of the k lie above it)."""
    bins = tl.arange(0, NB)
    prefix = (k * 0).to(tl.int64)
    need = k
    for p in tl.static_range(PASSES):
        h = tl.load(hist_ptr + (p * num_rows + row) * NB + bins)  # [NB] int32
        above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0)  # [NB]: keys (with the prefix) in a higher bin
        chosen = (above < need) & (above + h >= need)
        digit = tl.sum(tl.where(chosen, bins, 0), axis=0)
        need = need - tl.sum(tl.where(chosen, above, 0), axis=0)
        prefix = prefix | (digit.to(tl.int64) << (32 - _DIGIT * (p + 1)))
    return prefix, need


@triton.jit
def _tile(lens_ptr, heads, k, BLOCK: tl.constexpr):
    """This program's row and positions, which of them are inside the row, and whether the tile has no work:
    past the row's end, or in a row of at most k keys (those are the caller's)."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    n = tl.load(lens_ptr + row // heads)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    return row, offs, offs < n, (n <= k) | (tile * BLOCK >= n)


@triton.jit
def _histogram_kernel(
    scores_ptr, lens_ptr, hist_ptr,
    num_rows, heads, k, stride_r,
    PASS: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
):
    """Grid (rows, tiles): adds the digit-PASS histogram of this tile's keys that carry the prefix so far."""
    row, offs, valid, idle = _tile(lens_ptr, heads, k, BLOCK)
    if idle:
        return
    x = tl.load(scores_ptr + row * stride_r + offs, mask=valid, other=0.0).to(tl.float32)
    key = order_key(x)
    shift = 32 - _DIGIT * (PASS + 1)
    if PASS > 0:
        prefix, _ = _prefix(hist_ptr, row, num_rows, k, PASS, NB)
        valid = valid & ((key >> (shift + _DIGIT)) == (prefix >> (shift + _DIGIT)))
    digit = ((key >> shift) & (NB - 1)).to(tl.int32)
    digit = tl.where(valid, digit, NB)  # keys outside the prefix land in the spare upper half, never added
    h = tl.histogram(digit, 2 * NB)
    bins = tl.arange(0, 2 * NB)
    tl.atomic_add(hist_ptr + (PASS * num_rows + row) * NB + bins, h, mask=bins < NB)


@triton.jit
def _compact_kernel(
    scores_ptr, lens_ptr, hist_ptr, count_ptr, idx_ptr,
    num_rows, heads, k, stride_r, stride_i,
    PASSES: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
):
    """Grid (rows, tiles): writes this tile's positions above the k-th key, and its share of the ties."""
    row, offs, valid, idle = _tile(lens_ptr, heads, k, BLOCK)
    if idle:
        return
    x = tl.load(scores_ptr + row * stride_r + offs, mask=valid, other=0.0).to(tl.float32)
    prefix, need = _prefix(hist_ptr, row, num_rows, k, PASSES, NB)
    low = 32 - _DIGIT * PASSES  # bits no pass looked at: constant within a 16-bit float
    high = order_key(x) >> low
    threshold = prefix >> low
    above = valid & (high > threshold)
    tie = valid & (high == threshold)
    n_above = tl.sum(above.to(tl.int32), axis=0)
    n_tie = tl.sum(tie.to(tl.int32), axis=0)
    start = tl.atomic_add(count_ptr + 2 * row, n_above)  # this tile's slice of the k - need keys above
    pos = start + tl.cumsum(above.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + row * stride_i + pos, offs.to(tl.int32), mask=above)
    start_tie = tl.atomic_add(count_ptr + 2 * row + 1, n_tie)
    pos_tie = start_tie + tl.cumsum(tie.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + row * stride_i + (k - need) + pos_tie, offs.to(tl.int32), mask=tie & (pos_tie < need))


def radix_topk(scores: torch.Tensor, seq_lens: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, H, S] (fp32/fp16/bf16, last dim contiguous) · seq_lens [B] → idx [B, H, k] int32.

    Row (b, h) gets the positions of its k largest scores among positions < seq_lens[b], in no particular
    order. Rows with seq_lens[b] <= k are left unwritten (uninitialized): the caller fills them.
    """
    batch, heads, s_max = scores.shape
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    rows = batch * heads
    passes = num_passes(scores.dtype)
    flat = scores.view(rows, s_max) if scores.is_contiguous() else scores.reshape(rows, s_max)
    lens = seq_lens.to(device=scores.device, dtype=torch.int32)
    work = torch.zeros(passes * rows * NUM_BINS + 2 * rows, dtype=torch.int32, device=scores.device)
    hist, counts = work[: passes * rows * NUM_BINS], work[passes * rows * NUM_BINS :]
    idx = torch.empty((batch, heads, k), dtype=torch.int32, device=scores.device)
    grid = (rows, triton.cdiv(s_max, _BLOCK))
    for p in range(passes):
        _histogram_kernel[grid](flat, lens, hist, rows, heads, k, flat.stride(0),
                                PASS=p, BLOCK=_BLOCK, NB=NUM_BINS, num_warps=8)  # fmt: skip
    _compact_kernel[grid](flat, lens, hist, counts, idx, rows, heads, k, flat.stride(0), k,
                          PASSES=passes, BLOCK=_BLOCK, NB=NUM_BINS, num_warps=8)  # fmt: skip
    return idx
