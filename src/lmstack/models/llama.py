"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) as one readable module.

The model takes a *flat* batch: the new tokens of every sequence packed one after another (no padding),
their positions, and the attention metadata that says which sequence each token belongs to. Shapes in
comments: T = tokens in the batch, D = hidden size, H / Hkv = query / key-value heads, Dh = head dim.
q/k/v and gate/up projections are fused into one matrix each: fewer, larger matmuls. The residual add +
RMSNorm, rotary and SiLU-and-mul are single Triton kernels on CUDA (`models/fused.py`, torch elsewhere).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmstack.errors import ModelLoadError
from lmstack.models import fused
from lmstack.models.config import ModelConfig


class RMSNorm(nn.Module):
    """Hugging Face's RMSNorm (normalise in fp32, scale in the input dtype), fused with the residual add."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (norm(x + residual), x + residual): the new residual stream comes back with the normed input."""
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [Dh/2], with Llama-3 or linear scaling applied when the config asks."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv_freq / factor).float()
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(mid, smoothed, out).float()
    if kind in (None, "default"):
        return inv_freq.float()
    raise ModelLoadError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


class Rotary(nn.Module):
    """cos/sin tables for every position up to the context window, looked up per token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(cfg))  # [P, Dh/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, Dh], k [T, Hkv, Dh] rotated in Hugging Face's half-split layout."""
        return fused.rotary(q, k, positions, self.cos, self.sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, ctx: Any) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rotary(q.view(T, self.n_heads, self.head_dim), k.view(T, self.n_kv, self.head_dim), positions)
        v = v.view(T, self.n_kv, self.head_dim)  # q [T, H, Dh], k/v [T, Hkv, Dh]
        out = ctx.attention(self.layer_idx, q, k, v, self.scale)  # [T, H, Dh]
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused.silu_and_mul(self.gate_up_proj(x)))  # [T, 2I] → [T, I] → [T, D]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, rotary: Rotary,
                ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """x is the previous block's output, not yet added to the residual stream (the norm adds it)."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, positions, rotary, ctx), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Decoder-only transformer: embed → N × (attention + SwiGLU MLP) → norm → lm_head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Any) -> torch.Tensor:
        """input_ids, positions [T] → final hidden states [T, D].

        `ctx.attention(layer, q, k, v, scale)` does the attention (and stores k/v in the KV cache if any).
        """
        x = self.embed_tokens(input_ids)  # [T, D]
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, ctx)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] → logits [N, V] in float32 (only rows that are sampled get here)."""
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in Hugging Face checkpoints into the fused layout."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, tensor: torch.Tensor, rows: slice | None = None) -> None:
            if name not in own:
                raise ModelLoadError(f"checkpoint tensor maps to unknown parameter {name!r}")
            dst = own[name].data if rows is None else own[name].data[rows]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            loaded.add(name)

        q, kv = self.layers[0].self_attn.q_size, self.layers[0].self_attn.kv_size
        inter = self.config.intermediate_size
        fused = {
            "q_proj": ("qkv_proj", slice(0, q)),
            "k_proj": ("qkv_proj", slice(q, q + kv)),
            "v_proj": ("qkv_proj", slice(q + kv, q + 2 * kv)),
            "gate_proj": ("gate_up_proj", slice(0, inter)),
            "up_proj": ("gate_up_proj", slice(inter, 2 * inter)),
        }
        for name, tensor in state.items():
            if "rotary_emb" in name:
                continue
            key = name.removeprefix("model.")
            parts = key.split(".")
            if len(parts) >= 4 and parts[-2] in fused:
                target, rows = fused[parts[-2]]
                put(".".join(parts[:-2] + [target, parts[-1]]), tensor, rows)
            elif key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            else:
                put(key, tensor)
        missing = {n for n in own if n not in loaded}
        if self.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {sorted(missing)[:3]}")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face names (for the transformers baseline and exports)."""
        q, kv = self.layers[0].self_attn.q_size, self.layers[0].self_attn.kv_size
        inter = self.config.intermediate_size
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            prefix = "" if name.startswith("lm_head") else "model."
            if ".qkv_proj." in name:
                base, kind = name.split(".qkv_proj.")
                for proj, rows in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)),
                                   ("v_proj", slice(q + kv, q + 2 * kv))):
                    out[f"model.{base}.{proj}.{kind}"] = p.data[rows]
            elif ".gate_up_proj." in name:
                base, kind = name.split(".gate_up_proj.")
                out[f"model.{base}.gate_proj.{kind}"] = p.data[:inter]
                out[f"model.{base}.up_proj.{kind}"] = p.data[inter:]
            else:
                out[prefix + name] = p.data
        if self.config.tie_word_embeddings:
            out["lm_head.weight"] = self.embed_tokens.weight.data
        return out
