"""Skip-join multi-level feedback queue (FastServe, arXiv 2305.05920): least-attained-service without predictions.

Queue k has a quantum of `base_quantum * 2**k` iterations (the last queue never demotes). A new request skips
the queues whose quantum is shorter than its first iteration, the prefill, whose length in decode iterations
is estimated as prompt tokens / `prefill_tokens_per_iteration`: a long prompt starts lower, as in FastServe.
A request that has used its queue's quantum moves one queue down; requests in higher queues go first (FCFS
within a queue) and take a full batch's slots from lower ones. Against starvation, a request that has waited
`starvation_steps` steps is promoted back to the top queue with a fresh quantum.

FastServe swaps a preempted request's KV cache to host memory; this engine recomputes it, which makes every
demotion-driven preemption cost a prefill of the request's context.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.engine.policies import Policy, register
from lmstack.engine.sequence import Sequence
from lmstack.errors import LmstackError

_PRUNE_EVERY = 256  # steps between sweeps that forget finished requests


@dataclass
class _State:
    level: int
    used_at_entry: int  # output tokens the request had when it joined its level
    credit: int  # iterations charged on joining (the prefill, for the entry level)
    waited: int = 0


@register
class SkipJoinMLFQ(Policy):
    name = "mlfq"
    preemptive = True

    def __init__(self, num_levels: int = 6, base_quantum: int = 8, prefill_tokens_per_iteration: int = 512,
                 starvation_steps: int = 256) -> None:
        for label, value in (("num_levels", num_levels), ("base_quantum", base_quantum),
                             ("prefill_tokens_per_iteration", prefill_tokens_per_iteration),
                             ("starvation_steps", starvation_steps)):
            if not isinstance(value, int) or value < 1:
                raise LmstackError(f"mlfq {label} must be a positive integer, got {value!r}")
        self.num_levels = num_levels
        self.base_quantum = base_quantum
        self.prefill_tokens_per_iteration = prefill_tokens_per_iteration
        self.starvation_steps = starvation_steps
        self._states: dict[Sequence, _State] = {}

    def quantum(self, level: int) -> int:
        """Iterations a request may run in queue `level` before it is demoted."""
        return self.base_quantum * 2**level

    def entry_level(self, num_prompt_tokens: int) -> tuple[int, int]:
        """Skip-join: the highest queue whose quantum covers the prefill, and the prefill's cost in iterations."""
        prefill = -(-num_prompt_tokens // self.prefill_tokens_per_iteration)
        level = next((k for k in range(self.num_levels - 1) if self.quantum(k) >= prefill), self.num_levels - 1)
        return level, prefill

    def level_of(self, seq: Sequence) -> int:
        return self._states[seq].level

    def key(self, seq: Sequence) -> tuple:
        state = self._states.get(seq)
        level = state.level if state is not None else self.num_levels - 1
        return (level, seq.arrival_time, seq.seq_no)

    def on_arrival(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            level, prefill = self.entry_level(seq.num_prompt_tokens)
            self._states[seq] = _State(level=level, used_at_entry=seq.num_output_tokens, credit=prefill)

    def on_step(self, step: int, waiting: list[Sequence], running: list[Sequence]) -> None:
        last = self.num_levels - 1
        for seq in running:
            state = self._states[seq]
            state.waited = 0
            used = seq.num_output_tokens - state.used_at_entry + state.credit
            if state.level < last and used >= self.quantum(state.level):
                state.level, state.used_at_entry, state.credit = state.level + 1, seq.num_output_tokens, 0
        for seq in waiting:
            state = self._states[seq]
            state.waited += 1
            if state.waited >= self.starvation_steps:
                state.level, state.used_at_entry, state.credit, state.waited = 0, seq.num_output_tokens, 0, 0
        if step % _PRUNE_EVERY == 0:
            self._states = {s: st for s, st in self._states.items() if not s.is_finished}
