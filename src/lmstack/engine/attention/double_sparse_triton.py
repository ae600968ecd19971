"""Double Sparsity decode in Triton: label scoring over the paged label cache, top-k, sparse attention.

Same functions (and signatures) as `double_sparse_ref`, which they are tested against. Shapes: B sequences,
Hq query heads, Hkv KV heads (group G = Hq // Hkv), D head dim, r label channels, S_max the longest context.

- `ds_label_scores`: grid (B, S tiles). One program reads a tile of every KV head's labels (contiguous per
  token) once and scores it for all query rows with one block-diagonal tensor-core dot ([rows, Hkv r] x
  [Hkv r, tile]).
- `ds_topk`: `torch.topk(sorted=False)`, or with method="radix" our own radix select (`radix_topk`: a few
  histogram passes and a compaction, each reading the scores once), or with method="filter" a sampled pivot
  that filters each row to ~1.5k candidates for `torch.topk` (`filter_topk`), plus an exact shortcut for rows whose
  context fits in the budget: every position is kept, in order, with the -1 tail. No host sync.
- `ds_sparse_attention`: flash-decoding over the selected positions only. idx has one row per query head
  (the contract) or one per KV head (`kv_group` selection: the group shares its tokens, so each gathered K/V
  row serves G query heads, as in the dense kernel). Split-K over the selected list, then a merge kernel.

Why a shared selection exists: with GQA, per-query-head selection gathers k tokens for each of the G heads
of a group, while dense decode reads each KV row once for the whole group, so the bytes saved at 1/16 tokens
are only 16 / G (4x for Llama-3-8B); a shared selection keeps the full 16x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmstack.engine.attention.filter_topk import filter_topk
from lmstack.engine.attention.radix_topk import radix_topk
from lmstack.engine.attention.triton_paged import (
    _LOG2E,
    _MAX_SPLITS,
    _dot_precision,
    _kv_tile,
    _sm_count,
    choose_num_splits,
    online_softmax_tile,
)

TOPK_METHODS = ("torch", "radix", "filter")
_SCORE_TILE = 256  # tokens per label-scoring program (fewer when Hkv x r is wide)


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _label_scores_kernel(
    q_ptr, lab_ptr, scale_ptr, tables_ptr, seq_lens_ptr, out_ptr,
    stride_qb, stride_qh,
    stride_lb, stride_lt,
    stride_sb, stride_st,
    stride_bt, stride_ob, stride_oh,
    s_max, sink, local,
    ROWS: tl.constexpr, ROWS_PER_KV: tl.constexpr, R: tl.constexpr, HR: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_HR: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (sequence, token tile): the scores of every query row; -inf past the sequence's end, +inf at the
    forced positions (the first `sink` and the last `local` of the sequence).

    A token's labels for all KV heads are one contiguous run of HR = Hkv * r values, so the tile is read as
    one coalesced [BLOCK_N, HR] block. Each query row only meets its own KV head's r columns: q is loaded
    block-diagonally (zero outside them), and one tensor-core dot gives every row's scores at once.
    """
    b = tl.program_id(0)
    tile = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    row = tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_HR)
    tok = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row < ROWS
    out = out_ptr + b.to(tl.int64) * stride_ob + row[:, None].to(tl.int64) * stride_oh + tok[None, :]
    out_mask = row_mask[:, None] & (tok < s_max)[None, :]
    if tile * BLOCK_N >= seq_len:
        tl.store(out, tl.full([BLOCK_ROWS, BLOCK_N], float("-inf"), tl.float32).to(out_ptr.dtype.element_ty),
                 mask=out_mask)
        return
    valid = tok < seq_len
    kv_of_row = row // ROWS_PER_KV
    own = row_mask[:, None] & ((col // R)[None, :] == kv_of_row[:, None]) & (col < HR)[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + row[:, None] * stride_qh + (col % R)[None, :],
                mask=own, other=0.0)  # [BLOCK_ROWS, BLOCK_HR], block-diagonal
    block = tl.load(tables_ptr + b.to(tl.int64) * stride_bt + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slot = tok % BLOCK_SIZE
    lab = tl.load(lab_ptr + block[:, None] * stride_lb + slot[:, None] * stride_lt + col[None, :],
                  mask=valid[:, None] & (col < HR)[None, :], other=0)  # [BLOCK_N, BLOCK_HR]
    s = tl.dot(q, tl.trans(lab.to(q.dtype)), input_precision=DOT_PRECISION)  # [BLOCK_ROWS, BLOCK_N] fp32
    if QUANT:
        scale = tl.load(scale_ptr + block[None, :] * stride_sb + slot[None, :] * stride_st + kv_of_row[:, None],
                        mask=row_mask[:, None] & valid[None, :], other=0.0)
        s = s * scale.to(tl.float32)
    forced = (tok < sink) | (tok >= seq_len - local)
    s = tl.where(forced[None, :], float("inf"), s)
    s = tl.where(valid[None, :], s, float("-inf"))
    tl.store(out, s.to(out_ptr.dtype.element_ty), mask=out_mask)


def ds_label_scores(
    q_label: torch.Tensor,
    label_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    label_scale: torch.Tensor | None = None,
    *,
    max_seq_len: int | None = None,
    out_dtype: torch.dtype = torch.float32,
    sink: int = 0,
    local: int = 0,
) -> torch.Tensor:
    """Approximate (unscaled) scores q_label · label of every cached token; see `double_sparse_ref`.

    q_label [B, Hq, r] (or [B, Hkv, r]: one query per KV group) · label_cache [num_blocks, block_size, Hkv,
    r] (16-bit, or int8 with label_scale [num_blocks, block_size, Hkv]) · block_tables [B, max_blocks] int32 ·
    seq_lens [B] int32 → scores [B, rows, S_max] (summed in fp32, stored as out_dtype), -inf at positions
    >= seq_len, +inf at the forced ones (< sink, or >= seq_len - local). `max_seq_len` (the batch's longest
    context, known on the host) avoids reading seq_lens back from the device.
    """
    batch, rows, r = q_label.shape
    block_size, n_kv = label_cache.shape[1], label_cache.shape[2]
    if label_cache.shape[3] != r or rows % n_kv:
        raise ValueError(f"q_label {tuple(q_label.shape)} does not fit label_cache {tuple(label_cache.shape)}")
    quant = label_cache.dtype == torch.int8
    if quant != (label_scale is not None):
        raise ValueError("int8 labels need label_scale, and 16-bit labels take none")
    if block_tables.dtype != torch.int32 or block_size & (block_size - 1):
        raise ValueError("block_tables must be int32 and block_size a power of two")
    s_max = max_seq_len if max_seq_len is not None else (int(seq_lens.max().item()) if batch else 0)
    out = torch.empty(batch, rows, s_max, device=q_label.device, dtype=out_dtype)
    if batch == 0 or s_max == 0:
        return out
    if q_label.stride(-1) != 1:
        q_label = q_label.contiguous()
    if label_cache.stride(3) != 1 or label_cache.stride(2) != r:
        raise ValueError("the label cache must be contiguous over its (KV head, channel) dimensions")
    if quant and label_scale.stride(2) != 1:
        raise ValueError("the label scales must be contiguous over the KV heads")
    scale = label_scale if quant else label_cache  # unused pointer when not quantized
    block_hr = _pow2_at_least_16(n_kv * r)
    block_n = max(16, min(_SCORE_TILE, 16384 // block_hr))  # bounds the [BLOCK_N, HR] tile in registers
    grid = (batch, triton.cdiv(s_max, block_n))
    _label_scores_kernel[grid](
        q_label, label_cache, scale, block_tables, seq_lens, out,
        q_label.stride(0), q_label.stride(1),
        label_cache.stride(0), label_cache.stride(1),
        scale.stride(0), scale.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        s_max, sink, local,
        ROWS=rows, ROWS_PER_KV=rows // n_kv, R=r, HR=n_kv * r,
        BLOCK_ROWS=_pow2_at_least_16(rows), BLOCK_HR=block_hr, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, QUANT=quant, DOT_PRECISION=_dot_precision(q_label),
        num_warps=4,
    )  # fmt: skip
    return out


def ds_topk(scores: torch.Tensor, seq_lens: torch.Tensor, k: int, method: str = "torch") -> torch.Tensor:
    """Positions of the k best scores per row, in no particular order; see `double_sparse_ref.ds_topk`.

    scores [B, H, S_max] · seq_lens [B] → idx [B, H, k] int32. A row whose seq_len <= k keeps every position
    0..seq_len-1 in order and ends in -1; longer rows take the k best of positions < seq_len, by `torch.topk`
    (method "torch": finite scores only, so no position >= seq_len, score -inf, can win) or by `radix_topk`
    (method "radix", which reads positions < seq_len only) or by `filter_topk` (method "filter": a sampled
    pivot, a filter pass, and torch.topk over the ~1.5k candidates). Nothing is read back to the host.
    """
    if method not in TOPK_METHODS:
        raise ValueError(f"top-k method must be one of {', '.join(TOPK_METHODS)}, got {method!r}")
    batch, n_heads, s_max = scores.shape
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    arange = torch.arange(k, device=scores.device, dtype=torch.int32)
    lens = seq_lens.to(device=scores.device, dtype=torch.int32).view(batch, 1, 1)
    whole = torch.where(arange < lens, arange, -1).expand(batch, n_heads, k)  # [B, H, k]: rows within budget
    if s_max <= k:
        return whole.contiguous()
    if method == "radix":
        top = radix_topk(scores, seq_lens, k)  # [B, H, k]; rows with seq_len <= k unwritten: `whole` has them
    elif method == "filter":
        top = filter_topk(scores, seq_lens, k)  # the same contract as radix_topk
    else:
        top = scores.topk(k, dim=-1, sorted=False).indices.to(torch.int32)  # [B, H, k]
    return torch.where(lens <= k, whole, top)


@triton.jit
def _sparse_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, idx_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ib, stride_ih,
    stride_ob, stride_oh,
    n_idx, per_split, num_splits,
    NUM_HEADS: tl.constexpr, ROW_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (sequence, idx row, split): online softmax of the row's ROW_HEADS query heads over its slice of the
    selected positions (ROW_HEADS is 1 for per-head selection, G for a selection shared by the KV group)."""
    b = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_idx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    heads = row * ROW_HEADS + g
    g_mask = g < ROW_HEADS
    kvh = (row * ROW_HEADS) // GROUP
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None], other=0.0)
    table = tables_ptr + b.to(tl.int64) * stride_bt
    idx_row = idx_ptr + b.to(tl.int64) * stride_ib + row * stride_ih
    k_head = k_ptr + kvh * stride_kh + d[None, :]
    v_head = v_ptr + kvh * stride_vh + d[None, :]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + n
        pos = tl.load(idx_row + j, mask=j < hi, other=-1)
        valid = pos >= 0
        pos = tl.where(valid, pos, 0)
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k = tl.load(k_head + block[:, None] * stride_kb + slot[:, None] * stride_kt, mask=valid[:, None], other=0.0)
        v = tl.load(v_head + block[:, None] * stride_vb + slot[:, None] * stride_vt, mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if not SPLIT:
        out = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = (b * NUM_HEADS + heads) * num_splits + split
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(part_o_ptr + part[:, None].to(tl.int64) * HEAD_DIM + d[None, :], o, mask=g_mask[:, None])
        tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit
def _merge_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): splits weighted by their softmax mass; splits that selected nothing weigh 0."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    active = s < num_splits
    part = (b * NUM_HEADS + h) * num_splits + s
    lse = tl.load(part_lse_ptr + part, mask=active, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(part_o_ptr + part[:, None].to(tl.int64) * HEAD_DIM + d[None, :], mask=active[:, None], other=0.0)
    total = tl.sum(w, 0)
    merged = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, merged.to(out_ptr.dtype.element_ty))


def ds_sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Exact softmax attention of each query head over its selected tokens only; see `double_sparse_ref`.

    q [B, Hq, D] · k_cache, v_cache [num_blocks, block_size, Hkv, D] · block_tables [B, max_blocks] int32 ·
    idx [B, Hq, k] int32 token positions, -1 = unused (or [B, Hkv, k]: one list shared by each KV group) →
    out [B, Hq, D] in q's dtype, zeros where nothing is selected. The caches may live in pinned host memory
    (the kernel then reads only the selected rows over the bus).
    """
    batch, n_heads, head_dim = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    rows, n_idx = idx.shape[1], idx.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim or n_heads % n_kv:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not fit q {tuple(q.shape)}")
    if rows not in (n_heads, n_kv) or idx.shape[0] != batch:
        raise ValueError(f"idx must be [{batch}, {n_heads} or {n_kv}, k], got {tuple(idx.shape)}")
    if idx.dtype != torch.int32 or block_tables.dtype != torch.int32:
        raise ValueError("idx and block_tables must be int32")
    if head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError("head_dim and block_size must be powers of two")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the caches' head dimension must be contiguous")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    row_heads = n_heads // rows
    block_n, stages = _kv_tile(head_dim, k_cache.element_size())
    if num_splits is None:
        num_splits = choose_num_splits(batch, rows, n_idx, block_n, _sm_count(q.device))
    num_splits = max(1, min(num_splits, _MAX_SPLITS))
    per_split = triton.cdiv(triton.cdiv(max(n_idx, 1), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(n_idx, 1), per_split)
    if num_splits > 1:
        part_o = torch.empty(batch, n_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch, n_heads, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_o = part_lse = out  # unused by the single-split variant
    _sparse_split_kernel[(batch, rows, num_splits)](
        q, k_cache, v_cache, block_tables, idx, out, part_o, part_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        idx.stride(0), idx.stride(1),
        out.stride(0), out.stride(1),
        n_idx, per_split, num_splits,
        NUM_HEADS=n_heads, ROW_HEADS=row_heads, GROUP=n_heads // n_kv, BLOCK_G=_pow2_at_least_16(row_heads),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=num_splits > 1,
        DOT_PRECISION=_dot_precision(q),
        num_warps=4, num_stages=stages,
    )  # fmt: skip
    if num_splits > 1:
        _merge_kernel[(batch, n_heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1), num_splits,
            NUM_HEADS=n_heads, HEAD_DIM=head_dim, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4 if head_dim * num_splits >= 2048 else 2,
        )  # fmt: skip
    return out
