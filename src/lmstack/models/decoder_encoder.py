"""A decoder-only LM (Llama / Qwen2 / SmolLM2) used as a sentence encoder, e.g. as the length ranker's backbone.

The paper's ranker (arXiv 2408.15792) fine-tunes OPT-125M, a causal LM. `LlamaModel.forward` cannot train: it
takes a flat, unpadded batch plus paged-attention metadata, and on CUDA its fused Triton ops have no backward.
`CausalBackbone` reuses the same parameter modules (embeddings, decoder layers, final norm; the lm_head is
dropped) and runs the torch reference ops over a padded [B, T] batch with a causal + padding mask, so autograd
works everywhere and the numbers match the serving model's. A sentence vector is the mean of the final hidden
states over real tokens, or the last real token's state (`pooling`). Left and right padding both work:
positions count real tokens only.

A saved folder is an ordinary HF checkpoint (config.json with tied embeddings, since no lm_head is kept,
model.safetensors plus an index naming it, so other *.safetensors beside it are not read as weights,
tokenizer files) and `decoder_encoder.json` with the pooling and truncation length.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lmstack.errors import ModelLoadError
from lmstack.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, read_json_object
from lmstack.models.encoder import PaddedTextEncoder, mean_pool
from lmstack.models.fused import add_rms_norm_ref, rotary_ref, silu_and_mul_ref
from lmstack.models.llama import LlamaModel
from lmstack.models.registry import EMBEDDED

POOLINGS = ("mean", "last")
DEFAULT_POOLING = "mean"
DEFAULT_MAX_LENGTH = 512
ENCODER_FILE = "decoder_encoder.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CausalBackbone(nn.Module):
    """Embeddings → decoder layers → final norm of a `LlamaModel`, over a padded batch, differentiable."""

    def __init__(self, model: LlamaModel) -> None:
        super().__init__()
        self.config: ModelConfig = model.config
        self.embed_tokens = model.embed_tokens
        self.layers = model.layers
        self.norm = model.norm
        self.rotary = model.rotary  # cos/sin tables: non-persistent buffers, not saved

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] → final hidden states [B, T, D] (after the final norm)."""
        real = attention_mask.bool()
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]: 0.. over real tokens, any padding side
        t = input_ids.shape[1]
        causal = torch.ones((t, t), dtype=torch.bool, device=input_ids.device).tril()
        # Padding queries see only themselves, so that no softmax row is empty (NaN) under left padding.
        keep = (causal & real[:, None, :]) | torch.eye(t, dtype=torch.bool, device=input_ids.device)
        keep = keep[:, None]  # [B, 1, T, T]
        x = self.embed_tokens(input_ids)  # [B, T, D]
        residual = None
        for layer in self.layers:
            h, residual = add_rms_norm_ref(x, residual, layer.input_layernorm.weight, layer.input_layernorm.eps)
            x = self._attention(layer.self_attn, h, positions, keep)
            h, residual = add_rms_norm_ref(x, residual, layer.post_attention_layernorm.weight,
                                           layer.post_attention_layernorm.eps)
            x = layer.mlp.down_proj(silu_and_mul_ref(layer.mlp.gate_up_proj(h)))
        return add_rms_norm_ref(x, residual, self.norm.weight, self.norm.eps)[0]

    def _attention(self, attn: nn.Module, x: torch.Tensor, positions: torch.Tensor,
                   keep: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = q.view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = k.view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = v.view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
        # rotary_ref indexes cos/sin by positions and unsqueezes dim 1: with positions [B, T] that is the head dim.
        q, k = rotary_ref(q, k, positions, self.rotary.cos, self.rotary.sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=attn.scale,
                                             enable_gqa=attn.n_heads != attn.n_kv)  # [B, H, T, Dh]
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.q_size))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under Hugging Face names, the fused q/k/v and gate/up matrices split again."""
        attn = self.layers[0].self_attn
        q, kv, inter = attn.q_size, attn.kv_size, self.config.intermediate_size
        splits = {"qkv_proj": (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)),
                  "gate_up_proj": (("gate_proj", 0, inter), ("up_proj", inter, 2 * inter))}
        out: dict[str, torch.Tensor] = {}
        for name, p in self.state_dict().items():
            stem, fused_name, leaf = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", name)
            if fused_name in splits:
                for part, lo, hi in splits[fused_name]:
                    out[f"model.{stem}.{part}.{leaf}"] = p[lo:hi]
            else:
                out[f"model.{name}"] = p
        return out


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] → the hidden state of each row's last real token [B, H] float32 (any padding side)."""
    t = attention_mask.shape[1]
    last = (attention_mask.bool() * torch.arange(1, t + 1, device=hidden.device)).argmax(dim=-1)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(torch.float32)


