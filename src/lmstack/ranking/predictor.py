"""`LengthRanker`: a small encoder plus a score head that orders prompts by predicted output length.

The engine's `ltr` policy loads one from a folder and calls `score(prompts)` once per request at admission:
higher = longer predicted output. The encoder is a BERT sentence encoder (MiniLM by default) or a decoder-only
LM (SmolLM2, Qwen2, ..., as the paper's OPT-125M ranker). The folder is that encoder's ordinary HF folder
(config.json, model.safetensors, tokenizer.json, loadable by lmstack and by transformers) plus
head.safetensors and ranker.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmstack.errors import LmstackError, ModelLoadError
from lmstack.models.decoder_encoder import POOLINGS, DecoderEncoder, is_decoder_model, load_decoder_encoder
from lmstack.models.encoder import DEFAULT_ENCODER, EMBEDDED_ENCODERS, SentenceEncoder, load_encoder
from lmstack.ranking.baselines import BucketObjective
from lmstack.ranking.data import LengthExample
from lmstack.ranking.listmle import ListMLEObjective

FORMAT = "lmstack.length-ranker"
VERSION = 1
_RANKER_FILE = "ranker.json"
_HEAD_FILE = "head.safetensors"


class Objective(Protocol):
    """What the head is trained to output and how that output becomes one ranking score."""

    name: str

    @property
    def out_dim(self) -> int: ...

    def loss(self, out: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        ...

    def score(self, out: torch.Tensor) -> torch.Tensor: ...

    def to_config(self) -> dict[str, Any]: ...


OBJECTIVES: dict[str, type] = {"listmle": ListMLEObjective, "bucket": BucketObjective}

TextEncoder = SentenceEncoder | DecoderEncoder


def load_backbone(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  pooling: str | None = None) -> TextEncoder:
    """A BERT encoder (embedded name or folder) or a decoder LM (anything `lmstack.models.load` reads but
    `dummy:`); `pooling` (mean or last token) applies to decoder LMs only, which is where the choice matters."""
    if is_decoder_model(name_or_path):
        return load_decoder_encoder(name_or_path, device=device, dtype=dtype, pooling=pooling)
    if pooling is not None and pooling != "mean":
        raise LmstackError(f"pooling {pooling!r} is for decoder-only backbones; BERT encoders use mean pooling")
    if name_or_path not in EMBEDDED_ENCODERS and not Path(name_or_path).expanduser().is_dir():
        from lmstack.models.registry import EMBEDDED

        raise ModelLoadError(f"encoder {name_or_path!r} not found: pass a BERT encoder ({', '.join(EMBEDDED_ENCODERS)}"
                             f" or an HF BERT folder) or a decoder LM ({', '.join(EMBEDDED)}, a .gguf file or an HF "
                             "Llama/Qwen2 folder)")
    return load_encoder(name_or_path, device=device, dtype=dtype)


def objective_from_config(cfg: dict[str, Any]) -> Objective:
    kwargs = dict(cfg)
    name = kwargs.pop("name", None)
    if name not in OBJECTIVES:
        raise ModelLoadError(f"unknown ranker objective {name!r}; known: {', '.join(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](**kwargs)
    except TypeError as e:
        raise ModelLoadError(f"bad settings for objective {name!r}: {e}") from None


def make_head(hidden_size: int, out_dim: int, head_hidden: int = 0, dropout: float = 0.1) -> torch.nn.Sequential:
    """Linear score head, or with `head_hidden` > 0 a one-hidden-layer MLP (for a frozen encoder)."""
    if head_hidden <= 0:
        return torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(hidden_size, out_dim))
    return torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(hidden_size, head_hidden), torch.nn.GELU(),
                               torch.nn.Dropout(dropout), torch.nn.Linear(head_hidden, out_dim))


class LengthRanker(torch.nn.Module):
    """Encoder → L2-normalised mean pooling → head. `score` ranks; `fit` trains; `save`/`load` use a folder."""

    def __init__(self, encoder: TextEncoder, objective: Objective, head_hidden: int = 0,
                 max_length: int | None = None, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.objective = objective
        self.head_hidden = head_hidden
        self.max_length = max_length or encoder.max_length
        self.head = make_head(encoder.hidden_size, objective.out_dim, head_hidden).to(encoder.device)
        self.info: dict[str, Any] = dict(info or {})  # training settings and validation metrics, saved with it

    @classmethod
    def create(cls, encoder: str = DEFAULT_ENCODER, objective: Objective | None = None, head_hidden: int = 0,
               max_length: int | None = None, device: str = "cpu", seed: int = 0,
               pooling: str | None = None) -> LengthRanker:
        """A new ranker over a pretrained encoder (see `load_backbone`) with a freshly initialised head."""
        if pooling is not None and pooling not in POOLINGS:
            raise LmstackError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        torch.manual_seed(seed)
        backbone = load_backbone(encoder, device=device, pooling=pooling)
        info = {"encoder": encoder, "pooling": getattr(backbone, "pooling", "mean")}
        return cls(backbone, objective or ListMLEObjective(), head_hidden, max_length, info)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] → sentence embeddings [B, H] float32 (what a frozen head sees)."""
        return F.normalize(self.encoder(input_ids, attention_mask), p=2, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] → head output [B, K] (K = 1 for ListMLE, the number of buckets for the classifier)."""
        feats = self.features(input_ids, attention_mask)
        return self.head(feats.to(self.head[-1].weight.dtype))

    @torch.no_grad()
    def predict_outputs(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """prompts → head outputs [N, K] float32 on CPU, batched by token length, in input order."""
        if batch_size < 1:
            raise LmstackError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()  # the head's dropout too, not only the encoder's
        try:
            return self.encoder.map_batches(list(prompts), self, self.objective.out_dim, batch_size, self.max_length)
        finally:
            self.train(was_training)

    def predict(self, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """prompts → ranking scores [N] (higher = longer predicted output)."""
        return self.objective.score(self.predict_outputs(prompts, batch_size)).numpy().astype(np.float64)

    def score(self, prompts: list[str], batch_size: int = 32) -> list[float]:
        """The engine's call: one float per prompt, higher = longer predicted output. No grad; truncates."""
        return [float(s) for s in self.predict(prompts, batch_size)]

    def fit(self, train: Sequence[LengthExample], val: Sequence[LengthExample] | None = None,
            config: Any = None) -> LengthRanker:
        """Train on `train` (ListMLE over random lists, or cross-entropy for the bucket classifier), keeping
        the weights with the best validation tau; `config` is a `TrainConfig`."""
        from lmstack.ranking.training import TrainConfig, fit

        history = fit(self, list(train), list(val or []), config or TrainConfig())
        self.info["training"] = history
        return self

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the folder atomically (built beside it, then renamed); `dtype` e.g. float16 halves its size."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.encoder.save(tmp, dtype=dtype)
            head = {k: (v if dtype is None else v.to(dtype)).detach().contiguous().cpu()
                    for k, v in self.head.state_dict().items()}
            save_file(head, str(tmp / _HEAD_FILE), metadata={"format": "pt"})
            meta = {"format": FORMAT, "version": VERSION, "objective": self.objective.to_config(),
                    "head_hidden": self.head_hidden, "max_length": self.max_length, "info": self.info}
            (tmp / _RANKER_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is meant to be shared
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LengthRanker:
        """Load a ranker folder written by `save` (weights only from safetensors, never pickle)."""
        path = Path(path).expanduser()
        meta_file = path / _RANKER_FILE
        if not meta_file.is_file():
            raise ModelLoadError(f"{path} is not a length-ranker folder (no {_RANKER_FILE}); train one with "
                                 "`lmstack ltr train --output PATH`")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {meta_file}: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ModelLoadError(f"{meta_file} is not a {FORMAT} v{VERSION} file; retrain with this lmstack")
        encoder = load_backbone(str(path), device=device, dtype=dtype)
        ranker = cls(encoder, objective_from_config(meta["objective"]), int(meta.get("head_hidden", 0)),
                     int(meta["max_length"]), meta.get("info"))
        try:
            head = load_file(str(path / _HEAD_FILE))
            ranker.head.load_state_dict({k: v.to(dtype) for k, v in head.items()})
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{path / _HEAD_FILE} is missing, corrupt or does not match ranker.json: {e}") \
                from None
        ranker.head.to(device=encoder.device, dtype=dtype)
        return ranker.eval()
