"""Bradley-Terry fit, closed form, bootstrap and the judgment → battle conversion (swap and weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.evals.arena_hard.battles import Battle, battles_from_judgments, game_battle, style_features
from lmstack.evals.arena_hard.score import BradleyTerry, bootstrap_fits, closed_form_single_baseline, leaderboard


def simulate(strengths: dict[str, float], games_per_pair: int, seed: int, tie_band: float = 0.0) -> list[Battle]:
    """Battles between every pair, A winning with probability sigmoid(β_A − β_B); near-even games may tie."""
    rng = np.random.default_rng(seed)
    names = list(strengths)
    battles = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            p = 1 / (1 + math.exp(strengths[b] - strengths[a]))
            for g in range(games_per_pair):
                u = rng.random()
                outcome = 0.5 if abs(u - p) < tie_band else float(u < p)
                first, second = (a, b) if g % 2 == 0 else (b, a)
                battles.append(Battle(f"{a}-{b}-{g}", first, second, outcome if first == a else 1 - outcome, 1.0))
    return battles


def test_bt_recovers_known_strengths() -> None:
    truth = {"base": 0.0, "m1": 1.2, "m2": -0.8, "m3": 0.4}
    fit = BradleyTerry("base", l2=0.0).fit(simulate(truth, 3000, seed=1))
    for m, beta in truth.items():
        assert fit.coef_[m] == pytest.approx(beta, abs=0.08), m
    ratings = fit.ratings_
    assert ratings["base"] == 1000.0
    assert ratings["m1"] == pytest.approx(1000 + 400 * fit.coef_["m1"] / math.log(10))
    assert fit.predict_proba("m1", "m2") == pytest.approx(1 / (1 + math.exp(-(fit.coef_["m1"] - fit.coef_["m2"]))))


def test_ties_count_half_a_win() -> None:
    battles = [Battle("q", "base", "m", 0.5, 1.0) for _ in range(10)]
    fit = BradleyTerry("base", l2=0.0).fit(battles)
    assert fit.coef_["m"] == pytest.approx(0.0, abs=1e-9)


def test_closed_form_equals_logistic_fit_for_single_baseline() -> None:
    rng = np.random.default_rng(0)
    battles = []
    for m, p in (("m1", 0.7), ("m2", 0.3), ("m3", 0.5)):
        for i in range(80):
            outcome = float(rng.choice([0.0, 0.5, 1.0], p=[(1 - p) * 0.8, 0.2, p * 0.8]))
            weight = float(rng.choice([1.0, 3.0]))
            a, b = ("base", m) if i % 2 else (m, "base")
            battles.append(Battle(f"q{i}", a, b, outcome, weight))
    closed = closed_form_single_baseline(battles, "base")
    fit = BradleyTerry("base", l2=0.0).fit(battles)
    for m in ("m1", "m2", "m3"):
        assert fit.coef_[m] == pytest.approx(closed[m], abs=1e-8)


def test_swap_and_decisive_weight_are_applied_exactly_once() -> None:
    # Game 1: baseline is A. "A>>B" = baseline wins decisively → weight 3, position A (baseline) outcome 1.
    g1 = game_battle("q", 0, "A>>B", "model", "base", 3.0)
    assert (g1.model_a, g1.model_b, g1.outcome, g1.weight) == ("base", "model", 1.0, 3.0)
    # Game 2: model is A. The same label now means the model wins decisively.
    g2 = game_battle("q", 1, "A>>B", "model", "base", 3.0)
    assert (g2.model_a, g2.model_b, g2.outcome, g2.weight) == ("model", "base", 1.0, 3.0)
    # A consistent judge (model better in both positions) gives the model every win, weight 1 each.
    record = {"question_id": "q", "model": "model", "games": [{"score": "B>A"}, {"score": "A>B"}]}
    bs = battles_from_judgments([record], "base", decisive_weight=3.0)
    fit = BradleyTerry("base", l2=1e-6).fit(bs.battles)
    assert [b.weight for b in bs.battles] == [1.0, 1.0]
    assert fit.win_rates()["model"] > 0.99
    # Decisive verdicts in both games: 3 + 3 model wins against 1 baseline win (slight, game 1 reversed).
    recs = [{"question_id": "q1", "model": "m", "games": [{"score": "B>>A"}, {"score": "A>>B"}]},
            {"question_id": "q2", "model": "m", "games": [{"score": "A>B"}, {"score": None}]}]
    bs = battles_from_judgments(recs, "base", decisive_weight=3.0)
    closed = closed_form_single_baseline(bs.battles, "base")
    assert closed["m"] == pytest.approx(math.log(6 / 1))
    assert bs.unparsed == {"m": 1} and bs.games == {"m": 4} and bs.parse_failure_rate == 0.25


def test_unknown_label_and_other_baseline_are_rejected() -> None:
    with pytest.raises(LmstackError, match="unknown verdict"):
        game_battle("q", 0, "A>>>B", "m", "base", 3.0)
    with pytest.raises(LmstackError, match="not the baseline"):
        battles_from_judgments([{"question_id": "q", "model": "m", "baseline": "other",
                                 "games": [{"score": "A>B"}, {"score": "A>B"}]}], "base")


def test_bootstrap_is_seeded_and_brackets_the_fit() -> None:
    battles = simulate({"base": 0.0, "m": 0.6}, 200, seed=3, tie_band=0.05)
    fit, rows = leaderboard(battles, "base", rounds=50, seed=7)
    _, again = leaderboard(battles, "base", rounds=50, seed=7)
    row = next(r for r in rows if r.model == "m")
    assert row.bootstrap == next(r for r in again if r.model == "m").bootstrap
    assert row.lower < row.score < row.upper
    assert row.score == pytest.approx(100 * fit.win_rates()["m"])
    assert len(bootstrap_fits(battles, "base", 5, 0)) == 5


def test_style_control_absorbs_a_length_bias() -> None:
    """Two equally good models; the judge favours the longer answer, and m is always the longer one."""
    rng = np.random.default_rng(0)
    battles = []
    for i in range(400):
        long_m = rng.random() < 0.8
        len_m, len_base = (800.0, 200.0) if long_m else (200.0, 800.0)
        p_m = 0.8 if long_m else 0.2  # the judge only rewards length
        outcome = float(rng.random() < p_m)
        sm = {"length": len_m, "headers": 0.0, "lists": 0.0, "bold": 0.0}
        sb = {"length": len_base, "headers": 0.0, "lists": 0.0, "bold": 0.0}
        battles.append(Battle(f"q{i}", "m", "base", outcome, 1.0, sm, sb))
    raw = BradleyTerry("base").fit(battles)
    controlled = BradleyTerry("base", style=True).fit(battles)
    assert raw.win_rates()["m"] > 0.6
    assert abs(controlled.win_rates()["m"] - 0.5) < 0.08
    assert controlled.style_coef_["length"] > 0.5


def test_style_features_count_markdown() -> None:
    text = "# Title\n\nSome **bold** text.\n\n- one\n- two\n1. three\n"
    assert style_features(text, 42) == {"length": 42.0, "headers": 1.0, "lists": 3.0, "bold": 1.0}
