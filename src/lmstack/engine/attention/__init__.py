"""Attention backends over the paged KV cache, by name: `ATTENTION_BACKENDS["torch"]`, `["triton"]`.

A backend is the `ctx` the model calls as `ctx.attention(layer, q, k, v, scale)`: it stores the new
K/V in the cache and attends with the metadata of the current step (set by the model runner).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from lmstack.engine.attention.torch_ref import gather_kv, paged_attention_ref
from lmstack.errors import LmstackError

GRAPH_SHORT_CONTEXT = 2048


@dataclass
class AttentionMetadata:
    """Where the step's T new tokens of B sequences go and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [T] int64: flat KV slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B+1] int32: offsets of each sequence's new tokens in the batch
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    graph_bound: bool = False  # a captured decode graph: max_seq_len is the graph's context bound (>= every
    # row's seq_len, which lives on the device only) and seq_lens_cpu are placeholders

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend:
    """The reference backend; subclasses override `paged` with faster versions of the same function."""

    name = "reference"
    supports_cuda_graphs = False
    # Steps of short chunks that all sample (speculative verification) can be captured too: `paged` reads
    # every length from the device and takes the padding the runner adds (see runner.py).
    supports_chunk_graphs = False
    lazy_graphs = False  # capture each (batch size, context bound) graph on first use, not all up front

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        self.kv_caches = kv_caches
        self.meta: AttentionMetadata | None = None
        self.timed: list[tuple[Any, Any]] | None = None  # when a list: (start, end) marks of each attention call

    @classmethod
    def create(cls, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None, model_cfg: Any,
               options: dict[str, Any]) -> AttentionBackend:
        """Build the engine's backend from its `attention_options`; backends with settings override this."""
        if options:
            raise LmstackError(f"the {cls.name!r} attention backend takes no options, got {', '.join(options)}")
        return cls(kv_caches)

    def graph_contexts(self, max_model_len: int) -> list[int]:
        """Context bounds decode graphs are captured for; a step replays the smallest bound >= its longest row.
        A short bound beside the longest lets the decode kernel split short contexts finely."""
        return sorted({min(GRAPH_SHORT_CONTEXT, max_model_len), max_model_len})

    @classmethod
    def cache_bytes_per_token(cls, model_cfg: Any, dtype: torch.dtype, options: dict[str, Any]) -> int:
        """Device bytes the backend keeps per cached token beside K and V, over all layers (e.g. labels)."""
        return 0

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, Hkv, Dh] into their slots; index_copy_ keeps it a single graph-capturable op."""
        k_cache, v_cache = self.kv_caches[layer]
        slots = self.meta.slot_mapping
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.kv_caches is None:
            return _no_cache_attention(q, k, v, self.meta.query_start_loc_cpu, scale)
        self.write_kv(layer, k, v)
        k_cache, v_cache = self.kv_caches[layer]
        if self.timed is None:
            return self.paged(q, k, v, k_cache, v_cache, scale)
        start = _mark(q.device)
        out = self.paged(q, k, v, k_cache, v_cache, scale)
        self.timed.append((start, _mark(q.device)))
        return out

    def timed_seconds(self) -> float:
        """Total time of the attention calls marked since `timed` was set (synchronizes the device)."""
        if not self.timed:
            return 0.0
        if isinstance(self.timed[0][0], float):
            return sum(e - s for s, e in self.timed)
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.timed) / 1e3

    def paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        m = self.meta
        return paged_attention_ref(q, k_cache, v_cache, m.block_tables, m.query_start_loc_cpu, m.seq_lens_cpu, scale)


def _mark(device: torch.device) -> Any:
    """A point in time on the device's stream: a CUDA event, or the host clock on CPU (which is synchronous)."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: int) -> torch.Tensor:
    """q [L, H, Dh] at positions offset..offset+L-1 over k, v [S, Hkv, Dh] at 0..S-1 → [L, H, Dh].

    The inputs get a batch dimension because CUDA's flash and memory-efficient kernels take only 4-D inputs: a
    3-D call falls back to the math kernel, which holds the [H, L, S] scores in fp32 (16 GiB for one 8K prompt
    of a 32-head model, which is what the engine's memory probe then leaves out of the KV cache)."""
    group = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, L, Dh]
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)  # [1, H, S, Dh]
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
    if offset == 0:
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        L, S = q.shape[0], k.shape[0]
        mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(offset, offset + L, device=q.device)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def _no_cache_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qsl: list[int], scale: float
) -> torch.Tensor:
    """Plain causal attention within each packed sequence (scoring full texts, e.g. perplexity)."""
    out = torch.empty_like(q)
    for i in range(len(qsl) - 1):
        s, e = qsl[i], qsl[i + 1]
        out[s:e] = _sdpa_causal(q[s:e], k[s:e], v[s:e], scale, 0)
    return out


