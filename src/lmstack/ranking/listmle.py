"""ListMLE: the Plackett-Luce likelihood of the true output-length order, the ranker's training loss.

Only the order of output lengths matters to a shortest-job-first scheduler, and ListMLE scores exactly that:
the probability that sampling without replacement by softmax(scores) picks the items longest first. The
suffix log-sum-exps are one `logcumsumexp` over the reversed order, so no exp ever overflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Padded slots get this many nats below the row's best score: exp() of it is exactly 0 in float32, and unlike
# -inf it keeps logcumsumexp's gradient finite.
_PAD_GAP = 1.0e4


def listmle_loss(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean over lists of -log P(longest-first order | scores).

    scores, lengths [B, L] (higher score = longer predicted output); mask [B, L] bool, True for real items
    (default: all real). Ties in `lengths` are broken at random (with `generator`), so equal lengths pull
    neither way on average. Computed in float32 whatever the input dtype.
    """
    if scores.shape != lengths.shape or scores.dim() != 2:
        raise ValueError(f"scores and lengths must both be [B, L]; got {tuple(scores.shape)} and "
                         f"{tuple(lengths.shape)}")
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    scores = scores.float()
    # Random tie-break: shuffle the columns, then a stable sort keeps the shuffled order among equal lengths.
    perm = torch.randperm(scores.shape[1], generator=generator).to(scores.device)  # [L]
    scores, lengths, mask = scores[:, perm], lengths[:, perm], mask[:, perm]
    keys = torch.where(mask, lengths.float(), torch.full_like(scores, -torch.inf))  # padding sorts last
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices  # [B, L]
    s = scores.gather(1, order)  # [B, L], longest first
    m = mask.gather(1, order)  # [B, L]
    top = s.masked_fill(~m, -torch.inf).max(dim=1, keepdim=True).values.detach()  # [B, 1]
    s = torch.where(m, s - top, torch.full_like(s, -_PAD_GAP))
    # suffix[:, i] = log sum_{j >= i} exp(s[:, j]): the normaliser when item i is drawn.
    suffix = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # [B, L]
    per_item = (suffix - s) * m  # [B, L], padded slots contribute nothing
    return per_item.sum(dim=1).mean()


@dataclass
class ListMLEObjective:
    """ListMLE over each training list; the head's single output is the ranking score."""

    label_group: int = 10  # lengths in the same group of this many tokens count as ties (as in the paper)
    name: str = "listmle"
    out_dim: int = 1

    def loss(self, out: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """out [B, 1] scores of one list, lengths [B] → ListMLE of that list."""
        return listmle_loss(out[:, 0][None], (lengths // self.label_group)[None], generator=generator)

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """out [B, 1] → [B]."""
        return out[:, 0].float()

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "label_group": self.label_group}
