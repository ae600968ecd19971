"""Scheduling policies at the scheduler level (real BlockManager, small pools) and through the engine.

`_step` plays the engine's part without a model: it applies a scheduled step (computed tokens, one sampled
token per finished chunk) and retires requests that reached `max_tokens`, so the tests follow every request
token by token.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable

import pytest
import torch

from lmstack.engine.block_manager import BlockManager
from lmstack.engine.policies import make_policy
from lmstack.engine.policies.ltr import LearnedRankPolicy
from lmstack.engine.policies.mlfq import SkipJoinMLFQ
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.scheduler import Scheduler, SchedulerOutput
from lmstack.engine.sequence import Sequence, Status
from lmstack.errors import LmstackError


class TableScorer:
    """A deterministic ranker: the score is looked up by prompt (the policy, not the predictor, is tested)."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.calls: list[list[str]] = []

    def score(self, prompts: list[str]) -> list[float]:
        self.calls.append(list(prompts))
        return [self.scores[p] for p in prompts]


class GatedPending:
    """Scores that land when the test opens the gate, as a GPU ranker's land when its graph has run."""

    def __init__(self, index: list[int], scores: list[float], gate: threading.Event) -> None:
        self.index, self.scores, self.gate, self.gpu_s = index, scores, gate, 0.0

    def done(self) -> bool:
        return self.gate.is_set()

    def result(self) -> list[float]:
        assert self.gate.wait(10), "result() waited for a gate nobody opens"
        self.gpu_s = 0.001
        return self.scores


class AsyncTableScorer(TableScorer):
    """`launch` queues the work and returns at once (the `BucketedScorer` interface), in batches of 4."""

    def __init__(self, scores: dict[str, float], gate: threading.Event) -> None:
        super().__init__(scores)
        self.gate = gate

    def launch(self, prompts: list[str]) -> list[GatedPending]:
        self.calls.append(list(prompts))
        return [GatedPending(list(range(s, min(s + 4, len(prompts)))), [self.scores[p] for p in prompts[s : s + 4]],
                             self.gate) for s in range(0, len(prompts), 4)]


def _seq(i: int, output_len: int, prompt_len: int = 4, prompt: str | None = None) -> Sequence:
    return Sequence(request_id=str(i), prompt_token_ids=[1] * prompt_len, prompt=prompt if prompt else f"p{i}",
                    params=SamplingParams(max_tokens=output_len, ignore_eos=True), seq_no=i, arrival_time=float(i))


def _sched(policy: str | object, max_num_seqs: int = 4, num_blocks: int = 256, block_size: int = 4,
           budget: int = 64, **options: object) -> Scheduler:
    pol = make_policy(policy, **options) if isinstance(policy, str) else policy
    return Scheduler(BlockManager(num_blocks, block_size), pol, max_num_seqs, budget)


def _step(sched: Scheduler, finished: list[str] | None = None) -> SchedulerOutput:
    out = sched.schedule()
    for c in out.chunks:
        c.seq.num_computed += c.num_tokens
        if c.samples:
            c.seq.output_token_ids.append(7)
            if c.seq.num_output_tokens >= c.seq.params.max_tokens:
                sched.finish(c.seq, "length")
                if finished is not None:
                    finished.append(c.seq.request_id)
    return out


def _drain(sched: Scheduler, max_steps: int = 10_000) -> list[str]:
    finished: list[str] = []
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return finished
        _step(sched, finished)
    raise AssertionError("requests did not finish")


def _wait_scored(policy: LearnedRankPolicy, n: int) -> None:
    """Score what has arrived, as the start of the next step would (so that a test can add more first)."""
    policy.scorer.poll()
    assert policy.stats.num_scored + policy.stats.num_failed == n


def _ltr(scores: dict[str, float], **options: object) -> LearnedRankPolicy:
    return LearnedRankPolicy(ranker=TableScorer(scores), device="cpu", **options)


