"""SmartSpec's acceptance model: per-position hazards, conditioned on the previous verification, and what the
controller does with them (long proposals whose tail pays are not cut back)."""

from __future__ import annotations

import numpy as np
import pytest

from lmstack.engine.spec.acceptance import HIT, MISS, NEW, Acceptance, expected_tokens, merge_tables
from lmstack.engine.spec.controller import merge_profiles
from lmstack.engine.spec.latency import FEATURES, StepShape, size_bucket, step_features
from lmstack.engine.spec.smartspec import SmartSpec, make_controller
from test_spec import _measured, _set_rates, _shape

# An n-gram-like proposer: the first token is the gamble; once it is accepted, the span nearly always continues.
SPAN = np.array([0.4, 0.95, 0.95, 0.95, 0.95])


def _verify(rng: np.random.Generator, hazards: np.ndarray, k: int = 5) -> int:
    """Accepted tokens of k proposals, the j-th accepted with probability hazards[j] once 1..j-1 were."""
    draws = rng.random(k) < hazards[:k]
    return k if draws.all() else int(np.argmin(draws))


def _feed(observe, hazards: np.ndarray, keys: int, rounds: int = 100, seed: int = 5) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for key in range(keys):
            observe(key, 5, _verify(rng, hazards))


def test_hazards_by_position_recover_a_planted_span_process() -> None:
    """The chance of the whole proposal is 0.4 * 0.95^4, not (pooled rate)^5: one rate (0.8 here) would
    overprice the first token and underprice the last one."""
    acc = Acceptance(5)
    _feed(acc.observe, SPAN, keys=8)
    survival = np.mean([acc.survival(key) for key in range(8)], axis=0)
    assert survival == pytest.approx(np.cumprod(SPAN), abs=0.07)
    pooled = acc.total_accepted / acc.total_tested
    assert pooled > 0.7 and pooled ** 5 < 0.7 * np.prod(SPAN) and pooled > 1.5 * SPAN[0]
    assert expected_tokens(survival, 5) == pytest.approx(1 + np.cumprod(SPAN).sum(), rel=0.08)


def test_hazards_are_conditioned_on_the_previous_verification() -> None:
    """A request that was inside a span (its last proposal fully accepted) is likely still in it."""
    acc = Acceptance(5)
    rng = np.random.default_rng(0)
    last = dict.fromkeys(range(8), False)
    for _ in range(150):
        for key in range(8):
            first = 0.9 if last[key] else 0.2
            accepted = _verify(rng, np.array([first, 0.9, 0.9, 0.9, 0.9]))
            acc.observe(key, 5, accepted)
            last[key] = accepted == 5
    assert acc.hazards(HIT)[0] == pytest.approx(0.9, abs=0.08)
    assert acc.hazards(MISS)[0] == pytest.approx(0.2, abs=0.08)
    assert acc.hazards(NEW)[0] == pytest.approx(acc.rate, abs=0.15)  # never seen: the overall rate
    acc.observe("in", 5, 5)
    acc.observe("out", 5, 0)
    assert acc.survival("in")[0] > 2 * acc.survival("out")[0]


def test_smartspec_keeps_long_proposals_whose_tail_pays() -> None:
    """Every proposed token costs 1.5 ms on an 8-request batch; with SPAN acceptance K = 5 has the best goodput.
    A geometric model with the pooled rate undervalues the 4th and 5th tokens and settles for a shorter k."""
    ctl = _measured(lambda b, k: 0.04 + 0.004 * b + 0.0015 * b * k + (0.002 * b if k else 0.0))
    _feed(ctl.acceptance.observe, SPAN, keys=8)
    true = [np.cumprod(SPAN)] * 8
    best = max(range(6), key=lambda k: ctl.goodput(_shape(8), k, true))
    assert best == 5
    lengths = ctl.plan(_shape(8))
    assert sorted(lengths)[1:] == [5] * 7  # a request that just missed twice may be trimmed
    assert ctl.goodput(_shape(8), lengths, true) > 0.97 * ctl.goodput(_shape(8), 5, true)
    pooled = ctl.acceptance.total_accepted / ctl.acceptance.total_tested
    geometric = [pooled ** np.arange(1, 6)] * 8
    scores, options = ctl.options(_shape(8), geometric)
    old = options[int(np.argmax(scores))].tolist()
    assert max(old) < 5 and ctl.goodput(_shape(8), old, true) < ctl.goodput(_shape(8), lengths, true)


