"""The reference attention over a paged KV cache: plain torch, CPU and GPU, the truth every kernel is tested against."""

from __future__ import annotations

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's first `seq_len` cached vectors, in order.

    cache [num_blocks, block_size, n_kv, D] · block_table [max_blocks] → [seq_len, n_kv, D]
    """
    block_size = cache.shape[1]
    n_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()
    return cache[blocks].reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q [T, H, D] (the new tokens of B sequences, packed) · k_cache, v_cache [num_blocks, block_size, n_kv, D]
    · block_tables [B, max_blocks] · query_start_loc: B+1 offsets into q · seq_lens: B context lengths
    *including* the new tokens (whose K/V are already in the cache) → out [T, H, D].
    Query j of a sequence with L new tokens sits at position seq_len - L + j and sees keys 0..that position.
    """
    out = torch.empty_like(q)
    n_heads = q.shape[1]
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end == start:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len)  # [S, n_kv, D]
        v = gather_kv(v_cache, block_tables[i], seq_len)
        group = n_heads // k.shape[1]
        qi = q[start:end].transpose(0, 1).float()  # [H, L, D]
        ki = k.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [H, S, D]
        vi = v.repeat_interleave(group, dim=1).transpose(0, 1).float()
        n_new = end - start
        q_pos = torch.arange(seq_len - n_new, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores = (qi @ ki.transpose(1, 2)) * scale  # [H, L, S]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ vi).transpose(0, 1).to(q.dtype)
    return out
