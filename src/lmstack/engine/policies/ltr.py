"""Learning-to-rank scheduling (arXiv 2408.15792): serve requests in the order of their predicted output length.

Exact output lengths cannot be predicted, but their order can, and ordering by a learned rank approximates
shortest-job-first, which cuts head-of-line blocking. Each request is scored once, when it arrives, by a
`LengthRanker` (higher score = longer predicted output), whatever has arrived scored in one batch at the start of
the next scheduling step, on the engine's thread. On a GPU the ranker's forward is a CUDA graph per (batch,
length) bucket (`ranking.graphed.BucketedScorer`): the step only queues it on the engine's stream and collects
the scores at a later step, so the step never waits for the predictor; a request with no score yet simply stays
in the queue until its score lands (only an otherwise idle engine waits for it). A second thread is no way to
hide the predictor: on a GPU it fights the engine loop for the GIL (measured: 16 ms of wall time a request,
mean TTFT 147 ms against fcfs's 30 ms), on a CPU it slows every OpenMP region of the engine (+75% step time on 2 cores).

Waiting and running requests are ordered by score: free batch slots go to the best-ranked waiting requests, and
under memory pressure the lowest-ranked running request is preempted. With `preempt=True` the batch is also kept to
the best-ranked requests (a new short request takes the slot of the longest-ranked running one); it is off by
default because this engine recomputes an evicted request from scratch: on Llama-3-8B shapes at 1.3x the measured
capacity, eviction made ltr's mean latency 1.35x and the oracle's 1.20x worse
(benchmarks/results/ltr_serving_evict.json).
Starvation guard: a request passed over in `starvation_steps` steps (steps that admitted a later arrival while it
waited) gets top priority for `quantum` steps, so no request can be passed over forever; it is admitted at the
next free slot rather than by eviction, and once admitted it is never evicted for a better-ranked newcomer (only
under memory pressure), so promotions cannot cascade into recomputation. Steps spent waiting behind a full batch
that admitted nobody newer do not count: that wait is load, not unfairness. Counting every waiting step made the
guard fire for every request once a queue formed, so under load ltr became FCFS plus `starvation_steps` of delay
(Llama-3-8B shapes at 1.2x capacity: mean TTFT 5.9 s against fcfs's 3.1 s).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lmstack.engine.policies import Policy, register
from lmstack.engine.sequence import Sequence
from lmstack.errors import LmstackError

log = logging.getLogger(__name__)

_PRUNE_EVERY = 256  # steps between sweeps that forget finished requests

# Sort tiers: boosted first, then ranked by score, then requests the ranker could not score (FCFS among
# them), and last the ones whose score is still being computed (not admissible yet).
_BOOSTED, _RANKED, _UNRANKABLE, _PENDING = range(4)


class Scorer(Protocol):
    """What the policy needs from a ranker: one score per prompt, higher = longer predicted output."""

    def score(self, prompts: list[str]) -> list[float]: ...


class Pending(Protocol):
    """Scores being computed: `index` = positions in the launched prompts; `gpu_s` is set by `result`."""

    index: list[int]
    gpu_s: float

    def done(self) -> bool: ...

    def result(self) -> list[float]: ...


@dataclass
class _State:
    tier: int = _PENDING
    score: float = 0.0
    passed_over: int = 0  # steps, since it last ran, that admitted a later arrival while this one waited
    boost_left: int = 0  # steps of top priority left
    boosted: bool = False  # was starved once: keeps its batch slot from then on


@dataclass
class ScorerStats:
    """What scoring cost, for the "< 2% of step time" budget: the engine thread's time in the ranker plus the
    ranker's GPU time (`busy_s`, an upper bound on what it adds to the steps)."""

    num_scored: int = 0
    num_failed: int = 0
    num_batches: int = 0
    busy_s: float = 0.0
    gpu_s: float = 0.0