def test_smartspec_still_declines_speculation_that_does_not_pay() -> None:
    """The same spans at a cost of 5 ms per proposed token: plain decoding wins."""
    ctl = _measured(lambda b, k: 0.04 + 0.004 * b + 0.005 * b * k + (0.002 * b if k else 0.0))
    _feed(ctl.acceptance.observe, SPAN, keys=8)
    assert ctl.plan(_shape(8)) == [0] * 8


def test_acceptance_counts_travel_in_profiles() -> None:
    """A fixed k = 1 run only tests position 1 and a k = 5 run all five: merged, they warm-start a SmartSpec
    whose hazards match what was observed, weighted as one discount window so its own steps soon dominate."""
    short, long = make_controller(1, 1, False), make_controller(5, 5, False)
    rng = np.random.default_rng(1)
    for _ in range(200):
        short.acceptance.observe(0, 1, _verify(rng, SPAN, 1))
    _feed(long.acceptance.observe, SPAN, keys=8)
    merged = merge_profiles([short.profile(), long.profile()])
    assert merge_tables([short.profile()["acceptance_table"], long.profile()["acceptance_table"]]) \
        == merged["acceptance_table"]
    assert len(merged["acceptance_table"]["tested"][0]) == 5
    warm = make_controller("smart", 5, False)
    warm.load_profile(merged)
    assert warm.acceptance.tested.sum() == pytest.approx(1 / (1 - warm.acceptance.global_decay))
    for state in (HIT, MISS):
        assert warm.acceptance.hazards(state) == pytest.approx(long.acceptance.hazards(state), abs=0.1)
    old = dict(merged, acceptance_table=None)  # a profile written before the table existed: the rate alone
    warm = make_controller("smart", 5, False)
    warm.load_profile(old)
    assert warm.acceptance.survival("new")[0] == pytest.approx(merged["acceptance"])


def test_a_steps_verifications_at_once_count_as_one_by_one() -> None:
    rng = np.random.default_rng(4)
    one, many = Acceptance(5), Acceptance(5)
    for _ in range(30):
        keys = rng.choice(12, size=int(rng.integers(1, 9)), replace=False).tolist()
        proposed = rng.integers(0, 6, len(keys)).tolist()
        accepted = [int(rng.integers(0, p + 1)) for p in proposed]
        for key, p, a in zip(keys, proposed, accepted, strict=True):
            one.observe(key, p, a)
        many.observe_many(keys, proposed, accepted)
    np.testing.assert_allclose(many.accepted, one.accepted, rtol=1e-12)
    np.testing.assert_allclose(many.tested, one.tested, rtol=1e-12)
    np.testing.assert_array_equal(many.table, one.table)
    assert (many.total_proposed, many.total_accepted, many.total_tested) == (
        one.total_proposed, one.total_accepted, one.total_tested)
    np.testing.assert_allclose(many.survivals(list(range(12))), one.survivals(list(range(12))), rtol=1e-12)
    with pytest.raises(ValueError, match="accepted"):
        many.observe_many([0, 1], [2, 3], [1, 4])