class TorchAttention(AttentionBackend):
    """Vectorized torch: decode batched by length groups, SDPA per sequence for prefill. CPU and GPU."""

    name = "torch"

    def paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        m = self.meta
        if m.is_decode:
            return _decode_grouped(q, k_cache, v_cache, m.block_tables, m.seq_lens_cpu, scale)
        out = torch.empty_like(q)
        qsl = m.query_start_loc_cpu
        for i, seq_len in enumerate(m.seq_lens_cpu):
            s, e = qsl[i], qsl[i + 1]
            if e - s == seq_len:  # the whole context is new: attend over this step's k/v directly
                out[s:e] = _sdpa_causal(q[s:e], k[s:e], v[s:e], scale, 0)
            else:
                kc = gather_kv(k_cache, m.block_tables[i], seq_len)
                vc = gather_kv(v_cache, m.block_tables[i], seq_len)
                out[s:e] = _sdpa_causal(q[s:e], kc, vc, scale, seq_len - (e - s))
        return out


def _length_groups(seq_lens: list[int], waste: float = 1.3) -> list[list[int]]:
    """Batch rows grouped by similar length, so padding each group to its longest wastes little."""
    order = sorted(range(len(seq_lens)), key=seq_lens.__getitem__)
    groups: list[list[int]] = []
    total = 0
    for i in order:
        n = seq_lens[i]
        if groups and n * (len(groups[-1]) + 1) <= waste * (total + n):
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def _decode_grouped(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: list[int], scale: float) -> torch.Tensor:
    """One query per sequence. Each length group gathers its context once, straight into [Hkv, b, S, Dh]
    (head-major, so the matmuls need no further copies), and masks its padding."""
    B, H, Dh = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    k_heads = k_cache.view(-1, Hkv, Dh).permute(1, 0, 2)  # [Hkv, slots, Dh] (a view)
    v_heads = v_cache.view(-1, Hkv, Dh).permute(1, 0, 2)
    out = torch.empty_like(q)
    offsets = torch.arange(bs, device=q.device)
    for rows in _length_groups(seq_lens):
        idx = torch.tensor(rows, device=q.device)
        S = max(seq_lens[i] for i in rows)
        nb = -(-S // bs)
        slots = (block_tables[idx, :nb].long()[:, :, None] * bs + offsets).reshape(len(rows), nb * bs)[:, :S]
        k = k_heads[:, slots]  # [Hkv, b, S, Dh]
        v = v_heads[:, slots]
        qg = q[idx].view(len(rows), Hkv, H // Hkv, Dh).transpose(0, 1)  # [Hkv, b, G, Dh]
        scores = (qg @ k.transpose(-1, -2)).float() * scale  # [Hkv, b, G, S]
        lens = torch.tensor([seq_lens[i] for i in rows], device=q.device)
        pad = torch.arange(S, device=q.device)[None, :] >= lens[:, None]  # [b, S]
        scores.masked_fill_(pad[None, :, None, :], float("-inf"))
        o = scores.softmax(-1).to(v.dtype) @ v  # [Hkv, b, G, Dh]
        out[idx] = o.transpose(0, 1).reshape(len(rows), H, Dh)
    return out


class TritonAttention(AttentionBackend):
    """CUDA: Triton paged kernels for decode and for prefill/mixed steps; decode is graph-capturable."""

    name = "triton"
    supports_cuda_graphs = True
    supports_chunk_graphs = True

    def paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        from lmstack.engine.attention import triton_paged

        m = self.meta
        if m.is_decode:
            return triton_paged.paged_decode_attention(q, k_cache, v_cache, m.block_tables, m.seq_lens, scale,
                                                       max_seq_len=m.max_seq_len)
        return triton_paged.paged_prefill_attention(
            q, k_cache, v_cache, m.block_tables, m.query_start_loc, m.seq_lens, m.max_query_len, scale
        )


from lmstack.engine.attention.double_sparse import DoubleSparseAttention  # noqa: E402 (it subclasses the above)

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "reference": AttentionBackend,
    "torch": TorchAttention,
    "triton": TritonAttention,
    "double_sparse": DoubleSparseAttention,
}
