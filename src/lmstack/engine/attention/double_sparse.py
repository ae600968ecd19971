"""The `double_sparse` attention backend: label cache + top-k token attention for decode (arXiv 2408.07092).

Beside the paged KV cache each sparse layer keeps a *label cache* [num_blocks, block_size, Hkv, r]: the r
calibrated channels of every token's K (after RoPE), written at the same slots as K, in the KV dtype or
as int8 with one fp16 scale per token and head. A decode query reads only the labels to estimate its
scores, keeps the top-k tokens per head, and attends exactly to those: r/D of the key bytes plus k/S of
the KV bytes instead of all of them. Of the k places, the first `sink_tokens` and the last `local_tokens`
of the context are taken whatever the labels say: the attention sink and the neighbourhood a language
model leans on most are where a few label channels misrank most costly (on Qwen2.5-Coder-1.5B at 1/16
they cut the wikitext-2 perplexity excess over dense from +39% to +11%).

Prefill stays dense (the technique targets decode), unless `sparse_prefill` asks every prompt position
to attend sparsely to its own causal past: the mode perplexity is measured in. Decode is dense for
sequences shorter than `dense_below` and in `dense_layers`. On CUDA the Triton kernels of
`double_sparse_triton` do the three decode steps when importable, the torch reference elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any

import torch

from lmstack.engine.attention import AttentionBackend, TorchAttention, TritonAttention
from lmstack.engine.attention import double_sparse_ref as ref
from lmstack.engine.attention.ds_channels import resolve_channels
from lmstack.engine.attention.torch_ref import gather_kv
from lmstack.errors import LmstackError
from lmstack.models.config import ModelConfig


def parse_budget(text: str | float | int) -> float | int:
    """"1/16" or "0.0625" → the fraction 0.0625; "256" → 256 tokens. Fractions lie in (0, 1]."""
    if isinstance(text, bool):
        raise LmstackError(f"token budget must be a fraction in (0, 1] or a token count >= 1, got {text!r}")
    if isinstance(text, int | float):
        value: float | int = text
    else:
        s = str(text).strip()
        try:
            if "/" in s:
                num, den = s.split("/", 1)
                value = float(num) / float(den)
            elif s.isdigit():
                value = int(s)
            else:
                value = float(s)
        except (ValueError, ZeroDivisionError):
            raise LmstackError(f"token budget {text!r} is not a fraction like 1/16 or 0.0625 "
                               f"nor a token count like 256") from None
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise LmstackError(f"a fractional token budget must be in (0, 1], got {value}")
    if isinstance(value, int) and value < 1:
        raise LmstackError(f"a token budget count must be >= 1, got {value}")
    return value


def check_forced_tokens(owner: str, sink_tokens: object, local_tokens: object) -> None:
    """Raise unless the sink and local token counts (tokens always attended) are integers >= 0."""
    for name, value in (("sink_tokens", sink_tokens), ("local_tokens", local_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LmstackError(f"{owner} {name} must be an integer >= 0, got {value!r}")


SELECTIONS = ("head", "kv_group")


@dataclass
class DecodePlan:
    """Which rows of a step decode sparsely, worked out once per step rather than once per layer."""

    rows: list[int]  # batch rows that decode sparsely (one query token each, context >= dense_below)
    prefill_rows: list[int]  # rows whose prompt attends sparsely (sparse_prefill only)
    every_row: bool  # every row of the step is a sparse decode row: no gather or scatter needed
    rows_t: torch.Tensor | None  # rows on the device (None when every_row)
    tokens_t: torch.Tensor | None  # their query tokens on the device (None when every_row)
    keeps: list[int]  # tokens each sparse row attends to
    lens: list[int]  # their context lengths


@dataclass
class DoubleSparseConfig:
    """Settings of the backend, given as `LLM(..., attention_backend="double_sparse", attention_options={...})`."""

    channels: str | None = None  # channels.json from `lmstack sparsity calibrate`, or "random" / "first"
    rule: str | None = None  # re-select from the file's statistics: qkc, qk, q, k, random, first (default: the file's)
    r: int | None = None  # label channels per KV head (default: the file's r, or head_dim // 16)
    seed: int = 0  # for the random rule
    token_budget: float | int = 1 / 16  # tokens attended per decode query: fraction of the context, or a count
    sink_tokens: int = 4  # the context's first tokens, always among those attended (they count in the budget)
    local_tokens: int = 16  # the context's most recent tokens, always attended (they count in the budget)
    dense_below: int = 256  # sequences shorter than this decode densely
    dense_layers: list[int] = field(default_factory=list)  # layers that always attend densely (no label cache)
    label_bits: int = 16  # 16: labels in the KV dtype; 8: int8 labels + an fp16 scale per token and head
    sparse_prefill: bool = False  # every prompt position attends to the top-k of its causal past (quality eval)
    selection: str = "head"  # head: top-k per query head; kv_group: one list per KV head from the group's summed scores
    score_bits: int = 32  # 16: approximate scores stored in bf16, halving the top-k's bytes (ties may reorder)
    kernels: str = "auto"  # auto: Triton on CUDA when available; torch: the reference everywhere
    topk: str = "torch"  # Triton path's top-k: torch (torch.topk), radix (radix_topk) or filter (filter_topk);
    # the reference: torch.topk

    def __post_init__(self) -> None:
        self.token_budget = parse_budget(self.token_budget)
        if self.r is not None and (not isinstance(self.r, int) or self.r < 1):
            raise LmstackError(f"double_sparse r must be a positive integer, got {self.r!r}")
        check_forced_tokens("double_sparse", self.sink_tokens, self.local_tokens)
        if not isinstance(self.dense_below, int) or self.dense_below < 0:
            raise LmstackError(f"double_sparse dense_below must be an integer >= 0, got {self.dense_below!r}")
        if self.score_bits not in (16, 32):
            raise LmstackError(f"double_sparse score_bits must be 32 or 16, got {self.score_bits!r}")
        if self.label_bits not in (8, 16):
            raise LmstackError(f"double_sparse label_bits must be 16 or 8, got {self.label_bits!r}")
        if self.selection not in SELECTIONS:
            raise LmstackError(f"double_sparse selection must be one of {', '.join(SELECTIONS)}, "
                               f"got {self.selection!r}")
        if self.topk not in ("torch", "radix", "filter"):
            raise LmstackError(f"double_sparse topk must be torch, radix or filter, got {self.topk!r}")
        if self.kernels not in ("auto", "torch", "triton"):
            raise LmstackError(f"double_sparse kernels must be auto, torch or triton, got {self.kernels!r}")
        if not all(isinstance(i, int) and i >= 0 for i in self.dense_layers):
            raise LmstackError(f"double_sparse dense_layers must be layer indices >= 0, got {self.dense_layers!r}")
        self.dense_layers = sorted(set(self.dense_layers))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> DoubleSparseConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LmstackError(f"unknown double_sparse option(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
        return cls(**options)

    def keep(self, seq_len: int) -> int:
        """Tokens a decode query over `seq_len` cached tokens attends to."""
        if isinstance(self.token_budget, float):
            return max(1, min(seq_len, math.ceil(seq_len * self.token_budget)))
        return max(1, min(seq_len, self.token_budget))


def _decode_ops(device: torch.device, kernels: str) -> ModuleType:
    """The module with ds_label_scores / ds_topk / ds_sparse_attention for this device."""
    if kernels == "torch" or device.type != "cuda":
        if kernels == "triton":
            raise LmstackError("double_sparse kernels='triton' needs a CUDA device")
        return ref
    try:
        from lmstack.engine.attention import double_sparse_triton
    except ModuleNotFoundError as e:
        if kernels == "triton" or e.name not in ("lmstack.engine.attention.double_sparse_triton", "triton"):
            raise
        return ref
    return double_sparse_triton


class DoubleSparseAttention(AttentionBackend):
    name = "double_sparse"
    supports_cuda_graphs = True  # decode graphs keep keep(bound) tokens per row; see `graph_contexts`
    lazy_graphs = True  # one graph per (batch size, context bucket) actually met, not all buckets up front

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None, channels: torch.Tensor,
                 config: DoubleSparseConfig | None = None) -> None:
        """channels [layers, Hkv, r] long: the label channels of every layer's KV heads."""
        super().__init__(kv_caches)
        self.config = config or DoubleSparseConfig()
        layers, hkv, r = channels.shape
        bad = [i for i in self.config.dense_layers if i >= layers]
        if bad:
            raise LmstackError(f"double_sparse dense_layers {bad} do not exist (the model has {layers} layers)")
        device = kv_caches[0][0].device if kv_caches else torch.device("cpu")
        self.channels = [channels[i].to(device) for i in range(layers)]  # per layer [Hkv, r]
        self.sparse_layers = [i not in self.config.dense_layers for i in range(layers)]
        self.label_caches: list[torch.Tensor | None] = [None] * layers
        self.label_scales: list[torch.Tensor | None] = [None] * layers
        self.layer = 0
        self.dense: AttentionBackend | None = None
        self._plan_meta: Any = None
        self._decode_plan: DecodePlan | None = None
        self._q_channel_cache: dict[int, torch.Tensor] = {}
        self.ops = _decode_ops(device, self.config.kernels)
        if kv_caches is not None:
            k0 = kv_caches[0][0]
            if k0.shape[2] != hkv:
                raise LmstackError(f"channels are for {hkv} KV heads but the cache has {k0.shape[2]}")
            self._allocate_labels(k0.shape[0], k0.shape[1], hkv, r, k0.dtype, device)
            self.dense = (TritonAttention if device.type == "cuda" else TorchAttention)(kv_caches)

    def _allocate_labels(self, num_blocks: int, block_size: int, hkv: int, r: int, dtype: torch.dtype,
                         device: torch.device) -> None:
        """Zeroed, like the KV cache: padding slots are read and masked, so they must hold finite values."""
        int8 = self.config.label_bits == 8
        for i, sparse in enumerate(self.sparse_layers):
            if not sparse:
                continue
            shape = (num_blocks, block_size, hkv, r)
            self.label_caches[i] = torch.zeros(shape, dtype=torch.int8 if int8 else dtype, device=device)
            if int8:
                self.label_scales[i] = torch.zeros(shape[:3], dtype=torch.float16, device=device)

    # ----- engine wiring -----
    @classmethod
    def create(cls, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None, model_cfg: ModelConfig,
               options: dict[str, Any]) -> DoubleSparseAttention:
        config = DoubleSparseConfig.from_options(options)
        channels, _ = resolve_channels(config.channels, model_cfg, config.rule, config.r, config.seed)
        return cls(kv_caches, channels, config)

    @classmethod
    def cache_bytes_per_token(cls, model_cfg: ModelConfig, dtype: torch.dtype, options: dict[str, Any]) -> int:
        config = DoubleSparseConfig.from_options(options)
        channels, _ = resolve_channels(config.channels, model_cfg, config.rule, config.r, config.seed)
        hkv, r = channels.shape[1], channels.shape[2]
        per_layer = hkv * r + 2 * hkv if config.label_bits == 8 else hkv * r * torch.empty((), dtype=dtype).itemsize
        sparse = sum(i not in config.dense_layers for i in range(model_cfg.num_hidden_layers))
        return sparse * per_layer

    def graph_contexts(self, max_model_len: int) -> list[int]:
        """Context buckets 1/8 of an octave apart (16, 18, 20, ..., 28, 32, 36, ...) and max_model_len.

        Under a captured graph the host does not know the rows' lengths, so every row keeps keep(bound) tokens
        for the bucket bound >= the longest row (rows no longer than that keep all their tokens): at most
        1/8 more than the longest row's own budget. Eager steps give each row exactly its own budget.
        """
        bounds = {max_model_len}
        octave = 16
        while octave < max_model_len:
            bounds.update(c for c in range(octave, 2 * octave, octave // 8) if c < max_model_len)
            octave *= 2
        return sorted(bounds)

    # ----- the attention call -----
    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        self.layer = layer  # `write_kv` and `paged` below act on this layer
        if self.kv_caches is None and self.config.sparse_prefill and self.sparse_layers[layer]:
            out = torch.empty_like(q)
            qsl = self.meta.query_start_loc_cpu
            for i in range(len(qsl) - 1):
                s, e = qsl[i], qsl[i + 1]
                out[s:e] = self._causal(q[s:e], k[s:e], v[s:e], scale, 0)
            return out
        return super().attention(layer, q, k, v, scale)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V into the paged cache, and the K labels k[..., channels] into the label cache at the same slots."""
        super().write_kv(layer, k, v)
        labels = self.label_caches[layer]
        if labels is None:
            return
        hkv, r = labels.shape[2], labels.shape[3]
        lab = k.gather(2, self.channels[layer].expand(k.shape[0], -1, -1))  # [T, Hkv, r]
        slots = self.meta.slot_mapping
        scales = self.label_scales[layer]
        if scales is None:
            labels.view(-1, hkv, r).index_copy_(0, slots, lab.to(labels.dtype))
            return
        q8, sc = ref.quantize_labels(lab)
        labels.view(-1, hkv, r).index_copy_(0, slots, q8)
        scales.view(-1, hkv).index_copy_(0, slots, sc)

    def _plan(self, q: torch.Tensor) -> DecodePlan:
        """The step's decode plan; the same metadata object serves every layer of one forward pass."""
        m = self.meta
        if self._plan_meta is m and self._decode_plan is not None:
            return self._decode_plan
        qsl, lens = m.query_start_loc_cpu, m.seq_lens_cpu
        n_rows = len(lens)
        rows = [i for i in range(n_rows) if qsl[i + 1] - qsl[i] == 1 and lens[i] >= self.config.dense_below]
        prefill = [i for i in range(n_rows) if qsl[i + 1] - qsl[i] > 1] if self.config.sparse_prefill else []
        every = len(rows) == n_rows and qsl[n_rows] == n_rows
        rows_t = tokens_t = None
        if rows and not every:
            rows_t = torch.tensor(rows, device=q.device)
            tokens_t = torch.tensor([qsl[i] for i in rows], device=q.device)
        plan = DecodePlan(rows, prefill, every, rows_t, tokens_t, [self.config.keep(lens[i]) for i in rows],
                          [lens[i] for i in rows])
        self._plan_meta, self._decode_plan = m, plan
        return plan

    def paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        m = self.meta
        n_rows = len(m.seq_lens_cpu)
        if m.graph_bound and self.sparse_layers[self.layer]:  # a decode graph: lengths only on the device
            bound = m.max_seq_len
            keep = bound if bound < self.config.dense_below else self.config.keep(bound)
            return self.sparse_decode(q, k_cache, v_cache, m.block_tables, m.seq_lens, [keep] * n_rows,
                                      [bound] * n_rows, scale)
        plan = self._plan(q) if self.sparse_layers[self.layer] else None
        if plan is not None and plan.every_row:
            return self.sparse_decode(q, k_cache, v_cache, m.block_tables[:n_rows], m.seq_lens[:n_rows],
                                      plan.keeps, plan.lens, scale)
        decode_rows = plan.rows if plan else []
        prefill_rows = plan.prefill_rows if plan else []
        if len(decode_rows) + len(prefill_rows) < n_rows:
            self.dense.meta = m
            out = self.dense.paged(q, k, v, k_cache, v_cache, scale)
        else:
            out = torch.empty_like(q)
        if decode_rows:
            tokens = plan.tokens_t
            out[tokens] = self.sparse_decode(q[tokens], k_cache, v_cache, m.block_tables[plan.rows_t],
                                             m.seq_lens[plan.rows_t], plan.keeps, plan.lens, scale)
        qsl, lens = m.query_start_loc_cpu, m.seq_lens_cpu
        for i in prefill_rows:
            s, e = qsl[i], qsl[i + 1]
            if e - s == lens[i]:  # the whole context is new: this step's k/v are all of it
                kc, vc = k[s:e], v[s:e]
            else:
                kc = gather_kv(k_cache, m.block_tables[i], lens[i])
                vc = gather_kv(v_cache, m.block_tables[i], lens[i])
            out[s:e] = self._causal(q[s:e], kc, vc, scale, lens[i] - (e - s))
        return out

    def sparse_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, keeps: list[int], seq_lens_cpu: list[int],
                      scale: float) -> torch.Tensor:
        """q [b, Hq, D] (one query per sequence) → out [b, Hq, D]: labels → top-k → exact sparse attention.

        With `selection=kv_group` the group's query labels are summed (the score is linear in q), so one
        list per KV head serves its G query heads and each selected K/V row is read once, as in dense decode.
        """
        b, hq, _ = q.shape
        labels, label_scale = self.label_caches[self.layer], self.label_scales[self.layer]
        q_label = q.gather(2, self._q_channels(hq).expand(b, -1, -1))  # [b, Hq, r]
        if self.config.selection == "kv_group":
            hkv, r = labels.shape[2], labels.shape[3]
            q_label = q_label.view(b, hkv, hq // hkv, r).sum(2, dtype=torch.float32).to(q.dtype)  # [b, Hkv, r]
        out_dtype = torch.bfloat16 if self.config.score_bits == 16 else torch.float32
        sink, local = ref.forced_counts(min(keeps), self.config.sink_tokens, self.config.local_tokens)
        scores = self.ops.ds_label_scores(q_label, labels, block_tables, seq_lens, label_scale,
                                          max_seq_len=max(seq_lens_cpu), out_dtype=out_dtype,
                                          sink=sink, local=local)  # [b, rows, S]
        if self.ops is ref:
            idx = ref.ds_topk(scores, seq_lens, max(keeps))
        else:
            idx = self.ops.ds_topk(scores, seq_lens, max(keeps), method=self.config.topk)
        if min(keeps) < max(keeps):
            idx = _trim_to_budget(idx, scores, keeps)
        return self.ops.ds_sparse_attention(q, k_cache, v_cache, block_tables, idx, scale)

    def _q_channels(self, n_heads: int) -> torch.Tensor:
        """[Hq, r] the label channels each query head reads (its KV head's), cached per layer."""
        cached = self._q_channel_cache.get(self.layer)
        if cached is None:
            ch = self.channels[self.layer]
            cached = ch.repeat_interleave(n_heads // ch.shape[0], dim=0)
            self._q_channel_cache[self.layer] = cached
        return cached

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: int) -> torch.Tensor:
        cfg = self.config
        return ref.ds_causal_attention(q, k, v, self.channels[self.layer], cfg.token_budget, cfg.dense_below, scale,
                                       offset=offset, quantized_labels=cfg.label_bits == 8,
                                       shared=cfg.selection == "kv_group", sink=cfg.sink_tokens,
                                       local=cfg.local_tokens)


def _trim_to_budget(idx: torch.Tensor, scores: torch.Tensor, keeps: list[int]) -> torch.Tensor:
    """Rows of a batch get different budgets: order each row's picks best first and drop those past its budget.

    idx [B, Hq, k] (any order, -1 unused) · scores [B, Hq, S] · keeps [B] → idx [B, Hq, k].
    """
    picked = scores.gather(-1, idx.long().clamp(min=0)).masked_fill(idx < 0, float("-inf"))
    idx = idx.gather(-1, picked.argsort(dim=-1, descending=True))
    rank = torch.arange(idx.shape[-1], device=idx.device)
    limit = torch.tensor(keeps, device=idx.device).view(-1, 1, 1)
    return idx.masked_fill(rank >= limit, -1)