def test_per_request_counts_survive_growth_and_forgetting() -> None:
    """200 requests come and go (more than the first 64 rows; finished ones are forgotten and their rows reused):
    each request's survivals equal those computed from a plain per-request record of its own verifications."""
    rng = np.random.default_rng(5)
    acc, m = Acceptance(5), Acceptance(5).request_shrink
    own: dict[int, tuple[int, np.ndarray]] = {}  # key -> (state, [accepted, tested] counts)
    live: list[int] = []
    for key in range(200):
        live.append(key)
        if len(live) > 80 or rng.random() < 0.1:
            gone = live.pop(int(rng.integers(len(live))))
            acc.forget(gone)
            own.pop(gone, None)
        step = rng.choice(live, size=min(len(live), 24), replace=False).tolist()
        proposed = rng.integers(1, 6, len(step)).tolist()
        accepted = [int(rng.integers(0, p + 1)) for p in proposed]
        acc.observe_many(step, proposed, accepted)
        for k, p, a in zip(step, proposed, accepted, strict=True):
            counts = own.get(k, (NEW, np.zeros((2, 5))))[1] * acc.request_decay
            counts[0, :a] += 1.0
            counts[1, : min(a + 1, p)] += 1.0
            own[k] = (HIT if a == p else MISS, counts)
    hazards = acc._state_hazards()
    keys = [*live, 999]  # 999: never seen
    expected = [np.cumprod((c[0] + m * hazards[st]) / (c[1] + m))
                for st, c in (own.get(k, (NEW, np.zeros((2, 5)))) for k in keys)]
    np.testing.assert_allclose(acc.survivals(keys), np.array(expected), rtol=1e-12)
    assert acc.states(keys) == [own.get(k, (NEW, None))[0] for k in keys]


def _model(ctl: SmartSpec, shape: StepShape, f: np.ndarray, k: int) -> float:
    """`predict`, except that in a step which prefills only what proposing adds is corrected as k's."""
    b = len(shape.caps)
    if not shape.mixed:
        return ctl.predict(f, k, b)
    corrections = ctl._corrections(b)
    plain = ctl.predict(ctl.features(shape, [0] * b), 0, b) / corrections[0]
    return plain * corrections[0] + (ctl.predict(f, k, b) / corrections[k] - plain) * corrections[k]


@pytest.mark.parametrize("draft_forwards", [False, True])
def test_vectorized_step_times_are_the_latency_model(draft_forwards: bool) -> None:
    """What `plan` evaluates for all k at once equals `predict` of each option's features (in a step that
    prefills, with the correction applied as `_step_times` says)."""
    rng = np.random.default_rng(6)
    for _ in range(20):
        ctl = SmartSpec(5, draft_forwards)
        ctl.coef = rng.uniform(0, 1e-3, len(FEATURES)) * (rng.uniform(size=len(FEATURES)) > 0.3)
        ctl.correction = {(spec, b): float(rng.uniform(0.5, 2.0)) for spec in (False, True) for b in range(8)}
        b = int(rng.integers(1, 20))
        shape = StepShape(batched_tokens=b + int(rng.integers(0, 50)), kv_tokens=int(rng.integers(10, 5000)),
                          num_other_samples=0, keys=list(range(b)), caps=rng.integers(0, 6, b).tolist(),
                          num_chunks=b + 1, mixed=bool(rng.integers(0, 2)), lags=rng.integers(0, 40, b).tolist(),
                          graph_batch=int(rng.choice([0, 24, 32])), graph_len=int(rng.integers(2, 7)),
                          graphs=bool(rng.integers(0, 2)))
        lengths = rng.integers(0, 6, (6, b))
        expected = 1.0 + np.arange(6)[None, :] * rng.uniform(0, 1, (b, 1))
        # Without `remaining`, lags are charged in full: the draft tokens the step will measure.
        seconds, per_token = ctl._step_times(shape, lengths, ctl._catch_up(shape, lengths, expected))
        for row, s, t in zip(lengths.tolist(), seconds, per_token, strict=True):
            f = ctl.features(shape, row)
            assert s == pytest.approx(_model(ctl, shape, f, max(row)), rel=1e-12)
            # One proposed token fewer: one batched and KV token fewer, unless the step is padded to a chunk
            # graph's rows anyway; one draft token fewer.
            padded = shape.padded(max(row)) is not None
            one = np.zeros(len(FEATURES))
            for name in (() if padded else ("batched_tokens", "kv_tokens")) + (
                    ("draft_tokens",) if draft_forwards else ()):
                one[FEATURES.index(name)] = 1.0
            assert t == pytest.approx(s - _model(ctl, shape, f - one, max(row)), rel=1e-9, abs=1e-9 * s)