class BatchScorer:
    """Scores queued prompts in batches when `poll` is called: inline with a plain `Scorer`, or launched without
    waiting when the scorer has `launch(prompts) -> [Pending]` (a `BucketedScorer` on CUDA), then collected."""

    def __init__(self, scorer: Scorer, batch_size: int) -> None:
        self.scorer = scorer
        self.batch_size = batch_size
        self.stats = ScorerStats()
        self._queue: deque[tuple[Sequence, _State]] = deque()
        self._in_flight: list[tuple[Pending, list[tuple[Sequence, _State]]]] = []

    def submit(self, items: list[tuple[Sequence, _State]]) -> None:
        self._queue.extend(items)

    def poll(self) -> None:
        """Score (or launch) everything queued, then collect the scores that have landed."""
        start = time.perf_counter()
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            self._score(batch)
        self._collect(wait=False)
        self.stats.busy_s += time.perf_counter() - start

    def wait(self) -> None:
        """An idle engine: wait for the scores in flight (their GPU time is counted as they are collected)."""
        self._collect(wait=True)

    def _score(self, batch: list[tuple[Sequence, _State]]) -> None:
        items = [(seq, state) for seq, state in batch if seq.prompt]
        self._assign_failed([(seq, state) for seq, state in batch if not seq.prompt])
        if not items:
            return
        texts = [seq.prompt for seq, _ in items]
        launch = getattr(self.scorer, "launch", None)
        try:
            if launch is not None:
                for pending in launch(texts):
                    self._in_flight.append((pending, [items[i] for i in pending.index]))
                self.stats.num_batches += 1
                return
            scores = [float(s) for s in self.scorer.score(texts)]
        except Exception:
            log.exception("the ranker failed on %d prompts; they are served after the ranked ones", len(texts))
            self._assign_failed(items)
            return
        self.stats.num_batches += 1
        self._assign(items, scores)

    def _collect(self, wait: bool) -> None:
        keep = []
        for pending, items in self._in_flight:
            if not wait and not pending.done():
                keep.append((pending, items))
                continue
            try:
                scores = [float(s) for s in pending.result()]
            except Exception:
                log.exception("the ranker failed on %d prompts; they are served after the ranked ones", len(items))
                self._assign_failed(items)
                continue
            self.stats.gpu_s += pending.gpu_s
            self.stats.busy_s += pending.gpu_s
            self._assign(items, scores)
        self._in_flight = keep

    def _assign(self, items: list[tuple[Sequence, _State]], scores: list[float]) -> None:
        if len(scores) != len(items) or not all(math.isfinite(s) for s in scores):
            log.error("the ranker returned %d scores (finite: %s) for %d prompts; they are served after the "
                      "ranked ones", len(scores), all(math.isfinite(s) for s in scores), len(items))
            self._assign_failed(items)
            return
        for (seq, state), score in zip(items, scores, strict=True):
            seq.score = state.score = score
            state.tier = _RANKED
            self.stats.num_scored += 1

    def _assign_failed(self, items: list[tuple[Sequence, _State]]) -> None:
        for _, state in items:
            state.tier = _UNRANKABLE
            self.stats.num_failed += 1


def load_ranker(path: str | Path, device: str) -> Scorer:
    """A trained `LengthRanker` folder (from `lmstack ltr train`). On CUDA: in 16-bit (fp16 for BERT encoders,
    bf16 for decoder LMs, whose activations can overflow fp16) behind a `BucketedScorer` that replays CUDA graphs."""
    if not Path(path).is_dir():
        raise LmstackError(f"ranker folder {path} does not exist; train one with `lmstack ltr train` and pass "
                           "its output folder as --ranker")
    try:
        from lmstack.ranking import LengthRanker
        from lmstack.ranking.graphed import BucketedScorer
    except ImportError as e:
        raise LmstackError(f"the ltr policy needs lmstack.ranking, which cannot be imported ({e})") from None
    if not device.startswith("cuda"):
        return LengthRanker.load(str(path), device=device)
    from lmstack.models.decoder_encoder import is_decoder_model

    dtype = torch.bfloat16 if is_decoder_model(str(path)) else torch.float16
    return BucketedScorer(LengthRanker.load(str(path), device=device, dtype=dtype))


