"""Weights → torch modules: `load(name_or_path)` for embedded names, HF folders, GGUF files, dummy models."""

from __future__ import annotations

from pathlib import Path

import torch

from lmstack.errors import ModelLoadError
from lmstack.models.config import ModelConfig
from lmstack.models.dummy import dummy_config
from lmstack.models.llama import LlamaModel
from lmstack.models.loader import load_safetensors_state_dict, resolve_model_path
from lmstack.models.registry import DEFAULT_MODEL
from lmstack.models.tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "LlamaModel", "ModelConfig", "Tokenizer", "load", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPU and float32 on CPU (where bf16 matmuls are slow on most chips)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _default_tokenizer(cfg: ModelConfig, folder: Path | None) -> Tokenizer:
    """A dummy model borrows a tokenizer: the one beside its config, else the default model's."""
    if folder is not None and (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder, eos_token_ids=cfg.eos_token_id)
    tok = Tokenizer.from_folder(resolve_model_path(DEFAULT_MODEL), eos_token_ids=cfg.eos_token_id)
    if tok.vocab_size > cfg.vocab_size:
        raise ModelLoadError(
            f"the dummy model's vocab ({cfg.vocab_size}) is smaller than the borrowed tokenizer's "
            f"({tok.vocab_size}); put a tokenizer.json beside its config.json"
        )
    return tok


def _tokenizer_folder(spec: str) -> Path:
    """A folder with tokenizer files (weights not needed), or any model name that resolves to one."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path
    return resolve_model_path(spec)


def load(
    name_or_path: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto", seed: int = 0,
    tokenizer: str | None = None,
) -> tuple[LlamaModel, Tokenizer, ModelConfig]:
    """Load a model, its tokenizer and config; see ARCHITECTURE.md for the accepted names.

    `tokenizer` names another folder (or model) to take the tokenizer from, as `--tokenizer` does.
    """
    dev = resolve_device(device)
    if name_or_path.startswith("dummy:"):
        cfg, folder = dummy_config(name_or_path.removeprefix("dummy:"))
        torch_dtype = resolve_dtype(dtype, dev)
        if tokenizer is not None:
            folder = _tokenizer_folder(tokenizer)
        tok = _default_tokenizer(cfg, folder)
        model = _build(cfg, torch_dtype, dev)
        _init_random(model, seed)
        return model, tok, cfg
    folder = resolve_model_path(name_or_path)
    cfg = ModelConfig.from_file(folder / "config.json")
    torch_dtype = resolve_dtype(dtype, dev)
    tok = Tokenizer.from_folder(_tokenizer_folder(tokenizer) if tokenizer else folder,
                                eos_token_ids=cfg.eos_token_id)
    model = _build(cfg, torch_dtype, dev)
    state = load_safetensors_state_dict(folder)
    with torch.no_grad():
        model.load_hf_state_dict(state)
    model.model_path = folder
    return model, tok, cfg


def _build(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """Allocate parameters straight on the target device (no CPU copy of an 8B model)."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = model.rotary.__class__(cfg).to(device)  # buffers were on meta: rebuild them for real
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.model_path = None
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _init_random(model: LlamaModel, seed: int) -> None:
    """Small normal weights and unit norms: activations stay finite through 80 layers."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