def test_a_proposal_length_measured_dearer_than_the_model_is_avoided() -> None:
    """Steps whose longest proposal is 5 take 30% longer than a model linear in tokens says (on the H200, steps
    of k = 2 and 4 ran 10-43% over it): measured 12 times per batch size, k = 5 gets its own correction and
    SmartSpec proposes 4 where it would otherwise propose 5; measured 6 times (< min_k_samples), it cannot
    tell that k from the rest and keeps mostly 5."""

    def linear(b: int, k: int) -> float:
        return 0.04 + 0.004 * b + 0.0002 * b * k + (0.01 * b if k else 0.0)

    def dear_five(b: int, k: int) -> float:
        return linear(b, k) * (1.3 if k == 5 else 1.0)

    for seconds, rounds, plan in ((linear, 12, [5] * 8), (dear_five, 12, [4] * 8)):
        ctl = _measured(seconds, rounds=rounds)
        _set_rates(ctl, [0.75] * 8)
        assert ctl.plan(_shape(8)) == plan
    few = _measured(dear_five, rounds=6)
    assert few.k_correction == {}


def test_chunk_graph_padding_makes_trimming_pointless() -> None:
    """Four requests whose proposals are accepted and four whose are not, every computed row costing 20 us: run
    as is, the rejected ones stop proposing (their rows cost time); replayed from a chunk graph, every row is
    computed at the longest chunk's length anyway, so all propose K (a rejected proposal costs nothing)."""
    ctl = SmartSpec(5, False)
    ctl.coef = np.array([1e-3, 2e-5, 0.0, 0.0, 0.0, 2e-4, 0.0, 0.0])
    _set_rates(ctl, [0.98] * 4 + [0.05] * 4)
    assert ctl.plan(_shape(8)) == [5] * 4 + [0] * 4
    graphed = _shape(8)
    graphed.graph_batch, graphed.graph_len = 8, 6
    assert ctl.plan(graphed) == [5] * 8
    assert ctl.features(graphed, [5] * 4 + [0] * 4)[FEATURES.index("batched_tokens")] == 8 * 6


def test_eager_steps_get_their_own_cost() -> None:
    """Steps timed as on the H200 with a small model: a replayed graph costs 1.4 ms plus 5 us per computed row (a
    verify step's rows padded to its chunk graph's batch and length), an eager step (here: any step with a
    prefill of 160 tokens) 12 ms more. Told which steps ran eagerly, the model gives them their own cost instead
    of spreading it over batched tokens, predicts a graphed verify step of 24 decodes at k = 5 within 5%, and
    SmartSpec proposes 5 at 76% acceptance; a prefill step is predicted eager at every k."""
    from lmstack.engine.runner import GRAPH_BATCH_SIZES

    rng = np.random.default_rng(7)
    ctl = SmartSpec(5, False)
    for _ in range(6):
        for k in range(6):
            for b in (1, 2, 4, 8, 16, 24):
                bucket = next(g for g in GRAPH_BATCH_SIZES if g >= b)
                rows = bucket * (k + 1) if k else b
                f = step_features(rows, 300 * b + rows, 0, 0, b if k else 0)
                ctl.observe_step(k, b, f, (1.4e-3 + 5e-6 * rows) * (1 + 0.01 * rng.standard_normal()))
                rows = 160 + b * (k + 1)
                f = step_features(rows, 300 * b + rows, 0, 0, b + 1, eager=True)
                ctl.observe_step(k, b, f, (13.4e-3 + 5e-6 * rows) * (1 + 0.01 * rng.standard_normal()))
    ctl.maintain()
    _set_rates(ctl, [0.76] * 24)
    shape = StepShape(batched_tokens=24, kv_tokens=300 * 24, num_other_samples=0, keys=list(range(24)),
                      caps=[5] * 24, graph_batch=24, graph_len=6, graphs=True)
    assert ctl.coef[FEATURES.index("eager")] == pytest.approx(12e-3, rel=0.1)
    assert ctl.predict(ctl.features(shape, 5), 5, 24) == pytest.approx(1.4e-3 + 5e-6 * 144, rel=0.05)
    assert ctl.choose(shape) == 5
    prefill = StepShape(batched_tokens=184, kv_tokens=300 * 24 + 160, num_other_samples=1, keys=list(range(24)),
                        caps=[5] * 24, num_chunks=25, mixed=True, graphs=True)
    eager = FEATURES.index("eager")
    assert all(ctl.features(prefill, k)[eager] == 1.0 for k in range(6))
    assert [ctl.features(shape, k)[eager] for k in range(6)] == [0.0] * 6
    shape.graph_len = 4  # k = 4, 5 have no chunk graph: they run eagerly
    assert [ctl.features(shape, k)[eager] for k in range(6)] == [0.0] * 4 + [1.0] * 2


