"""Bradley-Terry scores by maximum likelihood, bootstrap confidence intervals and optional style control.

P(A beats B) = sigmoid(β_A − β_B [+ γ·style(A, B)]) is a logistic regression without intercept on a design
row with +1 in A's column and −1 in B's; the anchor (the baseline) is left out of the design so its β is fixed
at 0. A tie is half a win for each side (target 0.5), a decisive verdict carries its weight. Ratings are shown on
Arena-Hard's Elo scale (1000 + 400·β/ln 10) and as the predicted win rate against the baseline.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from lmstack.errors import LmstackError
from lmstack.evals.arena_hard.battles import STYLE_FEATURES, Battle

SCALE, BASE, INIT_RATING = 400.0, 10.0, 1000.0


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float = 0.0, max_iter: int = 200,
                 tol: float = 1e-10) -> np.ndarray:
    """Weighted logistic regression without intercept by damped Newton; y may be fractional (ties = 0.5).

    x: [n, d], y: [n] in [0, 1], w: [n] >= 0 → coefficients [d]. `l2` keeps the optimum finite when a model
    wins (or loses) every game, which bootstrap resamples of small benchmarks do produce.
    """
    beta = np.zeros(x.shape[1])

    def loss(b: np.ndarray) -> float:
        z = x @ b
        # -log sigmoid(z) = softplus(-z), computed stably.
        return float(np.sum(w * (y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z))) + 0.5 * l2 * b @ b)

    current = loss(beta)
    for _ in range(max_iter):
        p = sigmoid(x @ beta)  # [n]
        grad = x.T @ (w * (p - y)) + l2 * beta  # [d]
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + (l2 + 1e-12) * np.eye(x.shape[1])  # [d, d]
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:
            candidate = beta - t * step
            value = loss(candidate)
            if value <= current + 1e-12:
                break
            t *= 0.5
        beta, current = candidate, value
        if np.max(np.abs(t * step)) < tol:
            break
    return beta


def style_matrix(battles: list[Battle]) -> np.ndarray:
    """[n, 4] normalized differences (a − b)/(a + b) of the style features, scaled to unit RMS per column.

    Not centered: a zero difference must stay "same style", or the mean style gap of a model that is always
    longer would leak back into its strength coefficient.
    """
    raw = np.array([[_norm_diff(b.style_a.get(f, 0.0), b.style_b.get(f, 0.0)) for f in STYLE_FEATURES]
                    for b in battles])  # [n, 4]
    rms = np.sqrt((raw ** 2).mean(axis=0))  # [4]
    return raw / np.where(rms > 0, rms, 1.0)


def _norm_diff(a: float, b: float) -> float:
    return (a - b) / (a + b) if a + b > 0 else 0.0


class BradleyTerry:
    """Bradley-Terry model with a fixed anchor; `style=True` adds the style covariates (style control)."""

    def __init__(self, anchor: str, *, style: bool = False, l2: float = 1e-4) -> None:
        if l2 < 0:
            raise LmstackError(f"l2 must be >= 0, got {l2}")
        self.anchor = anchor
        self.style = style
        self.l2 = l2

    def fit(self, battles: list[Battle]) -> BradleyTerry:
        if not battles:
            raise LmstackError("no battles to fit: every game was unparsable or the judgment files are empty")
        models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
        if self.anchor not in models:
            raise LmstackError(f"the anchor {self.anchor!r} plays in no battle; set --baseline to the model "
                               "every judgment compares against")
        free = [m for m in models if m != self.anchor]
        col = {m: i for i, m in enumerate(free)}
        x = np.zeros((len(battles), len(free)))  # [n, models - 1]
        for i, b in enumerate(battles):
            if b.model_a in col:
                x[i, col[b.model_a]] += 1.0
            if b.model_b in col:
                x[i, col[b.model_b]] -= 1.0
        if self.style:
            if any(not b.style_a or not b.style_b for b in battles):
                raise LmstackError("style control needs the answers' style features; load battles with answers")
            x = np.hstack([x, style_matrix(battles)])  # [n, models - 1 + 4]
        y = np.array([b.outcome for b in battles])
        w = np.array([b.weight for b in battles])
        beta = fit_logistic(x, y, w, self.l2)
        self.coef_: dict[str, float] = {self.anchor: 0.0, **{m: float(beta[col[m]]) for m in free}}
        self.style_coef_: dict[str, float] = (
            {f: float(v) for f, v in zip(STYLE_FEATURES, beta[len(free):], strict=True)} if self.style else {})
        return self

    @property
    def ratings_(self) -> dict[str, float]:
        """Elo-scale ratings, the anchor at 1000."""
        return {m: INIT_RATING + SCALE * c / math.log(BASE) for m, c in self.coef_.items()}

    def predict_proba(self, model_a: str, model_b: str) -> float:
        """P(model_a beats model_b) with equal style (style control's adjusted comparison)."""
        return float(sigmoid(np.array(self.coef_[model_a] - self.coef_[model_b])))

    def win_rates(self) -> dict[str, float]:
        """Predicted win rate of every model against the anchor."""
        return {m: self.predict_proba(m, self.anchor) for m in self.coef_}


def closed_form_single_baseline(battles: list[Battle], anchor: str) -> dict[str, float]:
    """β of each model when every battle is against the anchor: logit of its weighted win share (ties half).

    With only model-vs-anchor battles the likelihood separates per model, so the unpenalized MLE is exact.
    """
    wins: dict[str, float] = defaultdict(float)
    total: dict[str, float] = defaultdict(float)
    for b in battles:
        if anchor not in (b.model_a, b.model_b) or b.model_a == b.model_b:
            raise LmstackError("the closed form needs every battle to be a model against the anchor")
        model, won = (b.model_b, 1 - b.outcome) if b.model_a == anchor else (b.model_a, b.outcome)
        wins[model] += b.weight * won
        total[model] += b.weight
    return {anchor: 0.0, **{m: math.log(wins[m] / (total[m] - wins[m])) for m in total}}


@dataclass
class ScoreRow:
    """One leaderboard line: win rate vs the baseline (%) and Elo-scale rating, each with its bootstrap CI."""

    model: str
    score: float
    lower: float
    upper: float
    rating: float
    rating_lower: float
    rating_upper: float
    games: int = 0
    unparsed: int = 0
    avg_tokens: float | None = None
    bootstrap: list[float] = field(default_factory=list)  # win rates (%) of the bootstrap rounds


def bootstrap_fits(battles: list[Battle], anchor: str, rounds: int, seed: int, style: bool = False,
                   l2: float = 1e-4) -> list[BradleyTerry]:
    """Refit on `rounds` resamples of the questions (with replacement; a question's games stay together,
    since its two position-swapped games are not independent)."""
    if rounds < 1:
        raise LmstackError(f"bootstrap rounds must be >= 1, got {rounds}")
    by_question: dict[str, list[Battle]] = defaultdict(list)
    for b in battles:
        by_question[b.question_id].append(b)
    qids = sorted(by_question)
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(rounds):
        sample = [b for i in rng.integers(0, len(qids), len(qids)) for b in by_question[qids[i]]]
        fits.append(BradleyTerry(anchor, style=style, l2=l2).fit(sample))
    return fits


def leaderboard(battles: list[Battle], anchor: str, *, rounds: int = 100, seed: int = 0, style: bool = False,
                l2: float = 1e-4, ci: float = 0.95) -> tuple[BradleyTerry, list[ScoreRow]]:
    """Point fit plus percentile CIs from the bootstrap, sorted by score (best first)."""
    fit = BradleyTerry(anchor, style=style, l2=l2).fit(battles)
    boots = bootstrap_fits(battles, anchor, rounds, seed, style, l2)
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    rows = []
    for m in fit.coef_:
        rates = np.array([100 * bt.win_rates().get(m, 0.5) for bt in boots])
        ratings = np.array([bt.ratings_.get(m, INIT_RATING) for bt in boots])
        rows.append(ScoreRow(m, 100 * fit.win_rates()[m], float(np.percentile(rates, lo_q)),
                             float(np.percentile(rates, hi_q)), fit.ratings_[m],
                             float(np.percentile(ratings, lo_q)), float(np.percentile(ratings, hi_q)),
                             bootstrap=[round(float(r), 4) for r in rates]))
    rows.sort(key=lambda r: -r.score)
    return fit, rows
