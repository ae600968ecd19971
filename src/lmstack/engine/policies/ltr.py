"""Learning-to-rank scheduling (arXiv 2408.15792): serve requests in the order of their predicted output length.

Exact output lengths cannot be predicted, but their order can, and ordering by a learned rank approximates
shortest-job-first, which cuts head-of-line blocking. Each request is scored once, when it arrives, by a
`LengthRanker` (higher score = longer predicted output), whatever has arrived scored in one batch. On a GPU
that runs in a background thread on its own CUDA stream, so the engine step never waits for the predictor: a
request with no score yet simply stays in the queue until its score lands (only an otherwise idle engine waits
for it, briefly). On a CPU there is no idle hardware to hide it on, and a second thread running torch makes
every OpenMP parallel region of the engine slower (measured: +75% step time on 2 cores, as OpenMP stops
spinning once it has more threads than cores), so there the arrivals are scored at the start of the next
scheduling step, on the engine thread.

Waiting and running requests are ordered by score; the batch is kept to the best-ranked requests (a new short
request takes the slot of the longest-ranked running one, which is recomputed later), and under memory
pressure the lowest-ranked request is preempted. Starvation guard: a request that has waited
`starvation_steps` steps gets top priority for `quantum` steps, so no request can be passed over forever; it
is admitted at the next free slot rather than by eviction, and once admitted it is never evicted for a
better-ranked newcomer (only under memory pressure), so promotions cannot cascade into recomputation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
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

_IDLE_WAIT_S = 0.005  # an idle engine re-checks for fresh scores (and new requests) this often
_PRUNE_EVERY = 256  # steps between sweeps that forget finished requests

# Sort tiers: boosted first, then ranked by score, then requests the ranker could not score (FCFS among
# them), and last the ones whose score is still being computed (not admissible yet).
_BOOSTED, _RANKED, _UNRANKABLE, _PENDING = range(4)


class Scorer(Protocol):
    """What the policy needs from a ranker: one score per prompt, higher = longer predicted output."""

    def score(self, prompts: list[str]) -> list[float]: ...


@dataclass
class _State:
    tier: int = _PENDING
    score: float = 0.0
    waited: int = 0  # consecutive steps spent waiting
    boost_left: int = 0  # steps of top priority left
    boosted: bool = False  # was starved once: keeps its batch slot from then on


@dataclass
class ScorerStats:
    """What scoring cost, for the "< 2% of step time" budget: wall time inside `ranker.score` calls."""

    num_scored: int = 0
    num_failed: int = 0
    num_batches: int = 0
    busy_s: float = 0.0


class BatchScorer:
    """Scores queued prompts in batches: on its own thread (`threaded`), or when `score_pending` is called."""

    def __init__(self, scorer: Scorer, batch_size: int, device: str, threaded: bool) -> None:
        self.scorer = scorer
        self.batch_size = batch_size
        self.device = device
        self.stats = ScorerStats()
        self._cond = threading.Condition()
        self._queue: deque[tuple[Sequence, _State]] = deque()
        self._in_flight = 0  # prompts taken off the queue and being scored
        self._closed = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="lmstack-ltr-scorer", daemon=True)
            self._thread.start()

    def submit(self, items: list[tuple[Sequence, _State]]) -> None:
        with self._cond:
            self._queue.extend(items)
            self._cond.notify_all()

    def score_pending(self) -> None:
        """Inline mode: score everything queued now, in batches; a no-op when a thread does the scoring."""
        while self._thread is None and self._queue:
            self._score([self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))], None)

    def wait(self, timeout: float) -> None:
        """Block until the batch being scored lands (at most `timeout` s); return at once when nothing is."""
        if self._thread is None:
            return
        with self._cond:
            if self._queue or self._in_flight:
                self._cond.wait(timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        # On CUDA the ranker runs on its own stream, so its kernels overlap the engine's instead of queueing.
        stream = torch.cuda.Stream(device=self.device) if self.device.startswith("cuda") else None
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
                self._in_flight = len(batch)
            self._score(batch, stream)
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()

    def _score(self, batch: list[tuple[Sequence, _State]], stream: torch.cuda.Stream | None) -> None:
        texts = [seq.prompt for seq, _ in batch if seq.prompt]
        start = time.perf_counter()
        scores: list[float] = []
        try:
            if texts:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    scores = [float(s) for s in self.scorer.score(texts)]
                if len(scores) != len(texts) or not all(math.isfinite(s) for s in scores):
                    raise ValueError(f"the ranker returned {len(scores)} scores (finite: "
                                     f"{all(math.isfinite(s) for s in scores)}) for {len(texts)} prompts")
        except Exception:
            log.exception("the ranker failed on %d prompts; they are served after the ranked ones", len(texts))
            scores = []
        self.stats.busy_s += time.perf_counter() - start
        self.stats.num_batches += 1
        it = iter(scores)
        for seq, state in batch:
            score = next(it, None) if seq.prompt else None
            if score is None:
                state.tier = _UNRANKABLE
                self.stats.num_failed += 1
            else:
                seq.score = state.score = score
                state.tier = _RANKED
                self.stats.num_scored += 1


def load_ranker(path: str | Path, device: str) -> Scorer:
    """A trained `LengthRanker` folder (from `lmstack ltr train`)."""
    if not Path(path).is_dir():
        raise LmstackError(f"ranker folder {path} does not exist; train one with `lmstack ltr train` and pass "
                           "its output folder as --ranker")
    try:
        from lmstack.ranking import LengthRanker
    except ImportError as e:
        raise LmstackError(f"the ltr policy needs lmstack.ranking, which cannot be imported ({e})") from None
    return LengthRanker.load(str(path), device=device)


def resolve_ranker_device(device: str) -> str:
    """`auto` → the GPU when there is one: the ranker is small and runs beside the engine."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@register
class LearnedRankPolicy(Policy):
    name = "ltr"
    preemptive = True

    def __init__(self, ranker: str | Path | Scorer | None = None, device: str = "auto", batch_size: int = 32,
                 starvation_steps: int = 256, quantum: int = 64, preempt: bool = True,
                 threaded: bool | None = None) -> None:
        """`threaded`: score on a background thread (default: when the ranker runs on CUDA; see the module doc)."""
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
        threaded = self.device.startswith("cuda") if threaded is None else threaded
        self.scorer = BatchScorer(scorer, batch_size, self.device, threaded)
        self._states: dict[Sequence, _State] = {}

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
        self.scorer.score_pending()
        for seq in waiting:
            state = self._states.get(seq)
            if state is None or state.tier == _PENDING:
                continue
            state.waited += 1
            if state.waited >= self.starvation_steps and state.boost_left <= 0:
                state.boost_left, state.waited, state.boosted = self.quantum, 0, True
        for seq in running:
            state = self._states.get(seq)
            if state is not None:
                state.waited = 0
                if state.boost_left > 0:
                    state.boost_left -= 1
        if step % _PRUNE_EVERY == 0:
            self._states = {s: st for s, st in self._states.items() if not s.is_finished}

    def on_idle(self) -> None:
        self.scorer.wait(_IDLE_WAIT_S)

    def close(self) -> None:
        self.scorer.close()
