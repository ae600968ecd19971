"""A draft model's lag: tokens it must catch up on before proposing, which SmartSpec charges to the step.

A request admitted while k = 0 won (or that sat steps out) has a draft cache behind its target cache; its next
proposal first runs the draft over everything it missed. That cost is paid once and spread over the request's
remaining output, so a long lag stops speculation near a request's end but not at its start.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmstack.engine.spec.latency import StepShape, size_bucket
from lmstack.models import load
from test_spec import GREEDY, MODEL, PROMPTS, _planted, _set_acceptance, perturbed, run

# 50 ms a step, 1 ms per target token, a draft forward 4 ms and 0.5 ms per draft token: speculation pays at
# 80% acceptance when the draft is caught up (see test_a_caught_up_draft_speculates).
CPU_LIKE = np.array([0.05, 0.001, 0.0, 0.004, 0.0005, 0.005])


def _lagging(lags: list[int], remaining: list[int] | None) -> StepShape:
    n = len(lags)
    return StepShape(batched_tokens=n, kv_tokens=300 * n, num_other_samples=0, keys=list(range(n)), caps=[5] * n,
                     lags=lags, remaining=remaining)


def test_a_caught_up_draft_speculates() -> None:
    ctl = _planted(CPU_LIKE)
    _set_acceptance(ctl, 0.8, 4)
    assert ctl.choose(_lagging([0] * 4, [40] * 4)) == 5


@pytest.mark.parametrize("remaining, speculates", [(None, False), (5, False), (40, True), (4000, True)])
def test_a_long_lag_is_charged_over_the_remaining_output(remaining: int | None, speculates: bool) -> None:
    """Catching up 300 tokens costs 0.15 s per request: over 40 more tokens (~11 speculative steps instead of
    40 plain ones) that pays, over 5 it does not, and charged in full to one step it never would."""
    ctl = _planted(CPU_LIKE)
    _set_acceptance(ctl, 0.8, 4)
    shape = _lagging([300] * 4, None if remaining is None else [remaining] * 4)
    assert (ctl.choose(shape) > 0) == speculates


def test_caught_up_requests_propose_while_a_lagging_one_sits_out() -> None:
    ctl = _planted(CPU_LIKE)
    _set_acceptance(ctl, 0.8, 5)
    assert ctl.plan(_lagging([0, 1, 0, 1, 300], [40, 40, 40, 40, 5])) == [5, 5, 5, 5, 0]


def test_exploring_steps_skip_lagging_requests() -> None:
    """Acceptance near zero: k = 0 wins, and every 4th step explores with one token, only where the draft
    is caught up (exploring a lagging request would pay its whole catch-up for one token)."""
    ctl = _planted(CPU_LIKE, explore_every=4)
    _set_acceptance(ctl, 0.02, 4)
    plans = [ctl.plan(_lagging([0, 1, 200, 200], [40] * 4)) for _ in range(8)]
    assert plans == [[0] * 4] * 3 + [[1, 1, 0, 0]] + [[0] * 4] * 3 + [[1, 1, 0, 0]]


def test_the_draft_lag_is_what_its_first_forward_catches_up(monkeypatch) -> None:
    """In an engine whose steps alternate between proposing nothing and proposing k = 3, the draft tokens of
    each proposal are exactly the proposing requests' lags plus their proposals; the output stays the
    target's own (greedy)."""
    model, tok, _ = load(MODEL, dtype="float32", device="cpu", seed=0)
    target = (model, tok)
    reference, _, _ = run(target, PROMPTS, GREEDY)
    seen: list[tuple[int, int]] = []

    def patch(engine) -> None:
        controller, proposer = engine.spec.controller, engine.spec.proposer
        plan, propose = controller.plan, proposer.propose
        expected: list[int] = []

        def alternating(shape: StepShape) -> list[int]:
            lengths = plan(shape) if controller.steps % 2 else [0] * len(shape.caps)
            expected.append(sum(lag + n for lag, n in zip(shape.lags, lengths, strict=True) if n > 0))
            return lengths

        def recording(seqs, ks):
            proposal = propose(seqs, ks)
            seen.append((expected[-1], proposal.draft_tokens))
            return proposal

        monkeypatch.setattr(controller, "plan", alternating)
        monkeypatch.setattr(proposer, "propose", recording)

    done, _, engine = run(target, PROMPTS, GREEDY, draft=perturbed(model, 0.1), speculative="draft", spec_k=3,
                          on_engine=patch)
    assert done == reference
    assert len(seen) > 5 and all(want == got for want, got in seen)
    assert engine.blocks.num_used == 0 and engine.spec.proposer.num_used_blocks == 0


def test_after_a_stretch_without_speculation_a_lag_is_charged_in_full() -> None:
    """The catch-up is spread over the output a request will emit while speculation goes on: when recent
    steps did not speculate, that is little, so the 40-token horizon that paid above no longer does."""
    ctl = _planted(CPU_LIKE)
    _set_acceptance(ctl, 0.8, 4)
    shape = _lagging([300] * 4, [40] * 4)
    assert ctl.choose(shape) > 0
    ctl.speculating = 0.05
    assert ctl.choose(shape) == 0


def test_a_catch_up_is_charged_in_full_where_the_decodes_would_not_speculate() -> None:
    """A step prefilling 300 tokens beside one decode whose draft lags 300 tokens. The step already left the
    decode path, so proposals cost it little (a caught-up draft proposes 5). Alone, the decode would not
    speculate (leaving the decode path costs 0.1 s), so speculation would not go on after this step, and the
    catch-up is charged to it in full: it proposes nothing."""
    ctl = _planted(np.array([0.05, 0.001, 0.0, 0.01, 0.0005, 0.1]))
    _set_acceptance(ctl, 0.8, 1)

    def step(lag: int) -> StepShape:
        alone = StepShape(batched_tokens=1, kv_tokens=300, num_other_samples=0, keys=[0], caps=[5], lags=[lag],
                          remaining=[40])
        return StepShape(batched_tokens=301, kv_tokens=601, num_other_samples=1, keys=[0], caps=[5], num_chunks=2,
                         mixed=True, lags=[lag], remaining=[40], alone=alone)

    assert ctl.choose(step(0).alone) == 0
    assert ctl.choose(step(0)) == 5
    assert ctl.choose(step(300)) == 0


@pytest.mark.parametrize("speculating_correction", [0.9, 1.1])
def test_a_prefill_s_time_is_not_scaled_by_a_proposal_s_correction(speculating_correction: float) -> None:
    """Corrections are measured on steps of the decode batch size; in a step that prefills, they scale what
    proposing adds, not the prefill: what a proposal costs does not depend on the prompt beside it."""
    ctl = _planted(CPU_LIKE)
    bucket = size_bucket(1)
    ctl.correction.update({(False, bucket): 1.0, (True, bucket): speculating_correction})
    ctl.k_correction.clear()
    ctl._correction_rows.clear()

    def proposal_cost(prefill: int) -> float:
        shape = StepShape(batched_tokens=1 + prefill, kv_tokens=300 + prefill, num_other_samples=1, keys=[0],
                          caps=[5], num_chunks=2, mixed=True)
        seconds = ctl._step_times(shape, np.array([[0], [1]]))[0]
        return float(seconds[1] - seconds[0])

    assert proposal_cost(20000) > 0
    assert proposal_cost(20000) == pytest.approx(proposal_cost(100), rel=1e-6)
