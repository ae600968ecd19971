"""Speculative decoding: lossless output (greedy identity, chi-square on sampling), cache roll-back, SmartSpec.

Tiny random Qwen2 models on CPU. The draft is the target itself (every proposal accepted) or a copy with
perturbed weights (some accepted); `ngram` proposes from repeated prompt patterns the random target ignores.
"""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from lmstack.engine import EngineConfig, LLMEngine, SamplingParams
from lmstack.engine.attention import AttentionBackend, AttentionMetadata
from lmstack.engine.sampler import sampling_probs
from lmstack.engine.spec import rejection_sample
from lmstack.engine.spec.acceptance import Acceptance, expected_tokens
from lmstack.engine.spec.controller import merge_profiles, save_profile
from lmstack.engine.spec.latency import FEATURES, StepShape, fit_nonnegative, nnls_normal, step_features
from lmstack.engine.spec.proposers import NgramIndex, Proposal
from lmstack.engine.spec.rejection import greedy_accept
from lmstack.engine.spec.smartspec import SmartSpec, make_controller
from lmstack.errors import LmstackError
from lmstack.models import load

stats = pytest.importorskip("scipy.stats")

MODEL = "dummy:tiny-qwen2"
PROMPTS = [[5, 6, 7, 8, 9, 10] * 3, [100, 200, 300, 400], list(range(50, 90)), [7] * 5, [11, 12, 13, 11, 12]]


@pytest.fixture(scope="module")
def target():
    model, tok, _ = load(MODEL, dtype="float32", device="cpu", seed=0)
    return model, tok