# ----- oracle-sjf -----
def test_oracle_sjf_serves_shortest_true_length_first() -> None:
    sched = _sched("oracle-sjf", max_num_seqs=1)
    sched.add([_seq(0, 8), _seq(1, 2), _seq(2, 5), _seq(3, 1)])
    assert _drain(sched) == ["3", "1", "2", "0"]
    fcfs = _sched("fcfs", max_num_seqs=1)
    fcfs.add([_seq(0, 8), _seq(1, 2), _seq(2, 5), _seq(3, 1)])
    assert _drain(fcfs) == ["0", "1", "2", "3"]


def test_oracle_sjf_preempts_by_remaining_length() -> None:
    """With `preempt`, a full batch gives its slot to a shorter newcomer; the evicted request is recomputed from
    scratch. By default the newcomer waits for a free slot."""
    default = _sched("oracle-sjf", max_num_seqs=1)
    default.add([_seq(0, 20)])
    _step(default)
    default.add([_seq(1, 3)])
    assert not any(_step(default).preempted for _ in range(5))
    assert _drain(default) == ["0", "1"]
    sched = _sched("oracle-sjf", max_num_seqs=1, preempt=True)
    long = _seq(0, 20)
    sched.add([long])
    for _ in range(5):
        _step(sched)
    assert long.status is Status.RUNNING and long.num_output_tokens == 5  # the prefill step samples too
    sched.add([_seq(1, 3)])
    out = _step(sched)
    assert out.preempted == [long] and long.num_computed == 0 and long.block_table == []
    assert [c.seq.request_id for c in out.chunks] == ["1"]
    sched.add([_seq(2, 30)])  # longer than what the first request has left: no preemption
    assert _drain(sched) == ["1", "0", "2"]
    assert long.num_preemptions == 1 and sched.blocks.num_used == 0


def test_non_preemptive_policies_keep_running_requests() -> None:
    sched = _sched("fcfs", max_num_seqs=1)
    sched.add([_seq(0, 10)])
    _step(sched)
    sched.add([_seq(1, 1)])
    assert all(not _step(sched).preempted for _ in range(3))
    assert _drain(sched) == ["0", "1"]


# ----- ltr -----
def test_ltr_orders_waiting_and_running_by_score() -> None:
    scores = {"p0": 5.0, "p1": -1.0, "p2": 3.0, "p3": 0.5}
    policy = _ltr(scores)
    sched = _sched(policy, max_num_seqs=1)
    sched.add([_seq(i, 3) for i in range(4)])
    _wait_scored(policy, 4)
    assert _drain(sched) == ["1", "3", "2", "0"]
    policy.close()


def test_ltr_scores_once_in_batches_off_the_step() -> None:
    """With a launching scorer (a GPU ranker) requests wait, unadmitted, for their scores, and no step waits for
    them: each step only collects what has landed; an idle engine waits once, then admits."""
    gate = threading.Event()
    scorer = AsyncTableScorer({f"p{i}": float(5 - i) for i in range(6)}, gate)
    policy = LearnedRankPolicy(ranker=scorer, device="cpu", batch_size=8)
    sched = _sched(policy, max_num_seqs=8)
    sched.add([_seq(i, 2) for i in range(6)])
    start = time.perf_counter()
    for _ in range(3):
        policy.scorer.poll()  # a busy step: launch or collect, never wait
        assert not any(policy.ready(s) for s in sched.waiting)
    assert time.perf_counter() - start < 0.5
    assert scorer.calls == [[f"p{i}" for i in range(6)]]  # launched once, at the first step, in one batch
    gate.set()
    out = _step(sched)  # the scores have landed: collected and admitted in this step, best ranked first
    assert [c.seq.request_id for c in out.chunks] == ["5", "4", "3", "2", "1", "0"]
    assert _drain(sched) and not sched.has_unfinished
    assert len(scorer.calls) == 1  # preempted or not, nobody is scored twice
    assert policy.stats.num_scored == 6 and policy.stats.gpu_s == pytest.approx(0.002)
    policy.close()