def resolve_ranker_device(device: str) -> str:
    """`auto` → the GPU when there is one: the ranker is small and runs beside the engine."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@register
class LearnedRankPolicy(Policy):
    name = "ltr"

    def __init__(self, ranker: str | Path | Scorer | None = None, device: str = "auto", batch_size: int = 32,
                 starvation_steps: int = 256, quantum: int = 64, preempt: bool = False) -> None:
        """`ranker`: a folder (loaded on `device`) or a loaded `Scorer`; a `BucketedScorer` gets its graphs
        captured here, before serving starts."""
        if ranker is None:
            raise LmstackError("the ltr policy needs a trained ranker: pass --ranker PATH (a folder written by "
                               "`lmstack ltr train`)")
        for label, value in (("batch_size", batch_size), ("starvation_steps", starvation_steps),
                             ("quantum", quantum)):
            if not isinstance(value, int) or value < 1:
                raise LmstackError(f"ltr {label} must be a positive integer, got {value!r}")
        self.device = resolve_ranker_device(device)
        scorer = load_ranker(ranker, self.device) if isinstance(ranker, str | Path) else ranker
        self.starvation_steps = starvation_steps
        self.quantum = quantum
        self.preemptive = preempt
        capture = getattr(scorer, "capture", None)
        if capture is not None:
            capture()
        self.scorer = BatchScorer(scorer, batch_size)
        self._states: dict[Sequence, _State] = {}
        self._newest_admitted: tuple[float, int] | None = None  # (arrival, seq_no), since the last step began

    @property
    def stats(self) -> ScorerStats:
        return self.scorer.stats

    def key(self, seq: Sequence) -> tuple:
        state = self._states.get(seq)
        if state is None:  # not seen by on_arrival (cannot happen through the scheduler)
            return (_UNRANKABLE, 0.0, seq.arrival_time, seq.seq_no)
        if state.boost_left > 0:  # among starved requests, the one in the system longest goes first
            return (_BOOSTED, 0.0, seq.arrival_time, seq.seq_no)
        if state.tier == _RANKED:
            return (_RANKED, state.score, seq.arrival_time, seq.seq_no)
        return (state.tier, 0.0, seq.arrival_time, seq.seq_no)

    def outranks(self, newcomer: Sequence, running: Sequence) -> bool:
        """Rank decides, but the starvation guard never evicts: a boosted newcomer takes the next free slot, and
        a request that was once starved keeps its slot, so the guard cannot become round-robin recomputation."""
        new, old = self._states.get(newcomer), self._states.get(running)
        if (new is not None and new.boost_left > 0) or (old is not None and old.boosted):
            return False
        return super().outranks(newcomer, running)

    def ready(self, seq: Sequence) -> bool:
        state = self._states.get(seq)
        return state is None or state.tier != _PENDING

    def on_arrival(self, seqs: list[Sequence]) -> None:
        items = [(seq, _State()) for seq in seqs]
        self._states.update(items)
        self.scorer.submit(items)

    def on_step(self, step: int, waiting: list[Sequence], running: list[Sequence]) -> None:
        self.scorer.poll()
        # Every request that arrived before the latest one the previous step admitted, and still waits, was
        # passed over in that step.
        newest, self._newest_admitted = self._newest_admitted, None
        for seq in running:
            state = self._states.get(seq)
            if state is not None:
                state.passed_over = 0
                if state.boost_left > 0:
                    state.boost_left -= 1
        for seq in waiting if newest is not None else []:
            state = self._states.get(seq)
            if state is None or state.tier == _PENDING or (seq.arrival_time, seq.seq_no) > newest:
                continue
            state.passed_over += 1
            if state.passed_over >= self.starvation_steps and state.boost_left <= 0:
                state.boost_left, state.passed_over, state.boosted = self.quantum, 0, True
        if step % _PRUNE_EVERY == 0:
            self._states = {s: st for s, st in self._states.items() if not s.is_finished}

    def on_admit(self, seqs: list[Sequence]) -> None:
        newest = max((seq.arrival_time, seq.seq_no) for seq in seqs)
        if self._newest_admitted is None or newest > self._newest_admitted:
            self._newest_admitted = newest

    def on_idle(self) -> None:
        self.scorer.wait()
