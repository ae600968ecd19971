"""ListMLE against brute-force Plackett-Luce probabilities, and Kendall's tau against scipy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lmstack.ranking import kendall_tau, listmle_loss, per_list_tau


def plackett_luce_prob(scores: list[float], order: tuple[int, ...]) -> float:
    """P(order) when items are drawn one by one, each with probability exp(s) / sum of the rest's exp(s)."""
    remaining = list(order)
    p = 1.0
    for item in order:
        p *= math.exp(scores[item]) / sum(math.exp(scores[j]) for j in remaining)
        remaining.remove(item)
    return p


def test_listmle_equals_brute_force_on_tiny_lists() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 4, 5):
        scores = torch.randn(1, n, generator=gen, dtype=torch.float64)
        lengths = torch.randperm(n, generator=gen)[None] * 10 + 3  # distinct lengths: one true order
        s = scores[0].tolist()
        probs = {perm: plackett_luce_prob(s, perm) for perm in itertools.permutations(range(n))}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)  # a distribution over all n! orders
        longest_first = tuple(sorted(range(n), key=lambda i: -int(lengths[0, i])))
        expected = -math.log(probs[longest_first])
        assert listmle_loss(scores, lengths).item() == pytest.approx(expected, rel=1e-5)


def test_listmle_is_a_mean_over_lists_and_prefers_the_true_order() -> None:
    lengths = torch.tensor([[5, 50, 500, 5000], [1, 2, 3, 4]])
    right = torch.log(lengths.double())  # scores in the true order
    wrong = -right
    assert listmle_loss(right, lengths) < listmle_loss(wrong, lengths)
    both = listmle_loss(right, lengths).item()
    each = [listmle_loss(right[i : i + 1], lengths[i : i + 1]).item() for i in range(2)]
    assert both == pytest.approx(sum(each) / 2, rel=1e-6)


def test_listmle_is_stable_with_huge_scores_and_padding() -> None:
    scores = torch.tensor([[3000.0, 2990.0, -4000.0, 0.0, 7.0]], requires_grad=True)
    lengths = torch.tensor([[10, 20, 30, 40, 50]])
    mask = torch.tensor([[True, True, True, False, False]])
    loss = listmle_loss(scores, lengths, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert scores.grad[0, 3:].abs().max() == 0  # padded slots get no gradient
    unpadded = listmle_loss(scores[:, :3].detach(), lengths[:, :3])
    assert loss.item() == pytest.approx(unpadded.item(), rel=1e-6)
    # The true order draws the -4000 item first: -log P = (lse(3000, 2990, -4000) + 4000) + (lse(3000, 2990) - 2990).
    lse = math.log1p(math.exp(-10))
    assert loss.item() == pytest.approx(7000 + lse + 10 + lse, rel=1e-6)


def test_listmle_breaks_ties_at_random() -> None:
    scores = torch.tensor([[2.0, 0.0]])
    tied = torch.tensor([[7, 7]])
    gen = torch.Generator().manual_seed(0)
    losses = {round(listmle_loss(scores, tied, generator=gen).item(), 6) for _ in range(40)}
    assert len(losses) == 2  # both orders of the tied pair occur


def _tau_brute(x: list[float], y: list[float]) -> float:
    n = len(x)
    c = d = tx = ty = 0
    for i, j in itertools.combinations(range(n), 2):
        a, b = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        c += a * b > 0
        d += a * b < 0
        tx += a == 0
        ty += b == 0
    pairs = n * (n - 1) / 2
    return (c - d) / math.sqrt((pairs - tx) * (pairs - ty))


def test_kendall_tau_b_matches_brute_force_and_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 700).astype(float)  # many ties, and more rows than one comparison chunk
    y = x + rng.normal(0, 2, 700).round()
    assert kendall_tau(x[:60], y[:60]) == pytest.approx(_tau_brute(list(x[:60]), list(y[:60])), abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-10)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_per_list_tau_averages_disjoint_lists() -> None:
    lengths = np.arange(96, dtype=float)
    assert per_list_tau(lengths, lengths * 2, list_size=32) == pytest.approx(1.0)
    noisy = lengths + np.random.default_rng(1).normal(0, 30, 96)
    direct = np.mean([kendall_tau(lengths[idx], noisy[idx])
                      for idx in np.array_split(np.random.default_rng(5).permutation(96), 3)])
    assert per_list_tau(lengths, noisy, list_size=32, seed=5) == pytest.approx(direct)
