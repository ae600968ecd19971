"""Double Sparsity in plain torch (CPU and GPU): the truth the Triton kernels are tested against.

Decode (one new query per sequence) runs in three steps: estimate every cached token's score from the
label cache (the r calibrated channels of K), keep the top-k tokens per query head, and attend exactly
(softmax over the kept tokens only). The first `sink` and last `local` tokens of a context may be forced
into the top-k (their estimate is set to +inf): they take that many of the k places whatever the labels say.
Shapes: B sequences, Hq query heads, Hkv KV heads (GQA group G = Hq // Hkv; query head h reads KV head
h // G), D head dim, r label channels, S_max the longest context.
Label cache and KV cache share one paged layout [num_blocks, block_size, Hkv, ·] and one block table.

`ds_causal_attention` is the same rule applied to every position of a prompt (each query attends to the
top-k of its own causal past): the mode perplexity is measured in.
"""

from __future__ import annotations

import torch


def _positions_to_slots(block_tables: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token positions [B, ...] (>= 0) of each row's sequence → flat slots [B, ...] of the paged cache."""
    rows = torch.arange(block_tables.shape[0], device=pos.device).view(-1, *([1] * (pos.dim() - 1)))
    return block_tables.long()[rows, pos // block_size] * block_size + pos % block_size


def dequantize_labels(label_cache: torch.Tensor, label_scale: torch.Tensor | None) -> torch.Tensor:
    """int8 labels [..., Hkv, r] × fp16 scale [..., Hkv] → float32 labels; 16-bit labels pass through as float32."""
    if label_scale is None:
        return label_cache.float()
    return label_cache.float() * label_scale.float().unsqueeze(-1)


def quantize_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [T, Hkv, r] → (int8 [T, Hkv, r], fp16 scale [T, Hkv]): symmetric, one scale per token and head.

    The error of each entry is at most scale / 2 = max|label| / 254 (plus fp16 rounding of the scale).
    """
    amax = labels.float().abs().amax(-1)  # [T, Hkv]
    scale = (amax / 127.0).clamp_min(1e-8).half()
    q = torch.round(labels.float() / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


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
    """Approximate (unscaled) scores q_label · label of every cached token.

    q_label [B, Hq, r] (the query's calibrated channels; or [B, Hkv, r], one query per KV group) · label_cache
    [num_blocks, block_size, Hkv, r] (16-bit, or int8 with label_scale [num_blocks, block_size, Hkv]) ·
    block_tables [B, max_blocks] int32 · seq_lens [B] int32 → scores [B, Hq, S_max] float32, -inf at
    positions >= seq_len, summed in fp32 and returned as `out_dtype`, +inf at the forced positions (< sink,
    or >= seq_len - local). `max_seq_len` is the batch's longest context when the caller knows it.
    """
    B, Hq, r = q_label.shape
    block_size, Hkv = label_cache.shape[1], label_cache.shape[2]
    s_max = max_seq_len if max_seq_len is not None else (int(seq_lens.max().item()) if B else 0)
    pos = torch.arange(s_max, device=q_label.device).expand(B, s_max)
    valid = pos < seq_lens.to(q_label.device).long()[:, None]  # [B, S]
    slots = _positions_to_slots(block_tables, pos.clamp(max=block_tables.shape[1] * block_size - 1), block_size)
    flat = label_cache.reshape(-1, Hkv, r)
    flat_scale = None if label_scale is None else label_scale.reshape(-1, Hkv)
    labels = dequantize_labels(flat[slots], None if flat_scale is None else flat_scale[slots])  # [B, S, Hkv, r]
    q_grouped = q_label.float().view(B, Hkv, Hq // Hkv, r)
    scores = torch.einsum("bngr,bsnr->bngs", q_grouped, labels).reshape(B, Hq, s_max)  # [B, Hq, S]
    forced = valid & ((pos < sink) | (pos >= seq_lens.to(q_label.device).long()[:, None] - local))  # [B, S]
    scores = scores.masked_fill(forced[:, None, :], float("inf"))
    return scores.masked_fill(~valid[:, None, :], float("-inf")).to(out_dtype)


def ds_topk(scores: torch.Tensor, seq_lens: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k best scores per (sequence, head), best first.

    scores [B, Hq, S_max] · seq_lens [B] → idx [B, Hq, k] int32; a position >= seq_len is never chosen and
    rows with seq_len < k end in -1.
    """
    B, Hq, s_max = scores.shape
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    take = min(k, s_max)
    idx = torch.full((B, Hq, k), -1, dtype=torch.int32, device=scores.device)
    if take == 0:
        return idx
    top = scores.topk(take, dim=-1).indices  # [B, Hq, take]
    lens = seq_lens.to(scores.device).long().view(B, 1, 1)
    idx[..., :take] = torch.where(top < lens, top, torch.full_like(top, -1)).int()
    return idx


def ds_sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Exact softmax attention of each query head over its selected tokens only.

    q [B, Hq, D] · k_cache, v_cache [num_blocks, block_size, Hkv, D] · block_tables [B, max_blocks] · idx
    [B, Hq, k] token positions (-1 = unused), or [B, Hkv, k]: one list shared by each KV group → out [B, Hq, D]
    in q's dtype (zeros where nothing is selected).
    """
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    if idx.shape[1] != Hq:
        idx = idx.repeat_interleave(Hq // idx.shape[1], dim=1)
    used = idx >= 0  # [B, Hq, k]
    slots = _positions_to_slots(block_tables, idx.long().clamp(min=0), block_size)  # [B, Hq, k]
    kv_head = (torch.arange(Hq, device=q.device) // (Hq // Hkv)).view(1, Hq, 1)
    keys = k_cache.reshape(-1, Hkv, D)[slots, kv_head].float()  # [B, Hq, k, D]
    values = v_cache.reshape(-1, Hkv, D)[slots, kv_head].float()
    scores = torch.einsum("bhd,bhkd->bhk", q.float(), keys) * scale
    scores = scores.masked_fill(~used, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # a row with nothing selected → all-zero weights
    return torch.einsum("bhk,bhkd->bhd", probs, values).to(q.dtype)


def budget_per_position(ctx_lens: torch.Tensor, token_budget: float | int, dense_below: int) -> torch.Tensor:
    """How many tokens each query keeps: all of its context under `dense_below`, else the budget.

    ctx_lens [L] (context length of each query, itself included) → keep [L] long. A float budget in (0, 1] is
    a fraction of the context (rounded up), an int is an absolute count; never more than the context.
    """
    if isinstance(token_budget, float):
        keep = torch.ceil(ctx_lens.double() * token_budget).long()
    else:
        keep = torch.full_like(ctx_lens, int(token_budget))
    keep = torch.minimum(keep.clamp_min(1), ctx_lens)
    return torch.where(ctx_lens < dense_below, ctx_lens, keep)


def forced_counts(keep: int, sink: int, local: int) -> tuple[int, int]:
    """(sink, local) tokens forced into a budget of `keep`: the recent ones first, never more than `keep`."""
    local = min(local, keep)
    return min(sink, keep - local), local


def ds_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    channels: torch.Tensor,
    token_budget: float | int,
    dense_below: int,
    scale: float,
    offset: int = 0,
    quantized_labels: bool = False,
    head_chunk: int = 4,
    shared: bool = False,
    sink: int = 0,
    local: int = 0,
) -> torch.Tensor:
    """Every query attends exactly to the top-k tokens of its own causal past, ranked by the label estimate.

    q [L, Hq, D] at positions offset..offset+L-1 · k, v [S, Hkv, D] at 0..S-1 (S = offset + L) · channels
    [Hkv, r] · the budget rule of `budget_per_position` → out [L, Hq, D]. `quantized_labels` estimates from
    int8-rounded key labels, as the 8-bit label cache stores them. `shared` ranks tokens once per KV head by
    the group's summed label scores (the `kv_group` selection). Each query's first `sink` and last `local`
    tokens are forced in, counted as `forced_counts` does for a decode row. Query heads are processed
    `head_chunk` at a time to bound the [heads, L, S] score matrices.
    """
    L, Hq, D = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    group = Hq // Hkv
    q_pos = torch.arange(offset, offset + L, device=q.device)
    causal = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # [L, S]
    keep = budget_per_position(q_pos + 1, token_budget, dense_below)  # [L]
    k_max = int(keep.max().item())
    rank_ok = torch.arange(k_max, device=q.device)[None, :] < keep[:, None]  # [L, k_max]
    n_local = keep.clamp(max=local)  # [L]
    n_sink = (keep - n_local).clamp(max=sink)
    pos = torch.arange(S, device=q.device)[None, :]
    forced = causal & ((pos < n_sink[:, None]) | (pos > q_pos[:, None] - n_local[:, None]))  # [L, S]
    out = torch.empty_like(q)
    for h0 in range(0, Hq, head_chunk):
        heads = torch.arange(h0, min(Hq, h0 + head_chunk), device=q.device)
        kv_heads = heads // group
        qh = q[:, heads].transpose(0, 1).float()  # [h, L, D]
        kh = k[:, kv_heads].transpose(0, 1).float()  # [h, S, D]
        vh = v[:, kv_heads].transpose(0, 1).float()
        ch = channels.to(q.device)[kv_heads]  # [h, r]; the channel table may live on the CPU
        k_lab = torch.gather(kh, 2, ch[:, None, :].expand(-1, S, -1))  # [h, S, r]
        if quantized_labels:
            k_lab = dequantize_labels(*quantize_labels(k_lab))
        if shared:  # each head ranks by its whole group's summed query labels
            group_q = q[:, (kv_heads[:, None] * group + torch.arange(group, device=q.device)).flatten()]
            q_lab = torch.gather(group_q.view(L, len(heads), group, D).float().sum(2).transpose(0, 1), 2,
                                 ch[:, None, :].expand(-1, L, -1))  # [h, L, r]
        else:
            q_lab = torch.gather(qh, 2, ch[:, None, :].expand(-1, L, -1))  # [h, L, r]
        approx = (q_lab @ k_lab.transpose(1, 2)).masked_fill(~causal, float("-inf"))  # [h, L, S]
        approx = approx.masked_fill(forced, float("inf"))
        top = approx.topk(k_max, dim=-1).indices  # [h, L, k_max]
        chosen = torch.zeros_like(approx, dtype=torch.bool)
        chosen.scatter_(2, top, rank_ok.expand(len(heads), -1, -1))
        exact = (qh @ kh.transpose(1, 2)) * scale
        exact = exact.masked_fill(~(chosen & causal), float("-inf"))
        out[:, heads] = (exact.softmax(-1) @ vh).transpose(0, 1).to(q.dtype)
    return out