def perturbed(model: torch.nn.Module, noise: float, seed: int = 1) -> torch.nn.Module:
    """A draft that agrees with the target often, not always: its weights plus relative Gaussian noise."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    return draft


def run(target, prompts, params, draft=None, abort=(), on_engine=None, **config):
    """Generate to completion; returns (token ids by prompt index, finish reasons, engine). `on_engine` sees
    the engine before any request is added."""
    model, tok = target
    cfg = {"num_kv_blocks": 64, "max_model_len": 256, "max_num_batched_tokens": 256, **config}
    engine = LLMEngine(model, tok, EngineConfig(**cfg), draft_model=draft)
    if on_engine is not None:
        on_engine(engine)
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(p, sp, request_id=str(i))
    done, reasons, steps = {}, {}, 0
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
                reasons[int(out.request_id)] = out.outputs[0].finish_reason
        steps += 1
        for rid in abort:
            if steps == 3:
                engine.abort_request(str(rid))
    return done, reasons, engine


def acceptance(engine: LLMEngine) -> tuple[int, int]:
    a = engine.spec.controller.acceptance
    return a.total_accepted, a.total_proposed


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(target):
    done, _, engine = run(target, PROMPTS, GREEDY)
    assert engine.blocks.num_used == 0
    return done


@pytest.mark.parametrize("proposer, draft, spec_k", [
    ("ngram", None, 1), ("ngram", None, 3), ("ngram", None, "smart"),
    ("draft", "self", 3), ("draft", "perturbed", 1), ("draft", "perturbed", 5), ("draft", "perturbed", "smart"),
])
def test_greedy_output_is_identical(target, reference, proposer, draft, spec_k) -> None:
    drafts = {None: None, "self": target[0], "perturbed": perturbed(target[0], 0.1)}
    done, _, engine = run(target, PROMPTS, GREEDY, draft=drafts[draft], speculative=proposer, spec_k=spec_k)
    assert done == reference
    accepted, proposed = acceptance(engine)
    assert proposed > 0
    if draft == "self":
        assert accepted == proposed  # the target as its own draft: every proposal is right
    elif draft == "perturbed":
        assert 0 < accepted < proposed
    assert engine.blocks.num_used == 0 and engine.spec.proposer.num_used_blocks == 0


def test_draft_loaded_by_name_and_ngram_matches(target, reference) -> None:
    """spec_model loads the same random weights (same seed): a perfect draft; n-gram lookup finds repeats."""
    done, _, engine = run(target, PROMPTS, GREEDY, speculative="draft", spec_model=MODEL, spec_k=4)
    assert done == reference
    accepted, proposed = acceptance(engine)
    assert accepted == proposed > 0
    assert engine.stats["steps"] < 24

    def lookup(tokens: list[int], k: int) -> list[int]:
        return NgramIndex(1, 3).lookup(tokens, k)  # a fresh index: each list below is another request

    assert lookup([1, 2, 3, 4, 1, 2, 3], 2) == [4, 1]
    assert lookup([1, 2, 3, 4, 9, 2, 3, 5, 2, 3], 1) == [5]  # the most recent match with k tokens after it
    assert lookup([1, 2, 3], 3) == []


def _lookup_by_scan(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup by scanning every window (what the incremental index must agree with)."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        ends = [e for e in range(n, len(tokens)) if tokens[e - n: e] == tokens[len(tokens) - n:]]
        if ends:
            full = [e for e in ends if len(tokens) - e >= k]
            start = full[-1] if full else ends[0]
            return tokens[start: start + k]
    return []


def test_ngram_index_grown_step_by_step_matches_a_full_scan() -> None:
    gen = np.random.default_rng(5)
    for min_n, max_n in ((1, 4), (2, 3)):
        for _ in range(20):
            tokens = gen.integers(0, 6, 120).tolist()  # a small vocabulary: many repeats
            index = NgramIndex(min_n, max_n)
            length = 1
            while length < len(tokens):  # grows by 1..4 tokens at a time, like accepted proposals
                k = int(gen.integers(0, 6))
                assert index.lookup(tokens[:length], k) == _lookup_by_scan(tokens[:length], k, min_n, max_n)
                length += int(gen.integers(1, 5))


def test_stops_and_max_tokens_cut_accepted_runs(target, reference) -> None:
    """With every proposal accepted, a stop token or max_tokens inside an accepted run still ends it there."""
    ref = reference[2]
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[ref[3]]),
              SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)]
    done, reasons, engine = run(target, [PROMPTS[2], PROMPTS[2]], params, draft=target[0], speculative="draft",
                                spec_k=5)
    first = ref.index(ref[3])
    assert done[0] == ref[: first + 1] and reasons[0] == "stop"
    assert done[1] == ref[:7] and reasons[1] == "length"
    assert engine.blocks.num_used == 0 and engine.spec.proposer.num_used_blocks == 0


def test_logprobs_match_plain_decoding(target) -> None:
    """Logprobs of tokens accepted from a proposal come from the target's verification rows."""
    model, tok = target
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = []
    for config in ({}, {"speculative": "draft", "spec_k": 3}):
        engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=64, max_model_len=256, **config),
                           draft_model=model if config else None)
        engine.add_request(PROMPTS[0], params)
        last = None
        while engine.has_unfinished:
            last = engine.step() or last
        outs.append(last[0].outputs[0].logprobs)
    assert len(outs[0]) == len(outs[1]) == 8
    for a, b in zip(*outs, strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.top.keys() == b.top.keys()


def test_rollback_leaks_no_blocks_under_preemption_and_abort(target, reference) -> None:
    """A KV pool too small for the batch: preemptions, rejections and aborts, and both pools end empty."""
    prompts = PROMPTS * 3
    done, reasons, engine = run(target, prompts, GREEDY, draft=perturbed(target[0], 0.1), abort=(1, 7),
                                speculative="draft", spec_k="smart", num_kv_blocks=24, block_size=4,
                                max_num_seqs=8)
    assert engine.scheduler.num_preemptions > 0
    accepted, proposed = acceptance(engine)
    assert 0 < accepted < proposed
    for i in range(len(prompts)):
        if i not in (1, 7):
            assert done[i] == reference[i % len(PROMPTS)]
    assert 1 not in done and 7 not in done
    assert engine.blocks.num_used == 0 and engine.spec.proposer.num_used_blocks == 0


# ----- rejection sampling: the output distribution is the target's -----

V, N = 6, 60_000


def _chain(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A toy target p0, P[prev] and a different draft q0, Q[prev] over V tokens (position 2 conditions on 1)."""
    p0 = torch.rand(V, generator=gen) ** 2
    q0 = torch.rand(V, generator=gen) ** 2
    P = torch.rand(V, V, generator=gen) ** 3
    Q = torch.rand(V, V, generator=gen) ** 3
    return p0 / p0.sum(), P / P.sum(1, keepdim=True), q0 / q0.sum(), Q / Q.sum(1, keepdim=True)


def _first_two_tokens(sampler, deterministic_draft: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N single verification steps with K = 2 proposals, then plain target sampling where a step emitted
    only one token; returns the observed and the expected counts of (token 1, token 2)."""
    gen = torch.Generator().manual_seed(seed)
    p0, P, q0, Q = _chain(gen)
    if deterministic_draft:  # n-gram style: fixed guesses, q one-hot
        d1 = torch.randint(V, (N,), generator=gen)
        d2 = torch.randint(V, (N,), generator=gen)
        draft_probs = None
    else:
        d1 = torch.multinomial(q0.expand(N, V), 1, generator=gen).squeeze(1)
        d2 = torch.multinomial(Q[d1], 1, generator=gen).squeeze(1)
        draft_probs = torch.stack([q0.expand(N, V), Q[d1]], dim=1)
    target = torch.stack([p0.expand(N, V), P[d1], P[d2]], dim=1)
    uniforms = torch.rand(N, 2, generator=gen)
    noise = torch.empty(N, V).exponential_(generator=gen)
    accepted, nxt = sampler(target, torch.stack([d1, d2], 1), torch.full((N,), 2), draft_probs, uniforms, noise)
    t1 = torch.where(accepted >= 1, d1, nxt)
    t2 = torch.where(accepted >= 2, d2, torch.where(accepted == 1, nxt, -1))
    missing = t2 < 0
    t2[missing] = torch.multinomial(P[t1[missing]], 1, generator=gen).squeeze(1)
    observed = np.bincount((t1 * V + t2).numpy(), minlength=V * V)
    return observed, (p0[:, None] * P).reshape(-1).double().numpy()


def _pvalue(observed: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square test of counts against probabilities."""
    return float(stats.chisquare(observed, observed.sum() * probs / probs.sum()).pvalue)


def _accept_all(target, draft_tokens, num_proposed, draft_probs, uniforms, noise):
    """Broken: takes every proposal (the draft's distribution leaks into the output)."""
    bonus = (target[torch.arange(len(target)), num_proposed] / noise).argmax(-1)
    return num_proposed.clone(), bonus


def _resample_from_p(target, draft_tokens, num_proposed, draft_probs, uniforms, noise):
    """Broken: resamples a rejected position from p instead of the residual max(0, p - q)."""
    accepted, _ = rejection_sample(target, draft_tokens, num_proposed, draft_probs, uniforms, noise)
    return accepted, (target[torch.arange(len(target)), accepted] / noise).argmax(-1)


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_rejection_sampling_matches_the_target_distribution(deterministic_draft: bool) -> None:
    observed, expected = _first_two_tokens(rejection_sample, deterministic_draft)
    assert _pvalue(observed, expected) > 1e-3


@pytest.mark.parametrize("broken", [_accept_all, _resample_from_p])
def test_chi_square_catches_a_broken_sampler(broken) -> None:
    observed, expected = _first_two_tokens(broken, deterministic_draft=False)
    assert _pvalue(observed, expected) < 1e-6


def test_greedy_is_the_one_hot_special_case() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 3, V, generator=gen)
    draft = logits[:, :2].argmax(-1)
    draft[::3, 0] = (draft[::3, 0] + 1) % V  # some proposals wrong
    n = torch.randint(0, 3, (64,), generator=gen)
    one_hot = torch.zeros_like(logits).scatter_(2, logits.argmax(-1, keepdim=True), 1.0)
    a1, t1 = rejection_sample(one_hot, draft, n, None, torch.rand(64, 2, generator=gen),
                              torch.empty(64, V).exponential_(generator=gen))
    pairs = [greedy_accept(targets, proposals[:m])
             for targets, proposals, m in zip(logits.argmax(-1).tolist(), draft.tolist(), n.tolist(), strict=True)]
    a2, t2 = torch.tensor([a for a, _ in pairs]), torch.tensor([t for _, t in pairs])
    assert torch.equal(a1, a2) and torch.equal(t1, t2)
    assert torch.all(a2 <= n) and torch.all(a2[::3][n[::3] > 0] == 0)


def _exact_probs(model, prompt: list[int], params: SamplingParams, length: int) -> dict[tuple[int, ...], float]:
    """P(t1..t_length) of plain sampling with `params`, from full forwards (no KV cache)."""

    def next_probs(ids: list[int]) -> torch.Tensor:
        n = len(ids)
        ctx = AttentionBackend(None)
        ctx.meta = AttentionMetadata(
            slot_mapping=torch.zeros(n, dtype=torch.long), query_start_loc=torch.tensor([0, n]),
            seq_lens=torch.tensor([n]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
            query_start_loc_cpu=[0, n], seq_lens_cpu=[n], max_query_len=n, max_seq_len=n)
        with torch.inference_mode():
            logits = model.compute_logits(model(torch.tensor(ids), torch.arange(n), ctx)[-1:])
        return sampling_probs(logits, [params])[0].double()

    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        out = {(*seq, t): p * q for seq, p in out.items()
               for t, q in enumerate(next_probs(prompt + list(seq)).tolist()) if q > 0}
    return out


def test_engine_sampling_matches_the_target_distribution(target) -> None:
    """Through the whole engine (draft sampling with the request's temperature and top-k, verification, bonus
    tokens): the distribution of the first three tokens is the target's. The second and third come from
    verification: accepted proposals, residual resamples and bonus tokens."""
    model, tok = target
    params = SamplingParams(max_tokens=3, temperature=0.05, top_k=3, ignore_eos=True)
    expected = _exact_probs(model, PROMPTS[1], params, 3)
    n = 3000
    done, _, engine = run(target, [PROMPTS[1]] * n, params, draft=perturbed(model, 0.1), speculative="draft",
                          spec_k=1, num_kv_blocks=1200, max_num_seqs=256, max_num_batched_tokens=4096)
    accepted, proposed = acceptance(engine)
    assert 0 < accepted < proposed
    seqs = [tuple(t) for t in done.values()]
    assert set(seqs) <= set(expected)
    cells = sorted(expected)
    assert _pvalue(np.array([seqs.count(c) for c in cells]), np.array([expected[c] for c in cells])) > 1e-3


# ----- the SmartSpec controller -----

def _planted(c: np.ndarray, draft_forwards: bool = True, seed: int = 0, **kw) -> SmartSpec:
    """A SmartSpec whose latency samples come from step time = features @ c (plus 1% noise); coefficients
    missing from the end of `c` are zero."""
    c = np.pad(c, (0, len(FEATURES) - len(c)))
    rng = np.random.default_rng(seed)
    ctl = SmartSpec(5, draft_forwards, **kw)
    for _ in range(8):
        for k in range(6):
            b = int(rng.integers(1, 32))
            f = step_features(b * (k + 1), int(rng.integers(100, 4000)), k, b * k, b if k else 0)
            ctl.observe_step(k, b, f, float(f @ c) * (1 + 0.01 * rng.standard_normal()))
    ctl.maintain()
    return ctl


def test_latency_fit_recovers_a_planted_model() -> None:
    c = np.array([0.02, 0.001, 2e-6, 0.004, 0.0005, 0.01, 0.002, 0.0])
    rng = np.random.default_rng(1)
    x = np.stack([step_features(int(rng.integers(1, 200)), int(rng.integers(10, 9000)), int(rng.integers(0, 6)),
                                int(rng.integers(0, 150)), int(rng.integers(0, 3)) * int(rng.integers(1, 9)))
                  for _ in range(200)])
    fit = fit_nonnegative(x, x @ c)
    np.testing.assert_allclose(fit, c, rtol=1e-6)
    assert _planted(c).coef == pytest.approx(c, rel=0.25)
    assert np.all(fit_nonnegative(x, x @ np.array([0.02, 0.001, 0, 0, 0, 0, 0, 0]) * 0.999) >= 0)


def test_nnls_matches_every_support() -> None:
    """The active-set solve reaches the optimum that trying every support finds, collinear features included."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        a = rng.normal(size=(int(rng.integers(3, 40)), 5))
        if rng.random() < 0.3:
            a[:, 3] = a[:, 2]  # two features that always move together: a singular G
        b = a @ rng.normal(size=5) + rng.normal(size=len(a)) * rng.random()
        gram, rhs = a.T @ a, a.T @ b
        c = nnls_normal(gram, rhs)
        best = min(float(np.sum((a[:, s] @ np.linalg.lstsq(a[:, s], b, rcond=None)[0] - b) ** 2))
                   for n in range(6) for s in map(list, itertools.combinations(range(5), n))
                   if n == 0 or (np.linalg.lstsq(a[:, s], b, rcond=None)[0] >= 0).all())
        assert (c >= 0).all()
        assert float(np.sum((a @ c - b) ** 2)) <= best + 1e-9 * float(b @ b)


def _shape(n: int) -> StepShape:
    return StepShape(batched_tokens=n, kv_tokens=300 * n, num_other_samples=0, keys=list(range(n)), caps=[5] * n)


def _set_acceptance(ctl: SmartSpec, alpha: float, n: int) -> None:
    rng = np.random.default_rng(2)
    for _ in range(200):
        for key in range(n):
            draws = rng.random(5) < alpha
            ctl.acceptance.observe(key, 5, int(np.argmin(draws)) if not draws.all() else 5)


def test_smartspec_chooses_zero_when_speculation_does_not_pay() -> None:
    cheap = np.array([0.05, 1e-4, 1e-7, 0.002, 1e-5])  # per-step overhead dominates: verifying more is cheap
    ctl = _planted(cheap)
    _set_acceptance(ctl, 0.0, 4)
    assert ctl.acceptance.rate < 0.05
    assert ctl.choose(_shape(4)) == 0  # nothing is ever accepted
    costly = np.array([0.001, 0.01, 1e-7, 0.0, 0.002])  # every batched token costs: the batch is compute-bound
    ctl = _planted(costly)
    _set_acceptance(ctl, 0.8, 32)
    assert ctl.choose(_shape(32)) == 0


def test_smartspec_speculates_when_it_pays() -> None:
    ctl = _planted(np.array([0.05, 1e-4, 1e-7, 0.002, 1e-5]))
    _set_acceptance(ctl, 0.8, 4)
    survival = np.mean([ctl.acceptance.survival(key) for key in range(4)], axis=0)  # each alone: ~5 recent tests
    assert survival == pytest.approx(0.8 ** np.arange(1, 6), abs=0.08)
    k = ctl.choose(_shape(4))
    assert k >= 3
    assert ctl.goodput(_shape(4), k) > 2 * ctl.goodput(_shape(4), 0)


def test_a_prefilling_step_weighs_proposals_against_decoding_alone() -> None:
    """A step that prefills 300 tokens beside two decodes: proposing 5 raises its own goodput (the prefill
    dilutes any cost), but where each token of the step costs 10 ms and each draft forward 50 ms, decoding alone
    emits faster than the proposals do, so the step proposes nothing; where both are cheap it proposes."""
    def mixed() -> StepShape:
        alone = StepShape(batched_tokens=2, kv_tokens=600, num_other_samples=0, keys=[0, 1], caps=[5, 5])
        return StepShape(batched_tokens=302, kv_tokens=902, num_other_samples=1, keys=[0, 1], caps=[5, 5],
                         num_chunks=3, mixed=True, alone=alone)

    ctl = _planted(np.array([0.05, 0.01, 0.0, 0.05]))
    _set_acceptance(ctl, 0.8, 2)
    assert ctl.goodput(mixed(), 5) > 2 * ctl.goodput(mixed(), 0)
    assert ctl.choose(mixed().alone) == 0 and ctl.choose(mixed()) == 0
    ctl = _planted(np.array([0.05, 0.0005, 0.0, 0.001]))
    _set_acceptance(ctl, 0.8, 2)
    assert ctl.choose(mixed().alone) == 5 and ctl.choose(mixed()) == 5


def test_smartspec_explores_only_where_speculation_could_pay() -> None:
    """Plain steps at 2 ms, speculative ones at 30 ms (a CUDA graph vs eager): not even perfect acceptance
    pays, so k = 0 is chosen every step, with no exploring step; where it could pay, one step in
    `explore_every` still proposes a token to keep the acceptance estimate current."""

    def run(spec_seconds: float) -> list[int]:
        ctl = SmartSpec(5, draft_forwards=True, explore_every=8)
        for _ in range(4):
            for k in range(6):
                ctl.observe_step(k, 4, step_features(4 * (k + 1), 1200, k, 4 * k), 0.002 if k == 0 else spec_seconds)
        _set_acceptance(ctl, 0.05, 4)
        return [ctl.choose(_shape(4)) for _ in range(40)]

    assert run(0.030) == [0] * 40
    assert sorted(set(run(0.0025))) == [0, 1] and run(0.0025).count(1) == 40 // 8


def test_smartspec_corrects_a_nonlinear_step_time() -> None:
    """A CPU-like cliff (one row: 0.36 s, two or more: 0.75 s) that no linear model fits: the per-(k, batch
    size) correction still finds that, for a lone request at 60% acceptance, plain decoding is faster."""

    def seconds(tokens: int, k: int) -> float:
        return (0.36 if tokens == 1 else 0.75 + 0.002 * tokens) + 0.15 * k

    ctl = SmartSpec(5, draft_forwards=True)
    rng = np.random.default_rng(0)
    for _ in range(6):
        for k in range(6):
            for b in (1, 4):
                ctl.observe_step(k, b, step_features(b * (k + 1), 300 * b, k, b * k),
                                 seconds(b * (k + 1), k) * (1 + 0.01 * rng.standard_normal()))
        ctl.observe_step(0, 0, step_features(120, 120, 0, 0), seconds(120, 0))
    _set_acceptance(ctl, 0.6, 1)
    assert ctl.choose(_shape(1)) == 0
    assert ctl.predict(ctl.features(_shape(1), 0), 0, 1) == pytest.approx(0.36, rel=0.05)
    assert ctl.predict(ctl.features(_shape(1), 3), 3, 1) == pytest.approx(seconds(4, 3), rel=0.05)


def _measured(seconds, draft_forwards: bool = False, rounds: int = 6) -> SmartSpec:
    """A SmartSpec that measured steps of 1-8 decodes at every k `rounds` times, timed by seconds(batch, k) (1%
    noise); steps with proposals are mixed, as the decoder records them."""
    rng = np.random.default_rng(3)
    ctl = SmartSpec(5, draft_forwards)
    for _ in range(rounds):
        for k in range(6):
            for b in (1, 2, 4, 8):
                f = step_features(b * (k + 1), 300 * b + b * k, k if draft_forwards else 0,
                                  b * k if draft_forwards else 0, b if k else 0)
                ctl.observe_step(k, b, f, seconds(b, k) * (1 + 0.01 * rng.standard_normal()))
    ctl.maintain()
    return ctl


def _set_rates(ctl: SmartSpec, alphas: list[float]) -> None:
    """Request i's proposals of 5 tokens accepted token by token with probability alphas[i]."""
    rng = np.random.default_rng(4)
    for _ in range(100):
        for key, alpha in enumerate(alphas):
            draws = rng.random(5) < alpha
            ctl.acceptance.observe(key, 5, 5 if draws.all() else int(np.argmin(draws)))


def test_smartspec_models_the_jump_of_leaving_the_decode_path() -> None:
    """CPU-like steps: any proposal moves every sequence of the step to per-sequence attention (10 ms each),
    while a proposed token itself costs 0.2 ms. The model puts the jump on the mixed-step features, so a
    longer proposal is predicted nearly free once a step speculates and K wins at 75% acceptance; a model
    linear in tokens alone spreads the jump over the tokens and prefers a shorter k."""

    def seconds(b: int, k: int) -> float:
        return 0.04 + 0.004 * b + 0.0002 * b * k + (0.01 * b if k else 0.0)

    ctl = _measured(seconds)
    for b in (1, 8):
        for k in (0, 1, 5):
            assert ctl.predict(ctl.features(_shape(b), k), k, b) == pytest.approx(seconds(b, k), rel=0.05)
    _set_rates(ctl, [0.75] * 8)
    assert ctl.choose(_shape(8)) == 5
    prefill = StepShape(batched_tokens=40, kv_tokens=2432, num_other_samples=1, keys=list(range(8)),
                        caps=[5] * 8, num_chunks=9, mixed=True)  # a prompt chunk rides along: mixed anyway
    assert ctl.features(prefill, 0)[FEATURES.index("mixed_seqs")] == 9
    assert ctl.features(_shape(8), 0)[FEATURES.index("mixed_seqs")] == 0


def test_smartspec_trims_proposals_that_do_not_pay() -> None:
    """Every batched token costs 2 ms: four requests whose proposals are accepted propose K, four whose
    proposals are rejected propose nothing, and that beats both plain decoding and K for everyone."""
    ctl = _measured(lambda b, k: 0.04 + 0.002 * b * (k + 1))
    _set_rates(ctl, [0.98] * 4 + [0.05] * 4)
    lengths = ctl.plan(_shape(8))
    assert lengths == [5] * 4 + [0] * 4
    assert ctl.goodput(_shape(8), lengths) > 1.2 * max(ctl.goodput(_shape(8), k) for k in range(6))
    _set_rates(ctl, [0.98] * 8)
    assert ctl.plan(_shape(8)) == [5] * 8


def _engine(target, **config) -> LLMEngine:
    model, tok = target
    return LLMEngine(model, tok, EngineConfig(num_kv_blocks=64, max_model_len=256, max_num_batched_tokens=256,
                                              speculative="ngram", **config))


def _finish(engine: LLMEngine, prompts: list[list[int]]) -> dict[int, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY, request_id=str(i))
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    return done


def test_steps_without_proposals_are_plain_steps(target, reference, monkeypatch) -> None:
    """When the n-gram lookup finds nothing, no k is worth choosing and the step is the runner's own plain
    step (its sampler; a CUDA graph on GPU), not a speculative one that proposes nothing."""
    engine = _engine(target, spec_k="smart")
    monkeypatch.setattr(engine.spec.proposer, "propose", lambda seqs, ks: Proposal([[] for _ in seqs]))
    plain = []
    execute = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda *a, **kw: plain.append(1) or execute(*a, **kw))
    done = _finish(engine, PROMPTS)
    assert done == reference
    assert len(plain) == engine.stats["steps"] and engine.spec.controller.chosen == {0: len(plain)}
    assert engine.blocks.num_used == 0


def test_plain_steps_profile_as_the_decoder_profiles_its_k0_steps(target, reference) -> None:
    """The same requests run without speculation (steps kept raw by the engine) and with k = 0 (each step featured
    by the decoder): the same k = 0 samples, feature for feature; the profile warm-starts a controller."""
    from lmstack.engine.spec.decoder import plain_profile

    engine = _engine(target, spec_k=0)
    assert _finish(engine, PROMPTS) == reference
    decoder_profile = engine.spec.controller.profile()
    decoder_rows = [row[:-1] for row in decoder_profile["samples"]]
    engine.set_spec_k(None)
    engine.plain_steps = []
    assert _finish(engine, PROMPTS) == reference
    profile = plain_profile(engine.plain_steps, engine.runner.use_graphs)
    rows = profile["samples"]
    assert len(rows) == len(engine.plain_steps) == len(decoder_rows) and all(r[-1] > 0 for r in rows)
    assert sorted(r[:-1] for r in rows) == sorted(decoder_rows) and json.dumps(rows[0][:-1]) == json.dumps(
        next(r for r in decoder_rows if r == rows[0][:-1]))  # written alike
    assert {r[0] for r in rows} == {0} and max(r[1] for r in rows) == len(PROMPTS)
    smart = SmartSpec(5, False)
    smart.load_profile(merge_profiles([profile, decoder_profile]))
    assert len(smart.samples) >= 1 and profile["tested_tokens"] == 0


def test_free_proposals_are_looked_up_before_choosing(target, reference, monkeypatch) -> None:
    """The controller sees what each request can propose: only request 0 has proposals here, so the others'
    caps are 0 (they neither count as expected tokens nor make the step mixed)."""
    engine = _engine(target, spec_k="smart")
    first = PROMPTS[0]
    monkeypatch.setattr(engine.spec.proposer, "propose", lambda seqs, ks: Proposal(
        [[s.token_at(s.num_tokens - 1)] * k if s.prompt_token_ids[:len(first)] == first else []
         for s, k in zip(seqs, ks, strict=True)]))
    seen = []
    plan = engine.spec.controller.plan

    def recording(shape: StepShape) -> list[int]:
        seen.append([(s.request_id, c) for s, c in zip(shape.keys, shape.caps, strict=True)])
        return plan(shape)

    monkeypatch.setattr(engine.spec.controller, "plan", recording)
    assert _finish(engine, PROMPTS) == reference
    caps = [(rid, c) for step in seen for rid, c in step]
    assert all(c == 0 for rid, c in caps if rid != "0")
    assert any(c > 0 for rid, c in caps if rid == "0")
    assert engine.blocks.num_used == 0


def test_profiles_of_another_version_are_not_merged() -> None:
    ctl = _planted(np.array([0.05, 1e-4, 1e-7, 0.002, 1e-5]))
    old = {"version": 2, "features": list(FEATURES[:5]), "acceptance": 0.9, "accepted_tokens": 90,
           "tested_tokens": 100, "samples": [[1, 4, 1.0, 8.0, 1200.0, 1.0, 4.0, 0.01]]}
    merged = merge_profiles([old, ctl.profile()])
    assert merged["samples"] == ctl.profile()["samples"]
    assert merged["tested_tokens"] == ctl.acceptance.total_tested
    make_controller("smart", 5, True).load_profile(merged)


def test_acceptance_and_expected_tokens() -> None:
    assert expected_tokens(np.zeros(5), 5) == 1.0 and expected_tokens(np.ones(5), 3) == 4.0
    assert expected_tokens(0.5 ** np.arange(1, 6), 2) == pytest.approx(1.75)  # geometric: 1 + a + a^2
    acc = Acceptance(5)
    acc.observe("a", 3, 3)
    acc.observe("a", 3, 0)
    assert acc.total_tested == 4  # 3 accepted of 3, then 1 tested and rejected
    assert acc.table[1, 0].tolist() == [1, 1, 1, 0, 0]  # new request: 3 tested, 3 accepted
    assert acc.table[:, 1].tolist() == [[0] * 5, [1, 0, 0, 0, 0]]  # after that hit: the 1st rejected, the rest censored
    acc.forget("a")
    assert acc.survival("a") == pytest.approx(np.cumprod(acc.hazards(0)))  # a new request: the global estimate
    with pytest.raises(ValueError):
        acc.observe("b", 6, 0)


def test_profile_warm_start(tmp_path) -> None:
    ctl = _planted(np.array([0.05, 1e-4, 1e-7, 0.002, 1e-5]))
    _set_acceptance(ctl, 0.7, 4)
    path = tmp_path / "profile.json"
    save_profile(merge_profiles([ctl.profile()], proposer="draft"), path)
    assert json.loads(path.read_text())["acceptance"] == pytest.approx(0.7, abs=0.05)
    warm = make_controller("smart", 5, True, profile=path)
    assert warm.coef is not None  # fitted from the profile: no measuring phase
    assert warm.choose(_shape(4)) == ctl.choose(_shape(4))
    with pytest.raises(LmstackError, match="version"):
        path.write_text(json.dumps({"version": 99}))
        make_controller("smart", 5, True, profile=path)


def test_bad_speculation_settings_are_clear_errors(target) -> None:
    model, tok = target
    for bad, match in [(dict(speculative="medusa"), "unknown speculative proposer"),
                       (dict(spec_model="x"), "speculative='draft'"),
                       (dict(speculative="ngram", spec_k=-1), "spec_k"),
                       (dict(speculative="ngram", spec_k="sometimes"), "spec_k"),
                       (dict(speculative="ngram", spec_ngram_min_n=3, spec_ngram_max_n=2), "spec_ngram_min_n"),
                       (dict(speculative="ngram", spec_profile="/no/such/profile.json"), "does not exist")]:
        with pytest.raises(LmstackError, match=match):
            EngineConfig(**bad)
    with pytest.raises(LmstackError, match="needs a draft model"):
        LLMEngine(model, tok, EngineConfig(num_kv_blocks=16, speculative="draft"))
    other, _, _ = load('dummy:{"model_type": "qwen2", "vocab_size": 50000, "hidden_size": 32, '
                       '"intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, '
                       '"num_key_value_heads": 1, "max_position_embeddings": 512}', dtype="float32", device="cpu")
    with pytest.raises(LmstackError, match="vocabulary"):
        LLMEngine(model, tok, EngineConfig(num_kv_blocks=16, speculative="draft"), draft_model=other)
    assert EngineConfig(speculative="ngram", spec_k="3").spec_k == 3


def test_async_engine_and_llm_api_with_speculation(target, reference) -> None:
    """The server's engine thread runs speculative steps; `LLM(..., speculative=...)` takes the options."""
    import asyncio

    from lmstack import LLM
    from lmstack.engine import AsyncEngine

    model, tok = target
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=64, max_model_len=256, speculative="draft",
                                                spec_k=3), draft_model=model)

    async def main() -> list[list[list[int]]]:
        served = AsyncEngine(engine)

        async def stream(i: int) -> list[list[int]]:
            return [out.outputs[0].token_ids async for out in served.generate(PROMPTS[i], GREEDY)]

        try:
            return await asyncio.gather(*(stream(i) for i in range(len(PROMPTS))))
        finally:
            await served.shutdown()

    streams = asyncio.run(main())
    assert [s[-1] for s in streams] == [reference[i] for i in range(len(PROMPTS))]
    assert engine.blocks.num_used == 0 and engine.spec.proposer.num_used_blocks == 0
    llm = LLM(MODEL, dtype="float32", device="cpu", speculative="ngram", spec_k=2, num_kv_blocks=64,
              max_model_len=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [reference[i] for i in range(len(PROMPTS))]


def test_serve_flags() -> None:
    from lmstack.cli import build_parser
    from lmstack.server.cli import speculative_options

    parser = build_parser()
    args = parser.parse_args(["serve", "--speculative", "draft", "--spec-model", "m", "--spec-k", "3"])
    assert speculative_options(args) == {"speculative": "draft", "spec_k": 3, "spec_model": "m"}
    assert speculative_options(parser.parse_args(["serve"])) == {}
    with pytest.raises(LmstackError, match="--speculative"):
        speculative_options(parser.parse_args(["serve", "--spec-k", "2"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--speculative", "ngram", "--spec-k", "often"])


def test_smartspec_bench_averages_policies_over_their_traces() -> None:
    from lmstack.bench.smartspec import summarize

    def run(latency: float, by_k: dict[str, int] | None = None) -> dict:
        return {"metrics": {"mean_latency_s": latency, "steps": 10, "tokens": [[1]],
                            "steps_by_k": by_k or {"0": 10}}}

    runs = {(1.0, "nospec", 0): run(4.0), (1.0, "nospec", 1): run(6.0), (1.0, "k=3", 0): run(2.0),
            (1.0, "k=3", 1): run(3.0), (1.0, "smart", 0): run(2.0, {"0": 4, "5": 6}),
            (1.0, "smart", 1): run(3.5, {"0": 2, "10": 1, "3": 7})}
    m = summarize(runs, [1.0], ["nospec", "k=3", "smart"])
    row = m["by_rate"][0]
    assert row["nospec"]["mean_latency_s"] == 5.0 and row["nospec"]["mean_latency_s_by_trace"] == [4.0, 6.0]
    assert row["nospec"]["steps_by_k"] == {"0": 10} and "tokens" not in row["smart"]
    assert row["smart"]["traces"] == 2 and row["smart"]["steps_by_k"] == {"0": 3, "3": 3.5, "5": 3, "10": 0.5}
    assert list(row["smart"]["steps_by_k"]) == ["0", "3", "5", "10"]
    assert m["best_speedup_vs_nospec"] == pytest.approx(2.0)
    assert m["worst_smart_over_best_fixed"] == pytest.approx(2.75 / 2.5)
    assert m["worst_smart_over_nospec"] == pytest.approx(2.75 / 5.0)


@pytest.mark.parametrize("repeats", ["0", "2,3", "2,x,1", "1,0,2"])
def test_smartspec_bench_rejects_bad_repeats(capsys, repeats: str) -> None:
    from lmstack.cli import main

    assert main(["bench", "smartspec", "--proposer", "ngram", "--rates", "1,2,4", "--repeats", repeats]) == 2
    err = capsys.readouterr().err
    assert "--repeats must be one count >= 1 or one per rate (3 for --rates)" in err and "Traceback" not in err


def test_smartspec_bench_repeats_per_rate() -> None:
    from lmstack.bench.smartspec import _repeats

    assert _repeats("3", [4.0, 32.0]) == {4.0: 3, 32.0: 3}
    assert _repeats("2,8,8", [4.0, 32.0, 128.0]) == {4.0: 2, 32.0: 8, 128.0: 8}


def test_smartspec_bench_alternates_the_turns_of_the_policies() -> None:
    """No-spec always first; smart last on even traces and right after no-spec on odd ones, so that a drift
    within a trace does not always land on the same policy."""
    from lmstack.bench.smartspec import _policies, turns

    policies = _policies("nospec,1,3,smart")
    assert [n for n, _ in turns(policies, 0)] == ["nospec", "k=1", "k=3", "smart"]
    assert [n for n, _ in turns(policies, 1)] == ["nospec", "smart", "k=3", "k=1"]
    assert turns(policies, 2) == turns(policies, 0)


def test_a_mixed_step_chooses_ahead_for_its_decodes_alone(target, reference, monkeypatch) -> None:
    """While a step that prefills a prompt runs, the next step's k is chosen from the step's decodes alone,
    as a step of pure decodes (the prompt joins them next step); the output stays the reference's."""
    engine = _engine(target, spec_k="smart")
    seen: list[tuple[bool, StepShape, int]] = []  # (pure decodes, shape chosen ahead from, its KV tokens)
    plan_ahead = engine.spec.controller.plan_ahead
    execute = engine.spec.execute

    def traced(sched, *a, **kw):
        monkeypatch.setattr(engine.spec.controller, "plan_ahead",
                            lambda shape: seen.append((sched.is_decode, shape, sum(q.num_tokens for q in shape.keys)))
                            or plan_ahead(shape))
        return execute(sched, *a, **kw)

    monkeypatch.setattr(engine.spec, "execute", traced)
    done = {}
    for i, p in enumerate(PROMPTS):  # one prompt joins every other step, while the others decode
        engine.add_request(p, GREEDY, request_id=str(i))
        for _ in range(2):
            done.update({int(o.request_id): o.outputs[0].token_ids for o in engine.step() if o.finished})
    while engine.has_unfinished:
        done.update({int(o.request_id): o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert done == reference
    mixed = [(shape, kv) for is_decode, shape, kv in seen if not is_decode]
    assert mixed and all(not s.mixed and s.num_other_samples == 0 and s.batched_tokens == len(s.keys)
                         and s.num_chunks in (None, len(s.keys)) and s.kv_tokens == kv for s, kv in mixed)