def _count_choices(ctl: SmartSpec) -> list[int]:
    """A list that grows by one each time `ctl` chooses afresh (calls `options`)."""
    calls: list[int] = []
    options = ctl.options
    ctl.options = lambda *a: calls.append(1) or options(*a)  # type: ignore[method-assign]
    return calls


def test_a_decision_is_reused_only_by_steps_of_the_same_make_up() -> None:
    """Within `replan_every` steps, a step of the same (cap, acceptance state) multiset gets the decision again
    without re-choosing; another make-up, a prefill, a later step or a refit chooses afresh, and what is reused
    is what choosing would give."""
    fresh, reusing = _measured(lambda b, k: 0.05 + 0.001 * b * k), _measured(lambda b, k: 0.05 + 0.001 * b * k)
    fresh.replan_every = 1
    reusing.reuse_share = 0.0  # these steps take 50 ms: with the default share, choosing would be too cheap to skip
    for ctl in (fresh, reusing):
        _set_rates(ctl, [0.9] * 4)
    calls = _count_choices(reusing)
    shape = _shape(4)
    assert reusing.plan(shape) == fresh.plan(shape) and max(fresh.plan(shape)) > 0 and len(calls) == 1
    reordered = _shape(4)
    reordered.keys = [3, 2, 1, 0]  # the same multiset of (cap, state)
    assert reusing.plan(reordered) == fresh.plan(reordered) and len(calls) == 1
    capped = _shape(4)
    capped.caps = [5, 5, 5, 2]
    assert reusing.plan(capped) == fresh.plan(capped) and len(calls) == 2
    prefill = _shape(4)
    prefill.mixed = True
    reusing.plan(prefill)
    assert len(calls) == 3
    reusing.steps += reusing.replan_every
    reusing.plan(shape)
    assert len(calls) == 4
    reusing.refit()
    reusing.plan(shape)
    assert len(calls) == 5
    fresh_calls = _count_choices(fresh)
    fresh.plan(shape), fresh.plan(shape)
    assert len(fresh_calls) == 2


def test_decisions_are_reused_only_where_choosing_is_a_visible_share_of_a_step() -> None:
    """Steps of 50 ms (a CPU): choosing (well under 0.5 ms) is below 1% of a step, so every step chooses; steps
    of 50 us (a small model on a fast GPU, scaled down): above it, so a decision is reused."""
    for step, reused in ((0.05, False), (5e-5, True)):
        ctl = _measured(lambda b, k, step=step: step * (1 + 0.1 * k))
        _set_rates(ctl, [0.9] * 4)
        calls = _count_choices(ctl)
        for _ in range(6):
            ctl.plan(_shape(4))
        assert (len(calls) < 6) == reused


def test_a_step_is_measured_without_the_time_spent_choosing_it() -> None:
    """Choosing costs the same whatever k is chosen, and fixed-k steps never pay it: a step of 50 ms whose plan
    took 20 ms is recorded as 30 ms; a step planned without delay keeps its full time."""
    import time

    ctl = _measured(lambda b, k: 0.05)
    _set_rates(ctl, [0.9] * 4)
    ctl.replan_every = 1
    options = ctl.options
    ctl.options = lambda *a: time.sleep(0.02) or options(*a)  # type: ignore[method-assign]
    features = step_features(4, 1200, 0, 0, 0)
    for slow, expected in ((True, 0.03), (False, 0.05)):
        if slow:
            ctl.plan(_shape(4))
        ctl.observe_step(0, 4, features, 0.05)
        recorded = ctl.samples[(0, size_bucket(4))].rows()[-1][2]
        assert abs(recorded - expected) < 0.004


