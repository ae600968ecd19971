"""Triton kernels for attention over the paged KV cache: split-K decode and chunked/mixed prefill.

Both compute exactly what `torch_ref.paged_attention_ref` computes. Layout of the cache:
k_cache, v_cache [num_blocks, block_size, n_kv, D] with the last dim contiguous; block_tables [B, max_blocks]
int32. Queries of one KV group (H // n_kv heads) are handled by one program, so each K/V tile is read once
per group and the group becomes the M dimension of the tensor-core dots.

Decode is memory bound: its grid is (B, n_kv, splits), each split walking one contiguous slice of the
context (flash-decoding), then a small kernel merges the partial (log-sum-exp, normalised output) pairs.
Everything the launch depends on comes from tensor shapes, and lengths are read on the device, so decode can
be captured in a CUDA graph and replayed with any seq_lens (a seq_len of 0 writes zeros and reads nothing).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64  # the merge kernel holds [splits, D] fp32 in registers
_MIN_TILES_PER_SPLIT = 4  # below this, a split's fixed cost (q load, partial write, merge) dominates
_SMEM_BUDGET = 160 * 1024  # bytes of K+V staging for the software pipeline (H100: 227 KB per block)


@functools.cache
def _num_sms(device_index: int) -> int:
    """Multiprocessor count of a CUDA device (a host-side property query: no sync, graph-capture safe)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """SMs to fill; an H100's 132 when not on CUDA (interpreter runs) so the choice of splits matches."""
    if device.type != "cuda":
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _kv_tile(head_dim: int, elem_size: int) -> tuple[int, int]:
    """(tokens per KV tile, pipeline stages) keeping K+V staging inside the shared-memory budget."""
    block_n = 64 if head_dim * elem_size <= 256 else 32
    stage_bytes = 2 * block_n * head_dim * elem_size
    return block_n, max(1, min(3, _SMEM_BUDGET // stage_bytes))


def _check_cache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor
) -> None:
    """Shape checks only (no device reads), so they are free inside a CUDA-graph capture."""
    head_dim = q.shape[-1]
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[3] != head_dim:
        raise ValueError(f"caches must be [num_blocks, block_size, n_kv, {head_dim}]: {tuple(k_cache.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} KV heads")
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    block_size = k_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the caches' head dimension must be contiguous")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")


def _dot_precision(q: torch.Tensor) -> str:
    """fp32 inputs are for checking, so their dots stay exact fp32 rather than tf32 (~1e-3 off)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with a unit-stride last dim; strided views (a slice of a fused qkv output) pass as they are."""
    return x if x.stride(-1) == 1 else x.contiguous()


def choose_num_splits(batch: int, n_kv: int, max_context: int, block_n: int, num_sms: int) -> int:
    """Splits per (sequence, KV head): about two programs per SM, each still long enough to be worth it.

    Small batches with long contexts get many splits; large batches get one (no merge kernel at all). On an
    H100, two programs per SM beat four and eight by 1-7% from B=8 up, and cost 1.6% at B=1 (32K tokens).
    """
    n_tiles = triton.cdiv(max(max_context, 1), block_n)
    want = triton.cdiv(2 * num_sms, batch * n_kv)
    most = max(1, min(_MAX_SPLITS, n_tiles // _MIN_TILES_PER_SPLIT))
    return max(1, min(want, most))


@triton.jit
def online_softmax_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One KV tile of flash-decoding: q [G, D] against k, v [N, D] (rows where `valid` is false count for
    nothing), folded into the running max m_i [G], sum l_i [G] and output acc [G, D] (base-2 exponents:
    qk_scale includes log2(e)). A tile with no valid row leaves the state as it was."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    tokens_per_split, num_splits,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split): online softmax of the group's queries over the split's slice."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None],
        other=0.0,
    )
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh * stride_kh + d[None, :]
    v_head = v_ptr + kvh * stride_vh + d[None, :]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tok = start + n
        valid = tok < hi
        block = tl.load(table + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = tok % BLOCK_SIZE
        k = tl.load(
            k_head + block[:, None] * stride_kb + slot[:, None] * stride_kt, mask=valid[:, None], other=0.0
        )
        v = tl.load(
            v_head + block[:, None] * stride_vb + slot[:, None] * stride_vt, mask=valid[:, None], other=0.0
        )
        m_i, l_i, acc = online_softmax_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if not SPLIT:
        out = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        row = (b * NUM_HEADS + heads) * num_splits + split
        tl.store(part_o_ptr + row[:, None].to(tl.int64) * HEAD_DIM + d[None, :], o, mask=g_mask[:, None])
        tl.store(part_lse_ptr + row, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    part_o_ptr, part_lse_ptr, seq_lens_ptr, out_ptr,
    stride_ob, stride_oh,
    tokens_per_split, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): weight each non-empty split's output by its share of the softmax mass."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    n_active = tl.cdiv(seq_len, tokens_per_split)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    active = (s < n_active) & (s < num_splits)
    row = (b * NUM_HEADS + h) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=active, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(active, tl.exp2(lse - m), 0.0)
    o = tl.load(
        part_o_ptr + row[:, None].to(tl.int64) * HEAD_DIM + d[None, :], mask=active[:, None], other=0.0
    )
    total = tl.sum(w, 0)
    merged = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    out = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d
    tl.store(out, merged.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence over its paged context; CUDA-graph safe.

    q [B, H, D] · k_cache, v_cache [num_blocks, block_size, n_kv, D] · block_tables [B, max_blocks] int32 ·
    seq_lens [B] int32 (context lengths including the new token; 0 marks a padding row, which gets zeros)
    → out [B, H, D] in q's dtype. `max_seq_len` (a host-side bound on seq_lens, default
    max_blocks * block_size) only sharpens the choice of splits; `num_splits` overrides that choice.
    """
    _check_cache(q, k_cache, v_cache, block_tables)
    q = _rows_contiguous(q)
    batch, n_heads, head_dim = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dim")
    if batch == 0:
        return out

    block_n, stages = _kv_tile(head_dim, k_cache.element_size())
    max_context = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(batch, n_kv, max_context, block_n, _sm_count(q.device))
    num_splits = max(1, min(num_splits, _MAX_SPLITS))
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_context, 1), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(max_context, 1), tokens_per_split)

    if num_splits > 1:
        part_o = torch.empty(batch, n_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch, n_heads, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_o = part_lse = out  # unused by the single-split variant
    _decode_split_kernel[(batch, n_kv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        tokens_per_split, num_splits,
        NUM_HEADS=n_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=num_splits > 1, DOT_PRECISION=_dot_precision(q),
        num_warps=4, num_stages=stages,
    )  # fmt: skip
    if num_splits > 1:
        _decode_merge_kernel[(batch, n_heads)](
            part_o, part_lse, seq_lens, out,
            out.stride(0), out.stride(1),
            tokens_per_split, num_splits,
            NUM_HEADS=n_heads, HEAD_DIM=head_dim,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4 if head_dim * num_splits >= 2048 else 2,
        )  # fmt: skip
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query block, sequence, KV head): rows are BLOCK_Q new tokens × the GROUP heads of the KV head.

    KV tiles wholly below the block's first query position need no mask; tiles above its last are skipped.
    """
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (latest) blocks start first
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prior = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    tok = q_block * BLOCK_Q + r // GROUP
    heads = kvh * GROUP + r % GROUP
    row_valid = (r < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = prior + tok
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh * stride_kh + d[None, :]
    v_head = v_ptr + kvh * stride_vh + d[None, :]

    first_pos = prior + q_block * BLOCK_Q
    hi = prior + tl.minimum((q_block + 1) * BLOCK_Q, q_len)  # one past the block's last query position
    full_hi = (first_pos + 1) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, full_hi, BLOCK_N):
        tok_k = start + n
        block = tl.load(table + tok_k // BLOCK_SIZE).to(tl.int64)
        slot = tok_k % BLOCK_SIZE
        k = tl.load(k_head + block[:, None] * stride_kb + slot[:, None] * stride_kt)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + block[:, None] * stride_vb + slot[:, None] * stride_vt)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    for start in range(full_hi, hi, BLOCK_N):
        tok_k = start + n
        valid = tok_k < hi
        block = tl.load(table + tok_k // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = tok_k % BLOCK_SIZE
        k = tl.load(
            k_head + block[:, None] * stride_kb + slot[:, None] * stride_kt, mask=valid[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(tok_k[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_head + block[:, None] * stride_vb + slot[:, None] * stride_vt, mask=valid[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    out = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def _prefill_config(rows: int, head_dim: int, elem_size: int, on_cuda: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) from how many query rows the longest sequence brings.

    On an H100 (bf16, D=128) 128×128 tiles with 8 warps won for long prompts (380 TFLOP/s at 8K tokens),
    64×64 with 4 warps for shorter ones, where having more programs matters more than tile efficiency.
    """
    row_bytes = head_dim * elem_size
    if on_cuda and row_bytes <= 256 and rows >= 4096:
        return 128, 128, 8, 3
    # Wide rows (D=256, or fp32) shrink the q tile and accumulator so they stay in registers.
    block_m = min(64, max(16, triton.next_power_of_2(rows)), max(16, 32768 // row_bytes))
    block_n, stages = _kv_tile(head_dim, elem_size)
    return block_m, block_n, 4, stages if on_cuda else 1


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context (chunked prefill, mixed batches).

    q [T, H, D] packed by query_start_loc [B+1] int32 · seq_lens [B] int32 (prior context + new tokens,
    whose K/V are already cached) · max_query_len: host-side bound on per-sequence new tokens → [T, H, D].
    """
    _check_cache(q, k_cache, v_cache, block_tables)
    q = _rows_contiguous(q)
    n_tokens, n_heads, head_dim = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    batch = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dim")
    if n_tokens == 0 or batch == 0 or max_query_len <= 0:
        return out

    block_m, block_n, warps, stages = _prefill_config(
        max_query_len * group, head_dim, k_cache.element_size(), q.is_cuda
    )
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), batch, n_kv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