def test_ltr_idle_engine_waits_for_scores_in_flight() -> None:
    gate = threading.Event()
    policy = LearnedRankPolicy(ranker=AsyncTableScorer({"p0": 1.0}, gate), device="cpu")
    sched = _sched(policy, max_num_seqs=2)
    sched.add([_seq(0, 2)])
    threading.Timer(0.05, gate.set).start()
    assert not _step(sched).chunks  # nothing admissible: the idle step waits until the scores land
    assert gate.is_set() and policy.stats.num_scored == 1
    assert [c.seq.request_id for c in _step(sched).chunks] == ["0"]


def test_ltr_preempts_the_lowest_ranked_under_memory_pressure() -> None:
    # 3 requests x (4 prompt + up to 12 output) tokens need 12 blocks of 4; the pool has 9 usable.
    scores = {"p0": 1.0, "p1": 9.0, "p2": 4.0}
    policy = _ltr(scores, starvation_steps=10_000)
    sched = _sched(policy, max_num_seqs=3, num_blocks=10)
    seqs = [_seq(i, 12) for i in range(3)]
    sched.add(seqs)
    _wait_scored(policy, 3)
    preempted: list[str] = []
    while sched.has_unfinished:
        preempted += [s.request_id for s in _step(sched).preempted]
    assert preempted and set(preempted) == {"1"}  # always the highest predicted length
    policy.close()


@pytest.mark.parametrize("preempt", [True, False])
def test_ltr_batch_gives_way_to_better_ranked_newcomer_only_with_preempt(preempt: bool) -> None:
    policy = _ltr({"p0": 8.0, "p1": 2.0, "p2": 1.0}, preempt=preempt)
    sched = _sched(policy, max_num_seqs=2)
    sched.add([_seq(0, 30), _seq(1, 30)])
    _wait_scored(policy, 2)
    _step(sched)
    sched.add([_seq(2, 30)])
    _wait_scored(policy, 3)
    out = _step(sched)
    if preempt:
        assert [s.request_id for s in out.preempted] == ["0"]
        assert {s.request_id for s in sched.running} == {"1", "2"}
    else:
        assert not out.preempted and {s.request_id for s in sched.running} == {"0", "1"}
        assert sched.waiting[0].request_id == "2"
    policy.close()


def test_ltr_starvation_boosts_order_admission_but_never_evict() -> None:
    # A burst: 12 requests at once, 2 slots, starvation after 3 steps, so most requests get boosted while others
    # run. Boosts must only reorder admission; evicting for them would recompute work over and over.
    policy = _ltr({f"p{i}": float(i % 5) for i in range(12)}, starvation_steps=3, quantum=2, preempt=True)
    sched = _sched(policy, max_num_seqs=2)
    sched.add([_seq(i, 6) for i in range(12)])
    _wait_scored(policy, 12)
    preempted = 0
    while sched.has_unfinished:
        preempted += len(_step(sched).preempted)
    assert preempted == 0 and sched.num_preemptions == 0
    policy.close()


def test_ltr_once_starved_request_keeps_its_slot() -> None:
    policy = _ltr({"p0": 9.0, "p1": 1.0}, starvation_steps=2, quantum=1, preempt=True)
    sched = _sched(policy, max_num_seqs=1)
    sched.add([_seq(0, 30), _seq(1, 4), _seq(3, 4, prompt="p1")])  # "1" and "3" arrive later and rank better
    _wait_scored(policy, 3)
    while not (sched.running and sched.running[0].request_id == "0"):  # passed over twice: boosted, then runs
        assert not _step(sched).preempted
    sched.add([_seq(2, 3, prompt="p1")])  # a better-ranked newcomer
    _wait_scored(policy, 4)
    assert not _step(sched).preempted and sched.running[0].request_id == "0"
    policy.close()


