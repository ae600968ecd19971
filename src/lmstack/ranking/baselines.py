"""What the ranker is compared against: the prompt-length heuristic and a length-bucket classifier.

The classifier is the paper's baseline: the same encoder with a softmax over output-length buckets, trained
with cross-entropy. Its buckets are 10 equal widths up to 8,192 tokens by default (the paper's 820-token
buckets) or training-set quantiles; its ranking score is the expected bucket (argmax, the paper's choice, ties
whole buckets and is reported too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.ranking.metrics import kendall_tau


def uniform_edges(num_buckets: int = 10, max_len: int = 8192) -> list[int]:
    """Upper-exclusive bucket boundaries of equal width ceil(max_len / num_buckets) (820 for 10 over 8,192)."""
    width = math.ceil(max_len / num_buckets)
    return [width * k for k in range(1, num_buckets)]


def quantile_edges(lengths: Sequence[int], num_buckets: int = 10) -> list[int]:
    """Boundaries at the training lengths' quantiles, so every bucket holds about as many examples."""
    qs = np.quantile(np.asarray(lengths, dtype=np.float64), np.linspace(0, 1, num_buckets + 1)[1:-1])
    edges = sorted({int(math.ceil(q)) for q in qs})
    if len(edges) < num_buckets - 1:
        raise LmstackError(f"the training lengths have too few distinct values for {num_buckets} quantile buckets")
    return edges


@dataclass
class BucketObjective:
    """Cross-entropy over length buckets; ranks by the expected bucket under the predicted distribution."""

    edges: list[int]
    name: str = "bucket"

    @property
    def out_dim(self) -> int:
        return len(self.edges) + 1

    def labels(self, lengths: torch.Tensor) -> torch.Tensor:
        """lengths [B] → bucket index [B]; bucket k holds edges[k-1] <= length < edges[k]."""
        return torch.bucketize(lengths, torch.tensor(self.edges, device=lengths.device), right=True)

    def loss(self, out: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """out [B, K] logits, lengths [B] → mean cross-entropy."""
        return F.cross_entropy(out.float(), self.labels(lengths))

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """out [B, K] → expected bucket index [B] (a real number, so near-ties are still ordered)."""
        probs = out.float().softmax(dim=-1)
        return probs @ torch.arange(self.out_dim, device=out.device, dtype=torch.float32)

    def argmax_score(self, out: torch.Tensor) -> torch.Tensor:
        """out [B, K] → the most likely bucket [B], as the paper ranks with its classifier."""
        return out.argmax(dim=-1).float()

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "edges": list(self.edges)}


class PromptLengthBaseline:
    """Longer prompts get longer (or, if the training data says so, shorter) answers."""

    def __init__(self) -> None:
        self.sign = 1.0

    def fit(self, prompt_lens: Sequence[int], output_lens: Sequence[int]) -> PromptLengthBaseline:
        """Pick the direction that orders the training set better."""
        tau = kendall_tau(prompt_lens, output_lens)
        self.sign = -1.0 if tau < 0 else 1.0
        return self

    def predict(self, prompt_lens: Sequence[int]) -> np.ndarray:
        return self.sign * np.asarray(prompt_lens, dtype=np.float64)