class DecoderEncoder(PaddedTextEncoder):
    """A causal LM backbone with its tokenizer: texts → padded batch → hidden states or pooled vectors.

    Same interface as `SentenceEncoder` (token_ids, pad, encode_batch, forward, embed, save, device,
    hidden_size, max_length, config.max_position_embeddings), so the ranker takes either.
    """

    def __init__(self, model: CausalBackbone, tokenizer_files: dict[str, str], pooling: str = DEFAULT_POOLING,
                 max_length: int = DEFAULT_MAX_LENGTH) -> None:
        if pooling not in POOLINGS:
            raise ModelLoadError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        # An empty prompt still needs one token to pool over; padding reuses it (masked out anyway).
        fallback = model.config.bos_token_id or (model.config.eos_token_id or [0])[0]
        super().__init__(tokenizer_files["tokenizer.json"], fallback)
        self._fallback_id = fallback
        self.model = model
        self.config = model.config
        self.pooling = pooling
        self.max_length = min(max_length, self.config.max_position_embeddings)
        self._tokenizer_files = tokenizer_files  # file name → text, written again by `save`

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def token_ids(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids (the first `max_length`, default the encoder's); never empty."""
        length = self.max_length if max_length is None else max_length
        if not 1 <= length <= self.config.max_position_embeddings:
            raise ValueError(f"max_length must be in 1..{self.config.max_position_embeddings}, got {length}")
        return [enc.ids or [self._fallback_id] for enc in self._tokenizer(length).encode_batch(list(texts))]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] → pooled (not normalised) sentence vectors [B, D] float32."""
        hidden = self.model(input_ids, attention_mask)
        pool = mean_pool if self.pooling == "mean" else last_token_pool
        return pool(hidden, attention_mask)

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write an HF checkpoint folder that `lmstack.models.load` and `load_decoder_encoder` read back;
        `dtype` (e.g. float16) shrinks it for shipping."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v if dtype is None else v.to(dtype)).detach().contiguous().cpu()
                 for k, v in self.model.hf_state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(state), "model.safetensors")}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        config = self.config.to_hf_dict()
        config["tie_word_embeddings"] = True  # no lm_head is kept; tying makes the folder a complete checkpoint
        config["torch_dtype"] = str(dtype or self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in self._tokenizer_files.items():
            (folder / name).write_text(text, encoding="utf-8")
        meta = {"pooling": self.pooling, "max_length": self.max_length}
        (folder / ENCODER_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")


def _model_type(folder: Path) -> str | None:
    try:
        d = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d.get("model_type") if isinstance(d, dict) else None


def is_decoder_model(name_or_path: str) -> bool:
    """True for what `lmstack.models.load` reads as a decoder LM: an embedded model name, a .gguf file, or an HF
    folder whose config.json has a Llama-family model_type."""
    if name_or_path in EMBEDDED:
        return True
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return path.is_dir() and _model_type(path) in SUPPORTED_MODEL_TYPES


def load_decoder_encoder(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         pooling: str | None = None, max_length: int | None = None) -> DecoderEncoder:
    """Load an embedded model name, .gguf file or HF Llama/Qwen2 folder as a trainable encoder (eval mode).

    `pooling` and `max_length` default to those saved in the folder (a ranker's), else mean and 512.
    """
    from lmstack.models import load
    from lmstack.models.loader import resolve_model_path

    if name_or_path.startswith("dummy:"):
        raise ModelLoadError("a dummy: model has no tokenizer of its own to save; write its random weights to an "
                             "HF folder (config.json, model.safetensors, tokenizer.json) and pass that folder")
    folder = resolve_model_path(name_or_path)  # a GGUF is converted (once) to an HF folder here
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder} has no tokenizer.json, which a decoder encoder needs")
    saved = read_json_object(folder / ENCODER_FILE, missing_ok=True)
    model, _, _ = load(str(folder), dtype=dtype, device=device)
    backbone = CausalBackbone(model).requires_grad_(True)
    files = {n: (folder / n).read_text(encoding="utf-8") for n in _TOKENIZER_FILES if (folder / n).is_file()}
    encoder = DecoderEncoder(backbone, files, pooling or saved.get("pooling", DEFAULT_POOLING),
                             int(max_length or saved.get("max_length", DEFAULT_MAX_LENGTH)))
    return encoder.eval()