def test_ltr_on_cpu_scores_arrivals_inline_at_the_next_step() -> None:
    scorer = TableScorer({"p0": 5.0, "p1": 1.0, "p2": 3.0})
    policy = LearnedRankPolicy(ranker=scorer, device="cpu", batch_size=8)
    sched = _sched(policy, max_num_seqs=1)
    sched.add([_seq(0, 2), _seq(1, 2), _seq(2, 2)])
    assert scorer.calls == []  # nothing scored on arrival
    out = _step(sched)
    assert scorer.calls == [["p0", "p1", "p2"]]  # one batch, at the start of the step
    assert [c.seq.request_id for c in out.chunks] == ["1"]  # and admitted in that same step, best ranked first
    assert _drain(sched) == ["1", "2", "0"]
    policy.close()


def test_ltr_requests_it_cannot_score_are_served_after_ranked_ones() -> None:
    class Broken:
        def score(self, prompts: list[str]) -> list[float]:
            raise RuntimeError("ranker exploded")

    policy = LearnedRankPolicy(ranker=Broken(), device="cpu")
    sched = _sched(policy, max_num_seqs=1)
    sched.add([_seq(0, 2), _seq(1, 2)])
    assert _drain(sched) == ["0", "1"]  # FCFS among unrankable ones, nothing hangs
    assert policy.stats.num_failed == 2
    policy.close()


def _adversarial_max_wait(starvation_steps: int, quantum: int, steps: int = 600) -> tuple[int, bool]:
    """One long request (ranked last) against a one-token request arriving every step with max_num_seqs=1.

    The short requests alone keep the batch busy every step, so pure rank order never serves the long one.
    Returns the longest run of steps in which the long request got no token, and whether it finished.
    """
    scores = {"long": 100.0} | {f"s{i}": 0.0 for i in range(1, steps + 1)}
    policy = _ltr(scores, starvation_steps=starvation_steps, quantum=quantum)
    sched = _sched(policy, max_num_seqs=1)
    long = _seq(0, 40, prompt="long")
    sched.add([long])
    _wait_scored(policy, 1)
    gap = longest = 0
    for i in range(1, steps + 1):
        sched.add([_seq(i, 1, prompt=f"s{i}")])
        _wait_scored(policy, i + 1)
        before = long.num_output_tokens
        _step(sched)
        gap = 0 if long.num_output_tokens > before or long.is_finished else gap + 1
        longest = max(longest, gap)
        if long.is_finished:
            break
    policy.close()
    return longest, long.is_finished


def test_starvation_guard_bounds_the_wait_of_a_long_request() -> None:
    longest, finished = _adversarial_max_wait(starvation_steps=20, quantum=8)
    assert finished
    assert longest <= 20 + 1  # boosted once its wait reaches the threshold, and oldest among the boosted
    unguarded_longest, unguarded_finished = _adversarial_max_wait(starvation_steps=10**6, quantum=8)
    assert not unguarded_finished and unguarded_longest > 500  # without the guard it starves


def test_ltr_waiting_behind_a_full_batch_does_not_count_as_starvation() -> None:
    # Ranks agree with arrival order, so each admission takes the oldest waiting request: the queue waits far
    # longer than starvation_steps, but nobody is passed over, so nobody is boosted and a better-ranked newcomer
    # still goes first. (Counting every waiting step boosted the whole queue ahead of it: FCFS plus a delay.)
    policy = _ltr({f"p{i}": float(i + 1) for i in range(5)} | {"p5": 0.0}, starvation_steps=3, quantum=2)
    sched = _sched(policy, max_num_seqs=1)
    sched.add([_seq(i, 8) for i in range(5)])
    _wait_scored(policy, 5)
    finished: list[str] = []
    for _ in range(12):  # "0" finishes; "1" runs; "2".."4" have waited 12 steps
        _step(sched, finished)
    assert finished == ["0"] and sched.running[0].request_id == "1"
    sched.add([_seq(5, 8)])
    _wait_scored(policy, 6)
    assert finished + _drain(sched) == ["0", "1", "5", "2", "3", "4"]
    policy.close()


