"""Decode with the KV cache in pinned host memory: Double Sparsity offload and the FlexGen-style baseline.

When the KV cache does not fit on the GPU it lives in host memory, and a decode step is bound by the bytes
that cross the bus. Two ways to attend over it, both driven by the model's usual `ctx.attention` call:

- `FullKVStreaming` (FlexGen-style baseline): each layer's whole K/V pool is copied to the GPU (a plain
  pinned-memory copy at full bus speed), double-buffered on a side stream two layers ahead, then dense paged
  attention runs on the copy.
- `DoubleSparseOffload` (arXiv 2408.07092, section 4.3): only the label cache (r channels of K per token)
  lives on the GPU. A query scores the labels, keeps the top-k past tokens (of which the first `sink_tokens`
  and the last `local_tokens` are taken whatever the labels say, as in the `double_sparse` backend), and a
  Triton kernel reads just those K/V rows out of host memory (zero-copy: pinned memory is mapped into the
  GPU's address space) into a small GPU buffer, where the dense kernel attends to them plus the current
  token. With `prefetch` (the paper's scheme) layer i+1's selection and fetch run on a side stream while
  layer i computes: layer i's attention input, projected with layer i+1's query weights, stands in for layer
  i+1's query (the residual stream changes little between consecutive layers). Layer 0 selects with its true query.

Selection is per query head (as the `double_sparse` backend does) or, with `selection="kv_group"`, one list
per KV head from the group's summed label scores, which moves G times fewer bytes under GQA.
Prefill attends densely (the prompt's own K/V are on the GPU; earlier chunks are read back from the host).
These are not engine backends: the engine's runner owns a device-resident cache. On a CPU (tests) host and
device memory coincide, streams are skipped and the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import triton

from lmstack.engine.attention import AttentionBackend, _sdpa_causal
from lmstack.engine.attention.double_sparse import check_forced_tokens, parse_budget
from lmstack.engine.attention.double_sparse_ref import forced_counts
from lmstack.engine.attention.double_sparse_triton import ds_label_scores, ds_topk
from lmstack.engine.attention.ds_host_kv import HostKVCache, gather_rows
from lmstack.engine.attention.torch_ref import gather_kv
from lmstack.engine.attention.triton_paged import paged_decode_attention
from lmstack.errors import LmstackError

_BUF_BLOCK = 16  # block size of the gathered-KV buffer, which the dense decode kernel reads as a paged cache


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def _on(stream: torch.cuda.Stream | None) -> Any:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(device: torch.device) -> torch.cuda.Event | None:
    """An event at the current point of the current stream (None on CPU, where everything is in order)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _wait(event: torch.cuda.Event | None) -> None:
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


