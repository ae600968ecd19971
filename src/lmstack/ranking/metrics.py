"""Kendall's tau: how well predicted scores order requests by their true output lengths.

The paper (arXiv 2408.15792, its training code) reports scipy's `kendalltau` (tau-b, ties corrected) between
true lengths and predicted scores over the whole held-out split; we report that as the headline and, since a
scheduler only ever orders the requests present together, also the mean tau within random lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ROWS = 512  # pairwise comparisons are done this many rows at a time: O(n^2) work, O(512 n) memory


def kendall_tau(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b of two equally long sequences; nan when either is constant (no order to compare)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"kendall_tau needs two 1-D sequences of equal length; got {a.shape} and {b.shape}")
    n = len(a)
    concordant_minus_discordant = 0.0
    tied_a = tied_b = 0.0
    for start in range(0, n, _ROWS):
        da = np.sign(a[start : start + _ROWS, None] - a[None, :])  # [r, n]
        db = np.sign(b[start : start + _ROWS, None] - b[None, :])  # [r, n]
        concordant_minus_discordant += float((da * db).sum())
        tied_a += float((da == 0).sum()) - min(_ROWS, n - start)  # minus the diagonal
        tied_b += float((db == 0).sum()) - min(_ROWS, n - start)
    pairs = n * (n - 1)  # ordered pairs: every count above is doubled, so the factor cancels
    denominator = np.sqrt((pairs - tied_a) * (pairs - tied_b))
    return float(concordant_minus_discordant / denominator) if denominator > 0 else float("nan")


def per_list_tau(
    lengths: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray, list_size: int = 32, seed: int = 0,
) -> float:
    """Mean tau-b within disjoint random lists of `list_size` items (the batches a scheduler really orders)."""
    if list_size < 2:
        raise ValueError(f"list_size must be >= 2, got {list_size}")
    a = np.asarray(lengths, dtype=np.float64)
    b = np.asarray(scores, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(a))
    taus = [kendall_tau(a[idx], b[idx]) for idx in np.array_split(order, max(1, len(a) // list_size))]
    taus = [t for t in taus if not np.isnan(t)]
    return float(np.mean(taus)) if taus else float("nan")