def test_ltr_validates_its_options() -> None:
    with pytest.raises(LmstackError, match="--ranker"):
        make_policy("ltr")
    with pytest.raises(LmstackError, match="starvation_steps"):
        make_policy("ltr", ranker=TableScorer({}), starvation_steps=0)
    with pytest.raises(LmstackError, match="does not exist"):
        make_policy("ltr", ranker="/nonexistent/ranker", device="cpu")
    with pytest.raises(LmstackError, match="no option"):
        make_policy("fcfs", ranker="x")


def test_serve_flags_become_policy_options() -> None:
    from lmstack.cli import build_parser
    from lmstack.server.cli import policy_options

    args = build_parser().parse_args(["serve", "--policy", "ltr", "--ranker", "runs/r", "--starvation-steps", "50",
                                      "--quantum", "8", "--ranker-device", "cpu", "--rank-preemption"])
    assert policy_options(args) == {"ranker": "runs/r", "device": "cpu", "starvation_steps": 50, "quantum": 8,
                                    "preempt": True}
    assert make_policy("oracle-sjf", preempt=True).preemptive and not make_policy("oracle-sjf").preemptive
    assert policy_options(build_parser().parse_args(["serve"])) == {}
    with pytest.raises(LmstackError, match="no option"):  # a flag the chosen policy does not take is an error
        make_policy("fcfs", **policy_options(build_parser().parse_args(["serve", "--quantum", "8"])))


# ----- mlfq -----
def test_mlfq_skip_join_and_demotion() -> None:
    policy = SkipJoinMLFQ(num_levels=4, base_quantum=2, prefill_tokens_per_iteration=8)
    assert policy.entry_level(8) == (0, 1)  # 1 iteration fits the top quantum (2)
    assert policy.entry_level(24) == (1, 3)  # 3 iterations skip to the queue with quantum 4
    assert policy.entry_level(1000)[0] == 3  # longer than every bounded quantum: the last queue
    sched = _sched(policy, max_num_seqs=1)
    seq = _seq(0, 40, prompt_len=8)
    sched.add([seq])
    levels = []
    for _ in range(12):
        _step(sched)
        levels.append(policy.level_of(seq))
    # level 0 (quantum 2): 1 prefill credit + 1 token; level 1 (quantum 4): 4 tokens; level 2 (quantum 8)
    assert levels == [0] + [1] * 4 + [2] * 7


def test_mlfq_new_request_preempts_demoted_one_and_starved_ones_are_promoted() -> None:
    policy = SkipJoinMLFQ(num_levels=3, base_quantum=1, prefill_tokens_per_iteration=64, starvation_steps=6)
    sched = _sched(policy, max_num_seqs=1)
    old = _seq(0, 50)
    sched.add([old])
    for _ in range(4):
        _step(sched)
    assert policy.level_of(old) == 2
    new = _seq(1, 30)
    sched.add([new])
    out = _step(sched)
    assert out.preempted == [old] and new.status is Status.RUNNING
    for _ in range(10):
        _step(sched)
        if old.status is Status.RUNNING:
            break
    assert old.status is Status.RUNNING  # promoted back to the top queue after waiting 6 steps
    assert _drain(sched) and sched.blocks.num_used == 0


# ----- through the engine -----
@pytest.fixture(scope="module")
def tiny():
    from lmstack import LLM

    return LLM("dummy:tiny-llama", device="cpu")


def _engine_outputs(tiny, policy: str, prompts: list[list[int]], lengths: list[int],
                    make_options: Callable[[], dict]) -> tuple[dict[str, list[int]], int]:
    from lmstack.engine.config import EngineConfig
    from lmstack.engine.llm_engine import LLMEngine

    engine = LLMEngine(tiny.model, tiny.tokenizer, EngineConfig(policy=policy, policy_options=make_options(),
                                                                 max_num_seqs=3, num_kv_blocks=10, block_size=4,
                                                                 max_model_len=64))
    for i, (ids, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), request_id=str(i),
                           prompt=f"p{i}")
    done: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    engine.scheduler.policy.close()
    assert engine.blocks.num_used == 0
    return done, engine.scheduler.num_preemptions