class _HostKVAttention(AttentionBackend):
    """Shared by both offload modes: new K/V go to the host cache; prefill attends densely."""

    def __init__(self, host: HostKVCache) -> None:
        super().__init__(None)
        self.host = host
        self.device = host.device
        self.num_layers = len(host.k)
        self.side = _side_stream(self.device)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.host.write(layer, k, v, self.meta.slot_mapping)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        self.store(layer, k, v)
        if self.meta.is_decode:
            return self.decode(layer, q, k, v, scale)
        return self.prefill(layer, q, k, v, scale)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Dense causal attention per sequence; a chunk after earlier ones reads its context back from the host."""
        m = self.meta
        out = torch.empty_like(q)
        qsl, lens = m.query_start_loc_cpu, m.seq_lens_cpu
        tables = None
        for i, seq_len in enumerate(lens):
            s, e = qsl[i], qsl[i + 1]
            if e - s == seq_len:
                out[s:e] = _sdpa_causal(q[s:e], k[s:e], v[s:e], scale, 0)
                continue
            if tables is None:
                tables = m.block_tables.cpu()  # waits for the stream, so this step's host writes have landed
            kc = gather_kv(self.host.k[layer], tables[i], seq_len).to(q.device)
            vc = gather_kv(self.host.v[layer], tables[i], seq_len).to(q.device)
            out[s:e] = _sdpa_causal(q[s:e], kc, vc, scale, seq_len - (e - s))
        return out


class FullKVStreaming(_HostKVAttention):
    """FlexGen-style: stream each layer's whole K/V pool to the GPU, two layers ahead, and attend densely."""

    name = "full_kv_streaming"

    def __init__(self, host: HostKVCache) -> None:
        super().__init__(host)
        shape, dtype = host.k[0].shape, host.k[0].dtype
        self.staging = [(torch.empty(shape, dtype=dtype, device=self.device),
                         torch.empty(shape, dtype=dtype, device=self.device)) for _ in range(2)]
        self.ready: dict[int, torch.cuda.Event | None] = {}  # layer → its staged copy is (being) made

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        self.ready.clear()  # copies in flight predate these writes
        return super().prefill(layer, q, k, v, scale)

    def _stream_in(self, layer: int) -> None:
        """Copy layer's K/V pool into staging buffer layer % 2 on the side stream, after what is queued so far."""
        after = _record(self.device)
        with _on(self.side):
            _wait(after)
            sk, sv = self.staging[layer % 2]
            sk.copy_(self.host.k[layer], non_blocking=True)
            sv.copy_(self.host.v[layer], non_blocking=True)
            self.ready[layer] = _record(self.device)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        m = self.meta
        for j in (layer, layer + 1):
            if j < self.num_layers and j not in self.ready:
                self._stream_in(j)
        _wait(self.ready.pop(layer))
        sk, sv = self.staging[layer % 2]
        # The copy predates this token's host write: put the token into the staged copy as well.
        sk.view(-1, *sk.shape[2:]).index_copy_(0, m.slot_mapping, k)
        sv.view(-1, *sv.shape[2:]).index_copy_(0, m.slot_mapping, v)
        out = paged_decode_attention(q, sk, sv, m.block_tables, m.seq_lens, scale, max_seq_len=m.max_seq_len)
        self._stream_in((layer + 2) % self.num_layers)  # into this layer's buffer, once this attention is done
        return out


@dataclass
class OffloadConfig:
    token_budget: float | int = 1 / 16  # past tokens fetched per query: a fraction of the context, or a count
    dense_below: int = 256  # shorter contexts fetch every past token
    sink_tokens: int = 4  # the context's first tokens, always fetched (they count in the budget)
    local_tokens: int = 16  # the most recent past tokens, always fetched (they count in the budget)
    selection: str = "head"  # head: one top-k list per query head; kv_group: one per KV head (GQA)
    prefetch: bool = True  # select and fetch layer i+1 on a side stream while layer i computes

    def __post_init__(self) -> None:
        self.token_budget = parse_budget(self.token_budget)
        if self.selection not in ("head", "kv_group"):
            raise LmstackError(f"offload selection must be 'head' or 'kv_group', got {self.selection!r}")
        if not isinstance(self.dense_below, int) or self.dense_below < 0:
            raise LmstackError(f"dense_below must be an integer >= 0, got {self.dense_below!r}")
        check_forced_tokens("offload", self.sink_tokens, self.local_tokens)

    def keep(self, past: int) -> int:
        """Past tokens fetched for a query over `past` cached tokens."""
        if past < self.dense_below:
            return past
        if isinstance(self.token_budget, float):
            return max(1, min(past, math.ceil(past * self.token_budget)))
        return max(1, min(past, self.token_budget))


@dataclass
class _Step:
    """What every layer of one decode step shares (built when the metadata changes)."""

    meta: Any
    past_lens: torch.Tensor  # [B] int32: tokens cached before this step's (the selection pool)
    past_max: int
    k: int  # list width: the largest budget of the batch
    n_sel: torch.Tensor  # [B] long: how many past tokens each sequence fetched
    buf_lens: torch.Tensor  # [B] int32: n_sel + 1 (the current token follows the fetched ones)
    buf_tables: torch.Tensor  # [B, nb] int32: sequence b owns buffer blocks b*nb .. b*nb+nb-1


