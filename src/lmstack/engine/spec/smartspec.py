"""SmartSpec: each step, the proposal length with the best predicted goodput (arXiv 2406.14066).

Speculation pays when proposals are often accepted and verifying k extra tokens per request costs little;
under load (the batch is already compute-bound) or with poor acceptance it costs more than it saves.
SmartSpec weighs both every step: for each k in 0..K it predicts

    goodput(k) = sum over requests of (1 + S(1) + ... + S(k))   /   predicted step time(k)

where S(n) is the probability that the request's first n proposals are all accepted, so the numerator is
the expected number of tokens the request emits, and picks the best k (k = 0 is plain decoding: one token
per request). Within that k, a request whose next proposal would earn less than the step's goodput (its n-th
proposal emits a token with probability S(n), and costs the step's time per token) proposes fewer: under
load, poorly accepted requests stop padding the batch while well accepted ones keep proposing K.

- Acceptance (`acceptance.py`): S(n) is the product of per-position acceptance rates, estimated online
  (discounted) per request and globally, conditioned on the request's previous verification. The paper's
  single rate a (S(n) = a^n) is the special case of equal rates; n-gram proposals are far from it (their
  first token is the gamble, the rest of a matched span is nearly always accepted), and a single rate made
  SmartSpec cut proposals whose tail would have paid.
- Step time: a linear model of measured step times on (batched tokens, KV tokens, draft forwards, draft
  tokens, mixed, mixed sequences, eager), fitted by non-negative least squares on relative error from recent
  steps, kept per (k, batch size) so that rarely chosen k values are not forgotten, and refitted as steps
  come (ever less often once fitted). On CUDA a verify step replays a chunk graph that computes every request's
  row at the longest chunk's length, so its tokens are counted padded: there, a request that proposes less
  than the longest saves nothing, and only a shorter longest proposal does.
  A step is *mixed* when some chunk has more than one token (a prefill, or any proposal at all): it leaves the
  pure-decode fast path (split-K decode attention; on CUDA its graph) for chunked attention (eager on CPU, a
  chunk graph per (batch, chunk length) on CUDA), a jump paid once per step and once per sequence in it,
  whatever k is. A model linear in tokens alone spreads that jump over the proposed tokens and so predicts that
  each extra proposal costs much more than it does, which made mid-sized k look better than K. Where the device
  replays captured graphs (CUDA), a step that cannot (a prefill, or a verify step beyond the chunk graphs) runs
  *eager*: its kernels are launched one by one, which on the H200 cost 11-18 ms more for SmolLM2-135M than a
  replayed step of 2-4 ms, whatever its tokens (token graphs, engine/token_graphs.py, now replay such steps
  too, up to their size). Without that indicator the fit spread the eager steps' cost over
  batched tokens: replayed k = 5 steps of 16-31 decodes were predicted 34% dearer than measured (4.5 vs 3.4 ms),
  and SmartSpec chose k = 3 on 32% of its speculating steps at 32 req/s where k = 5 ran faster (9% with it).
  Hardware is still not always linear (on CPU a 2-row matrix product can cost twice a 1-row one), so each
  (speculating or not, decode batch size) group that has been measured also corrects the model by its median
  ratio of measured to predicted time (in a step that also prefills, only what proposing adds to it:
  `_step_times`). A proposal length measured at least `min_k_samples` times at that batch
  size gets its own median, shrunk toward its group's, for what a model linear in tokens misses at one k: on the
  H200 (n-gram lookup, SmolLM2-135M) steps of k = 2 and 4 ran 10-43% over the model at 1-7 decodes while k = 1, 3
  and 5 stayed within 10% (only SmartSpec chose those k, and its steps include its own host time). With fewer
  samples, per-k medians of noisy steps would rank equally dear k values at random. The model can be warm-started
  from a profile file written by an earlier run.
- A decision to propose (untrimmed: every request min(k, its cap)) is reused for `replan_every` steps by
  steps of the same make-up: pure decodes with the same multiset of (cap, acceptance state) and nothing else.
  Choosing costs ~0.05 ms of numpy on a 2-core x86 host and ~0.15-0.2 ms on the H200 machine, 5-7% of a SmolLM2-135M
  step there (k = 5's step: 2.8 ms at 4 req/s); reused, it costs a dictionary lookup. The latency model and
  the acceptance estimates drift slowly, and a refit clears the reused decisions. And while the device runs a
  step, the host chooses for the next one from this step's decodes (`plan_ahead`), which the next step takes
  if it decodes nearly the same requests (at most 1 in 8 finished or joined), and either decodes only or the
  k is K: one step stale, and off the step's critical path. A k so taken is passed on to the next step
  without choosing again until it is `replan_every` steps old. Where choosing costs less
  than `reuse_share` (1%) of a step (on a CPU, where a step takes tens of milliseconds) every step chooses.
- Until three proposal lengths have been measured, steps cycle through 0..K; afterwards, when k = 0 has won
  for a long stretch, one step proposes a single token so that acceptance estimates stay current, unless no k
  would win even if every proposal were accepted (e.g. when a speculative step costs many times a plain
  one): then exploring could only cost time.
- The caps of a step are what each request can propose: with a free proposer (n-gram lookup) the decoder
  looks proposals up before choosing, so a request without a match counts neither as expected tokens nor as
  a reason to leave the decode fast path.
- A draft model catches up on every token it has not seen before it proposes (a new request's prompt, and
  everything a request emitted while it did not propose), so a step also pays each proposing request's
  *lag*. Lag of up to one token recurs every step (the draft never sees a fully accepted proposal's last
  token) and is charged in full; the rest is paid once and lets the request speculate for the rest of its
  output while speculation goes on, so it is charged spread over that output: each step, in proportion to
  the tokens the request is expected to emit in it, of its remaining output times the recent share of steps
  that speculated. Charged in full, a request admitted while speculation runs could never join it; not
  charged at all, a step after a k = 0 stretch looked as cheap as a steady one and SmartSpec chose
  speculation whose catch-up cost more than it saved; spread over the whole remaining output even while
  k = 0 keeps winning, a few steps still paid catch-ups and went back to k = 0 (on this CPU at 2 req/s,
  ShareGPT prompts: 5 speculative steps of 53, 1.17x the latency of no speculation). Requests with a lag may
  also sit a step out while caught-up ones propose, and an exploring step proposes only for caught-up ones.
- A step that also prefills a prompt weighs each k by the tokens it emits beyond what its time would emit at
  the best goodput of its decodes alone, not by its own goodput, which the prefill's time dilutes (`_choose`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lmstack.engine.spec.controller import Controller, FixedK, read_profile
from lmstack.engine.spec.latency import (
    FEATURES,
    StepShape,
    fit_nonnegative,
    group_medians,
    size_bucket,
)


class _Ahead(NamedTuple):
    """A k chosen ahead (`SmartSpec.plan_ahead`) for the step numbered `step`, from the decodes `ids`."""

    ids: frozenset[int]
    k: int
    step: int
    chosen_at: int  # `steps` when it was chosen (a k passed on keeps its first choice's)


class SmartSpec(Controller):
    """Each step, the k in 0..K with the best predicted goodput (see the module docstring)."""

    def __init__(self, max_k: int, draft_forwards: bool, refit_every: int = 16, max_refit_every: int = 256,
                 explore_every: int = 64, min_samples: int = 2, min_k_samples: int = 8, window: int = 32,
                 replan_every: int = 16, reuse_share: float = 0.01, ahead_share: float = 0.125,
                 catch_up_margin: float = 0.1) -> None:
        super().__init__(max_k, draft_forwards, window)
        # How much the caught-up decodes' best k must beat plain decoding by for a catch-up to be spread over the
        # output (`_catch_up`): about the latency model's error, so a gain within it buys no catch-up.
        self.catch_up_margin = catch_up_margin
        self.replan_every = replan_every  # steps a decision is reused for (module docstring); 1: choose every step
        self._plans: dict[tuple[Any, ...], tuple[int, int]] = {}  # step make-up -> (k, `steps` when chosen)
        # Decisions are reused only while choosing costs more than `reuse_share` of a step (moving averages).
        self.reuse_share = reuse_share
        self._choose_s = self._step_s = 0.0
        self._plan_s = 0.0  # host time of this step's `plan`, left out of its measured time (`observe_step`)
        # `_ahead`: the next step's k chosen by `plan_ahead`; `_taken`: the one this step took, which
        # `plan_ahead` may pass on.
        self._ahead: _Ahead | None = None
        self._taken: _Ahead | None = None
        self.ahead_share = ahead_share  # share of a step's decodes that may differ from those chosen ahead for
        self.sources = {"ahead": 0, "reused": 0, "chosen": 0}  # how each fitted step's plan was made
        # Refits come after `refit_every` new steps, then twice as many each time up to `max_refit_every` (a
        # refit costs a few tenths of a millisecond of host time, a large share of a small model's whole step on
        # a GPU), and at once when a group of steps reaches the samples that give it its own correction.
        self.refit_every, self.max_refit_every = refit_every, max_refit_every
        self._refit_after = refit_every
        self._new_group = False
        self.explore_every = explore_every
        self.min_samples, self.min_k_samples = min_samples, min_k_samples
        self._coef: np.ndarray | None = None
        self._named_coef: dict[str, float] = {}  # `coef` by feature name, for `_step_times`
        # Median measured / predicted time by (speculating or not, size bucket), and by (k, size bucket) where
        # that k was measured often enough (shrunk toward its group's).
        self.correction: dict[tuple[bool, int], float] = {}
        self.k_correction: dict[tuple[int, int], float] = {}
        self._correction_rows: dict[int, np.ndarray] = {}  # `_corrections` by size bucket
        self._since_fit = 0
        self._zero_streak = 0
        self._cycle = 0
        self.speculating = 1.0  # recent share of steps that proposed (moving average), for `_catch_up`

    @property
    def coef(self) -> np.ndarray | None:
        """The latency model's coefficients, one per feature (None until fitted)."""
        return self._coef

    @coef.setter
    def coef(self, value: np.ndarray | None) -> None:
        self._coef = value
        self._named_coef = {} if value is None else dict(zip(FEATURES, value.tolist(), strict=True))

    def observe_step(self, k: int, num_decodes: int, features: np.ndarray, seconds: float) -> None:
        """The step's time less its `plan`: choosing costs the same whatever k is chosen, and fixed-k runs, whose
        steps a warm-start profile mixes in, do not pay it. On the H200 SmartSpec's propose phase took 0.1-0.2 ms
        a step more than fixed k = 5's, in steps of 2-2.6 ms, and the k that only SmartSpec proposes (2 and 4)
        were measured 7-45% above the model where k = 1, 3 and 5 were within 10% (15% once)."""
        super().observe_step(k, num_decodes, features, max(seconds - self._plan_s, 1e-6))
        self._plan_s = 0.0
        self._step_s = _moving_average(self._step_s, seconds)
        self._since_fit += 1
        n = len(self.samples[(k, size_bucket(num_decodes))])
        self._new_group |= n == self.min_samples or (k > 0 and n == self.min_k_samples)

    def maintain(self) -> None:
        """Refit when due, off the step's critical path (`plan` fits only a model never fitted yet)."""
        if self.coef is None or self._new_group or self._since_fit >= self._refit_after:
            self._refit_after = min(2 * self._refit_after, self.max_refit_every) if self.coef is not None \
                else self.refit_every
            self.refit()

    def load_profile(self, profile: dict[str, Any]) -> None:
        super().load_profile(profile)
        self.refit()

    def refit(self) -> None:
        """Fit the latency model once enough proposal lengths were measured; until then `coef` stays None.

        The model is linear in k, so three measured lengths (all of them when K < 2) pin it down.
        """
        self._since_fit, self._new_group = 0, False
        windows = list(self.samples.values())
        sizes = np.array([len(w) for w in windows], dtype=np.int64)
        keys = np.array(list(self.samples), dtype=np.int64).reshape(-1, 2)  # (k, size bucket) of each window
        k, bucket = np.repeat(keys, sizes, axis=0).T  # per sample
        if int((np.bincount(k, minlength=self.max_k + 1) >= self.min_samples).sum()) < min(3, self.max_k + 1):
            return
        x = np.concatenate([w.features[: len(w)] for w in windows])  # [samples, features]
        y = np.concatenate([w.seconds[: len(w)] for w in windows])
        self.coef = fit_nonnegative(x, y)
        ratio = y / np.maximum(x @ self.coef, 1e-9)
        groups, medians, counts = group_medians(bucket * 2 + (k > 0), ratio)
        self.correction = {(bool(g % 2), g // 2): m for g, m, n in zip(groups, medians, counts, strict=True)
                           if n >= self.min_samples}
        self.k_correction, self._correction_rows, self._plans, self._taken = {}, {}, {}, None
        m = self.min_k_samples
        for g, median, n in zip(*group_medians(bucket * (self.max_k + 1) + k, ratio), strict=True):
            kk, b = g % (self.max_k + 1), g // (self.max_k + 1)
            if kk > 0 and n >= m:  # its own median, shrunk toward its group's
                self.k_correction[(kk, b)] = (n * median + m * self.correction.get((True, b), 1.0)) / (n + m)

    def predict(self, features: np.ndarray, k: int = 0, num_decodes: int = 0) -> float:
        """Seconds of a step with these features and longest proposal k, corrected (`_corrections`)."""
        if self.coef is None:
            raise RuntimeError("the latency model is not fitted yet")
        linear = max(float(features @ self.coef), 1e-9)
        return linear * float(self._corrections(num_decodes)[min(k, self.max_k)])

    def _corrections(self, num_decodes: int) -> np.ndarray:
        """[K+1]: the correction of a step whose longest proposal is k, at this decode batch size: k's own
        where it was measured often enough, else its group's (speculating or not), else none (kept per size
        bucket until the next refit)."""
        b = size_bucket(num_decodes)
        if b not in self._correction_rows:
            spec = self.correction.get((True, b), 1.0)
            own = [self.k_correction.get((k, b), spec) for k in range(1, self.max_k + 1)]
            self._correction_rows[b] = np.array([self.correction.get((False, b), 1.0), *own])
        return self._correction_rows[b]

    def _step_times(self, shape: StepShape, lengths: np.ndarray, catch_up: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """For each row of per-request lengths [N, B]: the predicted step seconds, and what one proposed token
        costs in it (the model's seconds less its seconds with one batched, KV and draft token fewer).
        `catch_up[N]` is each row's draft tokens beyond its proposals (default none).

        A step that prefills is mixed whatever k is, and most of its time is the prefill's, so there each k's
        correction (measured on steps of this decode batch size) scales only what proposing adds. Applied to the
        whole step, the gap between the corrections was worth more than a proposal's cost: on a 2-core CPU
        (draft 0.5B, target 1.5B, ShareGPT at 0.4 req/s), in a 12.8 s step prefilling 268 tokens, k = 1 with a
        44-token draft catch-up added 0.76 s to the model's time, but the correction of k = 1 (0.957, plain
        1.000) took 0.58 s of it back, so its 0.85 more tokens seemed to pay and the draft read the prompt."""
        if self.coef is None:
            raise RuntimeError("the latency model is not fitted yet")
        linear, per_token = self._linear(shape, lengths, catch_up)
        corrections = self._corrections(len(shape.caps))
        correction = corrections[lengths.max(axis=1, initial=0)]
        marginal = (np.maximum(linear, 1e-9) - np.maximum(linear - per_token, 1e-9)) * correction
        if shape.mixed:
            plain = float(self._linear(shape, np.zeros((1, lengths.shape[1]), dtype=np.int64), None)[0][0])
            return np.maximum(plain * corrections[0] + (linear - plain) * correction, 1e-9), marginal
        return np.maximum(linear, 1e-9) * correction, marginal

    def _linear(self, shape: StepShape, lengths: np.ndarray, catch_up: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray | float]:
        """The latency model's seconds for each row of lengths [N, B] before corrections, and a proposed
        token's seconds in it. The model is linear, so it is evaluated from each row's proposed tokens, longest
        proposal and mixedness: `predict` of the rows' `features`, without building them (this runs every
        step, on the step's critical path)."""
        c = self._named_coef
        draft_token = c["draft_tokens"] if self.draft_forwards else 0.0
        per_token = c["batched_tokens"] + c["kv_tokens"] + draft_token
        extra = lengths.sum(axis=1)
        longest = lengths.max(axis=1, initial=0)
        linear = (c["intercept"] + c["batched_tokens"] * shape.batched_tokens + c["kv_tokens"] * shape.kv_tokens
                  + per_token * extra + np.where(shape.mixed | (extra > 0),
                                                 c["mixed"] + c["mixed_seqs"] * shape.num_chunks, 0.0))
        graphed = np.zeros(len(lengths), dtype=bool)
        if shape.graph_batch:  # chunk-graph rows: the target computes padded rows, a shorter proposal saves nothing
            graphed = (longest > 0) & (longest + 1 <= shape.graph_len)
            pad = shape.graph_batch * (longest + 1) - shape.batched_tokens - extra  # `padded_tokens`
            linear = linear + np.where(graphed, (c["batched_tokens"] + c["kv_tokens"]) * pad, 0.0)
            per_token = np.where(graphed, draft_token, per_token)
        if shape.graphs:
            linear = linear + np.where(shape.mixed | ((longest > 0) & ~graphed), c["eager"], 0.0)
        if self.draft_forwards:
            linear = linear + c["draft_forwards"] * longest
            if catch_up is not None:
                linear = linear + c["draft_tokens"] * catch_up
        return linear, per_token

    def _catch_up(self, shape: StepShape, lengths: np.ndarray, expected: np.ndarray) -> np.ndarray | None:
        """Draft tokens charged to each row of per-request lengths [N, B] for the requests' lags (module
        docstring): up to one token per proposing request in full, the rest in the share of the request's
        remaining output that it is expected to emit this step, of the output it will emit while speculation
        goes on (the recent share of speculating steps). None when nothing lags.

        Speculation goes on only if the batch's decodes, caught up and alone, would speculate, by more than
        `catch_up_margin`: otherwise a catch-up buys one step of proposals and is charged in full. (The recent
        share starts at 1, so before this check the first steps of a run spread each new prompt's catch-up over
        its output even where no k paid: on a 2-core CPU, k = 1 in 2 of 51 steps at 0.4 req/s made the draft
        read whole prompts, 4.5 s of draft time in all. With the check but no margin, one k = 1 step still did,
        4.4 s, where steady k = 1 at 5 decodes beat plain decoding by ~4%, within the model's error.)"""
        if not self.draft_forwards or not shape.lags or not any(shape.lags):
            return None
        lags = np.asarray(shape.lags, dtype=np.float64)
        steady, once = np.minimum(lags, 1.0), np.maximum(lags - 1.0, 0.0)
        emitted = expected[np.arange(lengths.shape[1])[None, :], lengths]  # [N, B]
        share = 1.0
        if shape.remaining is not None and once.any():
            caught_up = dataclasses.replace(shape.alone or shape, lags=[min(lag, 1) for lag in shape.lags])
            every_k = np.minimum(np.arange(self.max_k + 1)[:, None], np.asarray(shape.caps)[None, :])
            rates = self._goodputs(caught_up, every_k, expected)
            if rates[1:].max() > rates[0] * (1 + self.catch_up_margin):
                ahead = np.asarray(shape.remaining, dtype=np.float64) * self.speculating
                share = np.minimum(1.0, emitted / np.maximum(ahead, 1.0))
        return np.where(lengths > 0, steady + once * share, 0.0).sum(axis=1)

    @staticmethod
    def _tokens(shape: StepShape, lengths: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Expected tokens of the step for each row of per-request lengths [N, B], `expected[i, n]` being the
        tokens request i emits when it proposes n (`_expected_table`)."""
        return shape.num_other_samples + expected[np.arange(lengths.shape[1])[None, :], lengths].sum(axis=1)

    def _goodputs(self, shape: StepShape, lengths: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Goodput of each row of per-request lengths [N, B] (see `_tokens`), lags charged (`_catch_up`)."""
        seconds = self._step_times(shape, lengths, self._catch_up(shape, lengths, expected))[0]
        return self._tokens(shape, lengths, expected) / seconds

    def goodput(self, shape: StepShape, k: int | Seq[int], survivals: Seq[np.ndarray] | np.ndarray | None = None
                ) -> float:
        """Predicted tokens per second of the step at proposal length k (or per-request lengths); `survivals`
        (per decode request, P(its first n proposals accepted) for n = 1..K) default to the tracked ones."""
        if survivals is None:
            survivals = self.acceptance.survivals(shape.keys)
        lengths = [min(k, c) for c in shape.caps] if isinstance(k, int) else list(k)
        return float(self._goodputs(shape, np.array([lengths], dtype=np.int64), _expected_table(survivals))[0])

    def choose(self, shape: StepShape) -> int:
        return max(self.plan(shape), default=0)

    def plan(self, shape: StepShape) -> list[int]:
        """The best k's lengths, each request's trimmed to what pays for it (see `options`)."""
        start = time.perf_counter()
        lengths = self._plan(shape)
        self._plan_s = time.perf_counter() - start
        return lengths

    def _plan(self, shape: StepShape) -> list[int]:
        self._taken = None
        if not shape.caps or max(shape.caps) == 0:
            return [0] * len(shape.caps)
        if self.coef is None:
            self.refit()
        if self.coef is None:  # measuring: cycle through every k
            self._cycle += 1
            return [min(self._cycle % (self.max_k + 1), c) for c in shape.caps]
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.step == self.steps and (not shape.mixed or ahead.k == self.max_k):
            ids = set(map(id, shape.keys))
            if len(ids ^ ahead.ids) <= self.ahead_share * len(ids):
                self.sources["ahead"] += 1
                self._taken = ahead
                return self._reuse(ahead.k, shape)
        make_up = self._make_up(shape)
        reused = self._plans.get(make_up) if make_up is not None else None
        if reused is not None and self.steps - reused[1] < self.replan_every:
            self.sources["reused"] += 1
            return self._reuse(reused[0], shape)
        self.sources["chosen"] += 1
        chosen, plain = self._choose(shape)
        k = max(chosen)
        if make_up is not None and k > 0 and chosen == [min(k, c) for c in shape.caps]:
            if len(self._plans) >= 1024:
                self._plans = {key: v for key, v in self._plans.items() if self.steps - v[1] < self.replan_every}
            self._plans[make_up] = (k, self.steps)
        self._zero_streak = self._zero_streak + 1 if k == 0 else 0
        self.speculating = 0.9 * self.speculating + 0.1 * (k > 0)
        if self._zero_streak >= self.explore_every:
            self._zero_streak = 0
            if self._could_pay(shape, plain):
                lags = shape.lags or [0] * len(shape.caps)
                return [min(1, c) if lag <= 1 else 0 for c, lag in zip(shape.caps, lags, strict=True)]
        return chosen

    def plan_ahead(self, shape: StepShape) -> None:
        """Choose, while the device runs this step, the k of the next step, from `shape`: this step's decodes
        alone, as a step of pure decodes. The next step decodes the same requests, less those that finish and
        plus prompts that complete now; the next `plan` takes the k if its decodes differ from these in at
        most `ahead_share` of its requests (a few requests of many hardly move the best k), and if it is pure
        decodes or the k is K. A step that prefills a prompt as well leaves the decode path whatever k is, so
        proposals cost it less than they cost a pure step: where K was best for the pure step, it is for the
        mixed one. One step stale, it keeps choosing off the step's critical path. A step that took such a k
        passes it on unchosen, as decisions are reused (module docstring), until it is `replan_every` steps
        old: choosing ahead also costs host time, which a step of a small model does not always hide."""
        self._ahead = None
        if self.coef is None or not shape.caps or not self._reusable(shape):
            return
        ids = frozenset(map(id, shape.keys))
        taken = self._taken
        if taken is not None and self.steps - taken.chosen_at < self.replan_every:
            self._ahead = _Ahead(ids, taken.k, self.steps + 1, taken.chosen_at)
            return
        k = max(self._choose(shape)[0])
        if k > 0:
            self._ahead = _Ahead(ids, k, self.steps + 1, self.steps)

    def _choose(self, shape: StepShape) -> tuple[list[int], float]:
        """Per-request lengths of the best option (`options`) and the goodput of plain decoding; the choice is
        timed for `_reusable`.

        A step that also prefills is slow whatever k is, so its goodput (tokens ÷ its whole time) rises with
        any proposal that costs less than the prefill's average time per token, however dear it is next to
        decoding: on a 2-core CPU (draft 0.5B, target 1.5B) the five steps that proposed in one trace were all
        k = 5 in steps that prefilled a ShareGPT prompt (3.0-13.3 s each, the draft reading whole prompts), where
        plain decoding emitted a request's token every 0.22 s, and the trace took 1.26x the latency of no
        speculation. There the options are weighed by what they emit beyond what their time would emit at the
        best rate of the decodes alone (`StepShape.alone`): tokens − rate × seconds, so a proposal pays only if
        it emits faster than decoding would."""
        start = time.perf_counter()
        survivals = self.acceptance.survivals(shape.keys)
        scores, lengths = self.options(shape, survivals)
        values = scores
        if shape.alone is not None:
            rate = float(self.options(shape.alone, survivals)[0].max())
            tokens = self._tokens(shape, lengths, _expected_table(survivals))
            values = tokens - rate * tokens / scores
        chosen = lengths[int(np.argmax(values))].tolist()
        self._choose_s = _moving_average(self._choose_s, time.perf_counter() - start)
        return chosen, float(scores[0])

    def _reuse(self, k: int, shape: StepShape) -> list[int]:
        """Lengths of a decision made for another step (k > 0), with the bookkeeping of a fresh one."""
        self.speculating = 0.9 * self.speculating + 0.1
        self._zero_streak = 0
        return [min(k, c) for c in shape.caps]

    def _reusable(self, shape: StepShape) -> bool:
        """Whether a decision may serve another step than the one it was made for: a step of pure decodes
        without draft lags, where choosing costs a visible share of a step (module docstring)."""
        return not (self.replan_every <= 1 or shape.mixed or shape.lags is not None
                    or (self._choose_s and self._choose_s <= self.reuse_share * self._step_s))

    def _make_up(self, shape: StepShape) -> tuple[Any, ...] | None:
        """What a reused decision must match (module docstring); None: this step is always chosen afresh."""
        if not self._reusable(shape):
            return None
        pairs = sorted(zip(shape.caps, self.acceptance.states(shape.keys), strict=True))
        return (shape.graph_batch, shape.graph_len, shape.graphs, shape.num_other_samples, *pairs)

    def options(self, shape: StepShape, survivals: Seq[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each k in 0..K, all at once: the step's goodput [K+1] and per-request lengths [K+1, B] at
        proposal length k, less the proposals that earn less than the step's goodput.

        A request's n-th proposed token emits one more token with probability S(n), and costs the step's
        time per token; once a step speculates, a request whose acceptance is low adds tokens worth less than
        the time they add (a loaded batch) and proposes fewer. Dropping only proposals below the step's
        average rate raises that rate; the trimmed lengths are kept where the model agrees. When some
        request's draft lags, each k is also tried with only the caught-up requests proposing.
        """
        caps = np.asarray(shape.caps, dtype=np.int64)
        s = np.asarray(survivals, dtype=np.float64).reshape(len(caps), -1)  # [B, K]
        expected = _expected_table(s)
        lengths = np.minimum(np.arange(self.max_k + 1)[:, None], caps[None, :])  # [K+1, B]
        lagging = self.draft_forwards and shape.lags is not None and max(shape.lags) > 1
        if lagging:
            lengths = np.concatenate([lengths, np.where(np.asarray(shape.lags)[None, :] > 1, 0, lengths)])
        seconds, per_token = self._step_times(shape, lengths, self._catch_up(shape, lengths, expected))
        score = self._tokens(shape, lengths, expected) / seconds
        # Survival falls with n, so the proposals worth keeping are a prefix: those whose S(n) reaches the bar.
        worth = (s[None, :, :] >= (score * per_token)[:, None, None]).sum(axis=2)
        trimmed = np.minimum(lengths, worth)
        if (trimmed != lengths).any():  # most steps of well accepted proposals trim nothing
            trimmed_score = self._goodputs(shape, trimmed, expected)
            better = trimmed_score > score
            score, lengths = np.where(better, trimmed_score, score), np.where(better[:, None], trimmed, lengths)
        if not lagging:
            return score, lengths
        variant = score.reshape(2, -1).argmax(axis=0)  # [K+1]: all requests, or the caught-up ones only
        k = np.arange(self.max_k + 1)
        return score.reshape(2, -1)[variant, k], lengths.reshape(2, self.max_k + 1, -1)[variant, k]

    def _could_pay(self, shape: StepShape, plain: float) -> bool:
        """Whether some k > 0 would beat plain decoding if every proposal were accepted."""
        caps = np.asarray(shape.caps, dtype=np.int64)
        lengths = np.minimum(np.arange(1, self.max_k + 1)[:, None], caps[None, :])  # [K, B]
        perfect = _expected_table(np.ones((len(caps), self.max_k)))
        return bool((self._goodputs(shape, lengths, perfect) > plain).any())


def _moving_average(average: float, value: float) -> float:
    """The next value of an exponential moving average that starts at its first value (0.0: none yet)."""
    return value if not average else 0.95 * average + 0.05 * value


def _expected_table(survivals: Seq[np.ndarray] | np.ndarray) -> np.ndarray:
    """[B, K + 1]: tokens request i emits on average when it proposes n = 0..K (`expected_tokens` for all n)."""
    s = np.asarray(survivals, dtype=np.float64)
    s = s.reshape(len(s), -1)
    return 1.0 + np.concatenate([np.zeros((len(s), 1)), np.cumsum(s, axis=1)], axis=1)


def make_controller(spec_k: int | str, max_k: int, draft_forwards: bool,
                    profile: str | Path | None = None) -> Controller:
    """`spec_k` "smart" or a fixed integer; `profile` (a JSON file written by `save_profile`) warm-starts it."""
    controller: Controller = (SmartSpec(max_k, draft_forwards) if spec_k == "smart"
                              else FixedK(int(spec_k), max_k, draft_forwards))
    if profile is not None:
        controller.load_profile(read_profile(profile))
    return controller
