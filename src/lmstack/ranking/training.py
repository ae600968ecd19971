"""Training loops for `LengthRanker.fit`: full fine-tuning, or a head over frozen, cached sentence embeddings.

Each step draws one list of `list_size` training prompts (a random partition per epoch) and applies the
objective to it: ListMLE over the list, or cross-entropy for the bucket classifier. After every epoch the
validation tau is measured and the best weights are kept. Frozen-encoder embeddings are computed once, in
chunks written to a cache folder, so an interrupted run resumes without recomputing them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lmstack.errors import LmstackError
from lmstack.ranking.data import LengthExample
from lmstack.ranking.metrics import kendall_tau

if TYPE_CHECKING:
    from lmstack.ranking.predictor import LengthRanker, TextEncoder

_CHUNK = 512  # prompts per cached embedding file


@dataclass
class TrainConfig:
    """Optimisation settings. `lr` is the encoder's (ignored when frozen), `head_lr` the head's."""

    epochs: int = 4
    list_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of steps with a linearly rising learning rate
    grad_clip: float = 1.0
    freeze_encoder: bool = False
    max_steps: int | None = None  # stop early (tests, smoke runs)
    seed: int = 0
    cache_dir: str | None = None  # frozen mode: where embeddings are cached

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.list_size < 2:
            raise LmstackError(f"epochs must be >= 1 and list size >= 2 (got {self.epochs}, {self.list_size})")
        if self.lr <= 0 or self.head_lr <= 0 or self.weight_decay < 0:
            raise LmstackError("learning rates must be > 0 and weight decay >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise LmstackError(f"max steps must be >= 1 (got {self.max_steps})")


def _lists(n: int, list_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch: a random partition of range(n) into lists of `list_size` (the remainder is dropped)."""
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n - list_size + 1, list_size):
        yield perm[start : start + list_size]


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear decay to zero."""
    warm = max(1, int(total * warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm))))


def _decays(name: str) -> bool:
    return not (name.endswith("bias") or "norm" in name)


def _val_tau(ranker: LengthRanker, val: Sequence[LengthExample], feats: torch.Tensor | None) -> float | None:
    if len(val) < 2:
        return None
    if feats is None:
        scores = ranker.predict([ex.prompt for ex in val])
    else:
        ranker.eval()
        with torch.no_grad():
            scores = ranker.objective.score(ranker.head(feats.to(ranker.device))).cpu().numpy()
    return kendall_tau([ex.output_len for ex in val], scores)


def fit(ranker: LengthRanker, train: list[LengthExample], val: list[LengthExample], cfg: TrainConfig) -> dict[str, Any]:
    """Train `ranker` in place; returns the settings and per-epoch history (saved in the ranker folder)."""
    if len(train) < cfg.list_size:
        raise LmstackError(f"{len(train)} training examples are fewer than one list of {cfg.list_size}; "
                           "build more data or lower --list-size")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    lengths = torch.tensor([ex.output_len for ex in train], dtype=torch.long)
    steps_per_epoch = len(train) // cfg.list_size
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    if cfg.freeze_encoder:
        ranker.encoder.requires_grad_(False)
        feats = embeddings(ranker.encoder, [ex.prompt for ex in train], ranker.max_length, cfg.cache_dir)
        val_feats = (embeddings(ranker.encoder, [ex.prompt for ex in val], ranker.max_length, cfg.cache_dir)
                     if len(val) >= 2 else None)
        params = [{"params": list(ranker.head.parameters()), "lr": cfg.head_lr}]
        step_fn = lambda idx: ranker.head(feats[idx].to(ranker.device))  # noqa: E731
    else:
        ids = ranker.encoder.token_ids([ex.prompt for ex in train], ranker.max_length)
        feats = val_feats = None
        named = [(n, p) for n, p in ranker.encoder.named_parameters() if p.requires_grad]
        params = [
            {"params": [p for n, p in named if _decays(n)], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if not _decays(n)], "lr": cfg.lr, "weight_decay": 0.0},
            {"params": list(ranker.head.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.weight_decay},
        ]
        step_fn = lambda idx: _forward(ranker, [ids[i] for i in idx.tolist()])  # noqa: E731
    optimizer = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    scheduler = _schedule(optimizer, total, cfg.warmup)
    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    step = 0
    with tqdm(total=total, desc="training", unit="list") as bar:
        for epoch in range(cfg.epochs):
            ranker.train()
            losses = []
            for idx in _lists(len(train), cfg.list_size, gen):
                loss = ranker.objective.loss(step_fn(idx), lengths[idx].to(ranker.device), generator=gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
                if step >= total:
                    break
            tau = _val_tau(ranker, val, val_feats)
            history.append({"epoch": epoch + 1, "steps": step, "train_loss": sum(losses) / max(1, len(losses)),
                            "val_tau": tau})
            tqdm.write(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, val tau "
                       f"{'n/a' if tau is None else f'{tau:.4f}'}")
            if tau is not None and (best is None or tau > best[0]):
                best = (tau, {k: v.detach().cpu().clone() for k, v in ranker.state_dict().items()})
            if step >= total:
                break
    if best is not None:
        ranker.load_state_dict(best[1])
    ranker.eval()
    return {"config": asdict(cfg), "history": history, "best_val_tau": None if best is None else best[0],
            "train_examples": len(train), "val_examples": len(val)}


def _forward(ranker: LengthRanker, ids: list[list[int]]) -> torch.Tensor:
    """One padded list through the encoder and head; bfloat16 autocast on CUDA."""
    input_ids, mask = ranker.encoder.pad(ids)
    with torch.autocast(device_type=ranker.device.type, dtype=torch.bfloat16, enabled=ranker.device.type == "cuda"):
        return ranker(input_ids, mask)


def _encoder_key(encoder: TextEncoder, max_length: int) -> str:
    """Cache folder key: the encoder's exact weights, the truncation length and any pooling but the mean."""
    pooling = getattr(encoder, "pooling", "mean")
    suffix = "" if pooling == "mean" else f"{pooling}\n"  # keeps the keys of existing mean-pooled caches
    h = hashlib.sha256(f"{max_length}\n{suffix}".encode())
    for name, tensor in sorted(encoder.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _chunk_key(prompts: Sequence[str]) -> str:
    """Cache file key: the chunk's prompts, so any data set sharing a chunk reuses it."""
    h = hashlib.sha256(str(len(prompts)).encode())
    for p in prompts:
        h.update(hashlib.sha256(p.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()[:24]


def embeddings(encoder: TextEncoder, prompts: Sequence[str], max_length: int,
               cache_dir: str | None = None, batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings [N, H] float32 on CPU, computed in chunks that are cached under `cache_dir`."""
    prompts = list(prompts)
    folder = Path(cache_dir) / _encoder_key(encoder, max_length) if cache_dir else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in tqdm(range(0, len(prompts), _CHUNK), desc="embedding", unit="chunk"):
        chunk = prompts[start : start + _CHUNK]
        file = folder / f"{_chunk_key(chunk)}.safetensors" if folder is not None else None
        if file is not None and file.is_file():
            parts.append(load_file(str(file))["emb"])
            continue
        emb = encoder.embed(chunk, batch_size=batch_size, max_length=max_length)
        if file is not None:
            tmp = file.with_suffix(".tmp")
            save_file({"emb": emb}, str(tmp))
            os.replace(tmp, file)
        parts.append(emb)
    return torch.cat(parts) if parts else torch.empty((0, encoder.hidden_size))