@pytest.mark.parametrize("policy", ["ltr", "mlfq", "oracle-sjf"])
def test_policies_change_the_order_not_the_tokens(tiny, policy: str) -> None:
    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + i)] for i in range(6)]
    lengths = [12, 3, 9, 2, 14, 5]
    options = {"ltr": lambda: {"ranker": TableScorer({f"p{i}": float(n) for i, n in enumerate(lengths)}),
                               "device": "cpu"}}
    expected, _ = _engine_outputs(tiny, "fcfs", prompts, lengths, dict)
    got, preemptions = _engine_outputs(tiny, policy, prompts, lengths, options.get(policy, dict))
    assert got == expected
    assert preemptions > 0  # the small pool and batch made the policy preempt, and recompute was exact


def test_ltr_serves_concurrent_streams_through_the_async_engine(tiny) -> None:
    """The server path: requests arrive on another thread while the engine steps; all finish, none is lost."""
    import asyncio

    from lmstack.engine.async_engine import AsyncEngine
    from lmstack.engine.config import EngineConfig
    from lmstack.engine.llm_engine import LLMEngine

    lengths = [9, 2, 6, 3, 12, 1]
    scorer = TableScorer({f"p{i}": float(n) for i, n in enumerate(lengths)})
    engine = LLMEngine(tiny.model, tiny.tokenizer, EngineConfig(policy="ltr", policy_options={"ranker": scorer,
                                                                "device": "cpu"}, max_num_seqs=2, num_kv_blocks=64))
    server = AsyncEngine(engine)

    async def one(i: int) -> int:
        params = SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
        last = None
        async for out in server.generate([5 + i, 6, 7, 8], params, prompt=f"p{i}"):
            last = out
        return len(last.outputs[0].token_ids)

    async def main() -> list[int]:
        got = await asyncio.gather(*(one(i) for i in range(len(lengths))))
        await server.shutdown(drain_timeout=5)
        return list(got)

    assert asyncio.run(main()) == lengths
    assert engine.blocks.num_used == 0 and sum(len(c) for c in scorer.calls) == len(lengths)
    engine.scheduler.policy.close()


def test_ltr_with_a_real_length_ranker(tmp_path) -> None:
    """A LengthRanker folder, trained for a few steps on prompts whose instruction sets the answer length, loaded
    by path as the server does: the policy serves the short-answer prompts first."""
    if importlib.util.find_spec("lmstack.ranking") is None:
        pytest.skip("lmstack.ranking (the LengthRanker) is not in this checkout yet")
    import random

    from lmstack.ranking import LengthRanker
    from lmstack.ranking.data import LengthExample
    from lmstack.ranking.training import TrainConfig
    from test_encoder import make_tiny_encoder

    styles = [("Answer in one word: yes or no.", 4), ("Explain it step by step.", 200), ("Write a long essay.", 900)]
    topics = ["cats", "dragons", "France", "code", "birds", "tea"]
    rng = random.Random(0)

    def example(i: int) -> LengthExample:
        style, base = styles[i % 3]
        return LengthExample(id=str(i), prompt=f"Tell me about {rng.choice(topics)} {i}. {style}", prompt_len=10,
                             output_len=int(base * rng.uniform(0.7, 1.3)), split="train")

    ranker = LengthRanker.create(encoder=str(make_tiny_encoder(tmp_path / "enc")), device="cpu")
    ranker.fit([example(i) for i in range(144)], [example(i) for i in range(144, 192)],
               TrainConfig(epochs=5, list_size=16, lr=1e-3, head_lr=3e-3))
    ranker.save(tmp_path / "ranker")

    policy = make_policy("ltr", ranker=str(tmp_path / "ranker"), device="cpu")
    sched = _sched(policy, max_num_seqs=1)
    seqs = [_seq(i, 2, prompt=example(1000 + i).prompt) for i in range(9)]  # styles long, short, ... interleaved
    sched.add(seqs)
    _wait_scored(policy, len(seqs))
    finished = [int(r) for r in _drain(sched)]
    policy.close()
    assert policy.stats.num_scored == 9 and policy.stats.num_failed == 0
    short_first = [i for i in finished if (1000 + i) % 3 == 0]
    assert finished[:3] == short_first, finished  # the one-word prompts go first