def test_the_next_k_is_chosen_while_the_device_runs_the_step() -> None:
    """`plan_ahead` chooses for the next step; the next `plan` takes that k without choosing when it decodes,
    one step later, nearly the same requests (at most 1 in 8 finished or joined), and either decodes only or
    the k is K (a step that also prefills pays less for proposals). Where choosing is cheap next to a step (a
    CPU), nothing is chosen ahead."""
    def prepared(n: int, step_s: float = 5e-5, per_k: float = 1e-6, alpha: float = 0.9
                 ) -> tuple[SmartSpec, list[int]]:
        ctl = _measured(lambda b, k: step_s + per_k * b * k)
        ctl.reuse_share = 0.01
        _set_rates(ctl, [alpha] * 24)
        fresh = ctl.plan(_shape(n))  # also times choosing, for `_reusable`
        ctl._plans.clear()  # only the choice made ahead may serve a later step
        ctl.plan_ahead(_shape(n))
        return ctl, fresh

    def decodes(keys: list[int]) -> StepShape:
        return StepShape(batched_tokens=len(keys), kv_tokens=300 * len(keys), num_other_samples=0, keys=keys,
                         caps=[5] * len(keys))

    features = step_features(4, 1200, 0, 0, 0)
    mixed = StepShape(batched_tokens=20, kv_tokens=1200, num_other_samples=1, keys=list(range(4)), caps=[5] * 4,
                      num_chunks=5, mixed=True)
    cases = [  # (decodes chosen ahead for, next step, steps later, taken)
        (4, _shape(4), 1, True), (16, _shape(16), 1, True),
        (16, decodes(list(range(15))), 1, True),  # one of 16 finished
        (16, decodes(list(range(17))), 1, True),  # one prompt joined
        (16, decodes(list(range(1, 17))), 1, True),  # both: 2 of 16
        (16, decodes(list(range(3, 19))), 1, False),  # 6 of 16 differ
        (4, decodes([0, 1, 3]), 1, False),  # one of 4 finished
        (4, mixed, 1, True), (4, _shape(4), 2, False),
    ]
    short_k = [(4, mixed, 1, False), (4, _shape(4), 1, True)]  # less accepted and dearer proposals: k < K
    for short, (n, step, steps_later, taken) in [*((False, c) for c in cases), *((True, c) for c in short_k)]:
        ctl, fresh = prepared(n, per_k=3e-6, alpha=0.7) if short else prepared(n)
        calls = _count_choices(ctl)
        for _ in range(steps_later):
            ctl.observe_step(5, 4, features, 5e-5)
        lengths = ctl.plan(step)
        assert (not calls) == taken, (n, step.keys, steps_later)
        assert (0 < max(fresh) < 5) if short else max(fresh) == 5
        if taken:
            assert lengths == [max(fresh)] * len(step.keys)
    ctl, _ = prepared(4, 0.05)  # 50 ms steps: choosing is below 1% of one
    assert ctl._ahead is None


def test_a_k_taken_ahead_is_passed_on_until_it_is_replan_every_steps_old() -> None:
    """Steps that take the k chosen ahead pass it on to the next without choosing again, until the choice is
    `replan_every` steps old; a refit of the latency model makes the next step choose afresh."""
    ctl = _measured(lambda b, k: 5e-5 + 1e-6 * b * k)
    _set_rates(ctl, [0.9] * 16)
    first = ctl.plan(_shape(16))  # times choosing, for `_reusable`
    ctl._plans.clear()
    ctl.plan_ahead(_shape(16))
    calls = _count_choices(ctl)
    features = step_features(16, 4800, 0, 0, 0)
    for step in range(1, 21):
        ctl.observe_step(5, 16, features, 5e-5)
        assert ctl.plan(_shape(16)) == [max(first)] * 16
        ctl.plan_ahead(_shape(16))
        assert len(calls) == (step >= ctl.replan_every), step
    ctl.observe_step(5, 16, features, 5e-5)
    ctl.plan(_shape(16))
    ctl.refit()
    ctl.plan_ahead(_shape(16))
    assert len(calls) == 2
