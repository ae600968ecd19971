"""Continuous batching: each step picks which tokens of which requests run, under a token budget.

Running requests go first (their decode token, or the next chunk of a long prefill), in policy order;
new requests are admitted with what is left of the budget. When the KV pool runs out, the least urgent
running request is preempted: its blocks are freed and it is recomputed later from its tokens. Under a
preemptive policy a full batch also gives way to better-ranked waiting requests (`_evict_outranked`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lmstack.engine.block_manager import BlockManager
from lmstack.engine.policies import Policy
from lmstack.engine.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step (= seq.num_computed before the step)
    num_tokens: int
    spec_tokens: list[int] = field(default_factory=list)  # proposed tokens verified after the chunk's own

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so the step yields this request's next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_decode(self) -> bool:
        return all(c.num_tokens == 1 and not c.spec_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, policy: Policy, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.step_count = 0
        self.num_preemptions = 0
        # Called when a request's blocks are freed (preempted, finished, aborted): a draft model frees its own.
        self.release_hooks: list[Callable[[Sequence], None]] = []

    def add(self, seqs: list[Sequence]) -> None:
        self.policy.on_arrival(seqs)
        self.waiting.extend(seqs)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self.step_count += 1
        self.policy.on_step(self.step_count, self.waiting, self.running)
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=self.policy.key)
        self.waiting.sort(key=self.policy.key)
        evicted = self._evict_outranked(out) if self.policy.preemptive else 0
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._make_room(seq, seq.num_computed + n, scheduled, out):
                break  # `seq` itself was the least urgent and got preempted
            self.blocks.allocate(seq, seq.num_computed + n)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            scheduled.add(id(seq))
            budget -= n
            i += 1
        if len(out.preempted) == evicted:  # no memory pressure this step
            self._admit(out, budget)
        if not out.chunks and self.waiting:
            self.policy.on_idle()
        return out

    def _evict_outranked(self, out: SchedulerOutput) -> int:
        """Free batch slots for waiting requests that outrank running ones; returns how many were evicted.

        The best waiting requests take the batch's free slots first; each one after them may evict the worst
        running request that the policy lets it outrank (`Policy.outranks`), one eviction per newcomer.
        """
        free = max(0, self.max_num_seqs - len(self.running))
        victims = self.running[::-1]  # worst first
        evicted = 0
        for newcomer in self.waiting[free:]:
            if not self.policy.ready(newcomer):
                break
            victim = next((v for v in victims if self.policy.outranks(newcomer, v)), None)
            if victim is None:
                break
            victims.remove(victim)
            self._preempt(victim, out)
            evicted += 1
        if evicted:
            self.waiting.sort(key=self.policy.key)
        return evicted

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[int], out: SchedulerOutput) -> bool:
        """Preempt the least urgent unscheduled running requests until `seq` fits; False if `seq` went."""
        while not self.blocks.can_allocate(self.blocks.blocks_needed(seq, num_tokens)):
            victim = self.running[-1]
            if id(victim) in scheduled:
                raise RuntimeError("KV pool too small for the requests already scheduled this step")
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)
        out.preempted.append(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        for hook in self.release_hooks:
            hook(seq)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests in policy order (the list is sorted) while budget, slots and blocks last."""
        admitted = 0
        for seq in self.waiting:
            if budget <= 0 or len(self.running) >= self.max_num_seqs or not self.policy.ready(seq):
                break
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(self.blocks.blocks_needed(seq, seq.num_computed + n)):
                break
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
            admitted += 1
        if admitted:
            self.policy.on_admit(self.waiting[:admitted])
        del self.waiting[:admitted]

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a request (done or aborted) and return its blocks to the pool."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