class DoubleSparseOffload(_HostKVAttention):
    """Label cache on the GPU, K/V on the host; each query fetches only its top-k past tokens' K/V."""

    name = "double_sparse_offload"

    def __init__(self, host: HostKVCache, channels: torch.Tensor, config: OffloadConfig | None = None,
                 model: torch.nn.Module | None = None, max_batch: int = 1, max_context: int | None = None,
                 labels: list[torch.Tensor] | None = None) -> None:
        """channels [layers, Hkv, r]; `model` (needed for prefetch) is the LlamaModel being run; buffers hold
        `max_batch` sequences of up to `max_context` tokens (default: the whole host pool). `labels` shares the
        label cache of another backend over the same host cache (e.g. to compare settings on one cache)."""
        super().__init__(host)
        self.config = config or OffloadConfig()
        num_blocks, block_size, n_kv, head_dim = host.k[0].shape
        if channels.shape[:2] != (self.num_layers, n_kv):
            raise LmstackError(f"channels {tuple(channels.shape)} do not fit {self.num_layers} layers "
                               f"x {n_kv} KV heads")
        if self.config.prefetch and model is None:
            raise LmstackError("prefetch estimates the next layer's query from the model: pass model=")
        self.model = model
        self.channels = channels.to(self.device)
        r, dtype = channels.shape[2], host.k[0].dtype
        self.labels = labels or [torch.zeros(num_blocks, block_size, n_kv, r, dtype=dtype, device=self.device)
                                 for _ in range(self.num_layers)]
        max_context = max_context or num_blocks * block_size
        self.capacity = self.config.keep(max_context) + 1
        self.buf_blocks = triton.cdiv(self.capacity, _BUF_BLOCK)
        self.max_batch = max_batch
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.step: _Step | None = None
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hooks: list[Any] = []
        if self.config.prefetch:
            self.hooks = [layer.self_attn.register_forward_pre_hook(self._capture(i))
                          for i, layer in enumerate(model.layers)]

    def close(self) -> None:
        """Detach the model hooks."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def _capture(self, layer: int) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            self.inputs[layer] = (args[0], args[1])  # the attention input x [T, hidden] and positions [T]
        return hook

    # ----- storage -----
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        super().store(layer, k, v)
        labels = self.labels[layer]
        lab = k.gather(2, self.channels[layer].expand(k.shape[0], -1, -1))  # [T, Hkv, r]
        labels.view(-1, *labels.shape[2:]).index_copy_(0, self.meta.slot_mapping, lab.to(labels.dtype))

    def import_blocks(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Place already computed K/V blocks [n, block_size, Hkv, D] (device tensors) at blocks start..start+n-1:
        into the host cache, and their labels into the label cache."""
        n = k.shape[0]
        self.host.k[layer][start:start + n].copy_(k)
        self.host.v[layer][start:start + n].copy_(v)
        ch = self.channels[layer].view(1, 1, *self.channels[layer].shape).expand(n, k.shape[1], -1, -1)
        self.labels[layer][start:start + n].copy_(k.gather(3, ch))

    def _buffers(self, rows: int, head_dim: int, dtype: torch.dtype) -> None:
        if not self.buffers:
            shape = (self.max_batch * self.buf_blocks, _BUF_BLOCK, rows, head_dim)
            self.buffers = [(torch.empty(shape, dtype=dtype, device=self.device),
                             torch.empty(shape, dtype=dtype, device=self.device)) for _ in range(2)]

    # ----- decode -----
    def _new_step(self) -> _Step:
        m = self.meta
        batch = len(m.seq_lens_cpu)
        if batch > self.max_batch:
            raise LmstackError(f"a decode batch of {batch} exceeds max_batch={self.max_batch}")
        past = [s - 1 for s in m.seq_lens_cpu]
        k = max(self.config.keep(p) for p in past)
        if k + 1 > self.capacity:
            raise LmstackError(f"a context of {max(past) + 1} tokens exceeds max_context of this backend")
        n_sel = torch.tensor([min(k, p) for p in past], device=self.device)
        nb = self.buf_blocks
        tables = (torch.arange(batch, device=self.device)[:, None] * nb + torch.arange(nb, device=self.device))
        self.ready.clear()
        return _Step(meta=m, past_lens=(m.seq_lens - 1).to(torch.int32), past_max=max(past), k=k, n_sel=n_sel,
                     buf_lens=(n_sel + 1).to(torch.int32), buf_tables=tables.to(torch.int32))

    def _select(self, layer: int, q: torch.Tensor, st: _Step) -> None:
        """q [B, Hq, D] (the true query, or an estimate) → its top-k past tokens' K/V into buffer layer % 2."""
        batch, n_heads, head_dim = q.shape
        ch = self.channels[layer]  # [Hkv, r]
        n_kv, r = ch.shape
        group = n_heads // n_kv
        q_label = q.gather(2, ch.repeat_interleave(group, dim=0).expand(batch, -1, -1))  # [B, Hq, r]
        if self.config.selection == "kv_group":
            q_label = q_label.view(batch, n_kv, group, r).sum(2)  # [B, Hkv, r]
        sink, local = forced_counts(st.k, self.config.sink_tokens, self.config.local_tokens)
        scores = ds_label_scores(q_label, self.labels[layer], st.meta.block_tables, st.past_lens,
                                 max_seq_len=st.past_max, sink=sink, local=local)
        if st.k > 0:
            # Descending positions: neighbouring list entries share blocks (and host pages); -1s stay at the tail.
            idx = ds_topk(scores, st.past_lens, st.k).sort(-1, descending=True).values
        else:
            idx = scores.new_empty(*scores.shape[:2], 0).int()
        bk, bv = self.buffers[layer % 2]
        gather_rows(self.host.k[layer], self.host.v[layer], st.meta.block_tables, idx, bk[: batch * self.buf_blocks],
                    bv[: batch * self.buf_blocks], n_heads)

    def _estimate_query(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s query from the previous layer's attention input x [T, hidden] → [T, Hq, D]."""
        attn = self.model.layers[layer].self_attn
        rows = attn.q_size + attn.kv_size
        bias = attn.qkv_proj.bias[:rows] if attn.qkv_proj.bias is not None else None
        qk = torch.nn.functional.linear(x, attn.qkv_proj.weight[:rows], bias)
        t = x.shape[0]
        q, _ = self.model.rotary(qk[:, : attn.q_size].view(t, attn.n_heads, attn.head_dim),
                                 qk[:, attn.q_size:].view(t, attn.n_kv, attn.head_dim), positions)
        return q

    def _prefetch(self, layer: int, st: _Step) -> None:
        """Select and fetch `layer` on the side stream from the previous layer's input, once queued work is done
        (the buffer it fills was last read by the attention two layers back)."""
        x, positions = self.inputs[layer - 1]
        after = _record(self.device)
        with _on(self.side):
            _wait(after)
            if self.side is not None:
                for t in (x, positions, st.past_lens, st.meta.block_tables):
                    t.record_stream(self.side)
            self._select(layer, self._estimate_query(layer, x, positions), st)
            self.ready[layer] = _record(self.device)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.step is None or self.step.meta is not self.meta:
            self.step = self._new_step()
        st = self.step
        batch, n_heads, head_dim = q.shape
        rows = n_heads if self.config.selection == "head" else k.shape[1]
        self._buffers(rows, head_dim, q.dtype)
        if layer in self.ready:
            _wait(self.ready.pop(layer))
        else:
            self._select(layer, q, st)
        bk, bv = self.buffers[layer % 2]
        bk, bv = bk[: batch * self.buf_blocks], bv[: batch * self.buf_blocks]
        # The current token follows the fetched ones: its K/V are here already.
        kv_of_row = torch.arange(rows, device=q.device) * (n_heads // rows) // (n_heads // k.shape[1])
        seq = torch.arange(batch, device=q.device)
        bk.view(batch, -1, rows, head_dim)[seq, st.n_sel] = k[:, kv_of_row]
        bv.view(batch, -1, rows, head_dim)[seq, st.n_sel] = v[:, kv_of_row]
        out = paged_decode_attention(q, bk, bv, st.buf_tables, st.buf_lens, scale, max_seq_len=st.k + 1)
        if self.config.prefetch and layer + 1 < self.num_layers:
            self._prefetch(layer + 1, st)
        return out