def test_bench_policies_writes_results_and_resumes_from_its_log(tmp_path) -> None:
    import argparse
    import json

    from lmstack.bench.policies import add_arguments, run

    data = tmp_path / "data.jsonl"
    rows = [{"id": str(i), "prompt": f"Question number {i} about the sea and the harbour", "prompt_len": 9,
             "output_len": [5, 14, 6, 9, 4, 12][i], "split": "test"} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "res.json"
    argv = ["--model", "dummy:tiny-llama", "--device", "cpu", "--data", str(data), "--policies",
            "fcfs,oracle-sjf,oracle-sjf+evict", "--num-requests", "6", "--max-num-seqs", "2", "--num-kv-blocks", "64",
            "--rate-fractions", "0.5,0.9", "--threads", "1", "--output", str(out)]
    threads = torch.get_num_threads()
    try:
        metrics = run(parser.parse_args(argv))
        again = run(parser.parse_args(argv))  # everything is in the log now: nothing runs twice
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide
    saved = json.loads(out.read_text())
    assert saved["metrics"]["capacity_req_s"] == pytest.approx(metrics["capacity_req_s"])
    assert len(saved["metrics"]["by_rate"]) == 2 and saved["command"].startswith("lmstack bench policies")
    assert set(saved["metrics"]["burst"]) == {"fcfs", "oracle-sjf", "oracle-sjf+evict"}
    assert saved["metrics"]["burst"]["fcfs"]["makespan_s"] > 0
    assert set(saved["metrics"]["evict_over_no_evict_latency"]) == {"oracle-sjf"}
    ratios = saved["metrics"]["ratios_by_rate"]
    assert [r["rate_req_s"] for r in ratios] == [r["rate_req_s"] for r in saved["metrics"]["by_rate"]]
    for row, by_rate in zip(ratios, saved["metrics"]["by_rate"], strict=True):
        expected = by_rate["fcfs"]["mean_e2e_ms"] / by_rate["oracle-sjf"]["mean_e2e_ms"]
        assert row["mean_latency_fcfs_over_oracle"] == pytest.approx(expected)
        assert row["mean_latency_fcfs_over_ltr"] is None  # ltr was not run
    top = ratios[-1]
    assert saved["metrics"]["highest_sustainable_rate_req_s"] == saved["metrics"]["headline_rate_req_s"]
    assert saved["metrics"]["mean_latency_fcfs_over_oracle"] == pytest.approx(top["mean_latency_fcfs_over_oracle"])
    log = out.with_suffix(".jsonl")
    assert len(log.read_text().splitlines()) == 9  # (burst + 2 rates) x 3 policies, one record each
    assert again["by_rate"] == metrics["by_rate"]
    assert metrics["num_processes"] == again["num_processes"] == 1  # the second call ran nothing
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(r["metrics"]["preemptions"] == 0 for r in runs if r["policy"] == "oracle-sjf")  # no memory pressure
    for bad in ("fcfs+evict", "ltr+swap", "nope"):
        with pytest.raises(LmstackError, match="unknown policies"):
            run(parser.parse_args([*argv[:7], bad, *argv[8:]]))


def test_steady_capacity_leaves_out_the_tail_of_an_all_at_once_run() -> None:
    from lmstack.bench.policy_summary import steady_capacity

    # 100 requests finishing one every 0.1 s, then a slow tail: the full-batch rate is 10 req/s, n/makespan is not.
    finish = [0.1 * (i + 1) for i in range(90)] + [9.0 + 5.0 * i for i in range(1, 11)]
    assert steady_capacity(finish) == pytest.approx(10.0, rel=0.15)
    assert 100 / max(finish) < 2.0
    assert steady_capacity([1.0, 2.0]) == pytest.approx(1.0)
