"""Shortest-remaining-job-first with the true output lengths: the bound a length predictor can approach.

Benchmark only. The true length reaches the policy through the request itself: benchmarks replay each
request's recorded answer length as `max_tokens` with `ignore_eos=True`, so `max_tokens` minus the tokens
generated so far is exactly the work left. (Without `ignore_eos` it is only an upper bound, and the policy is
no oracle.) With `preempt=True` a new request shorter than the longest running one's remainder takes its slot
(shortest-remaining-first); by default it waits for a free slot, like `ltr`'s default, since an evicted request
is recomputed from scratch (on Llama-3-8B shapes at 1.3x capacity it made the oracle's mean latency 1.20x worse).
"""

from __future__ import annotations

from lmstack.engine.policies import Policy, register
from lmstack.engine.sequence import Sequence


@register
class OracleSJF(Policy):
    name = "oracle-sjf"

    def __init__(self, preempt: bool = False) -> None:
        self.preemptive = preempt

    def key(self, seq: Sequence) -> tuple:
        return (seq.params.max_tokens - seq.num_output_tokens, seq.arrival_time, seq.seq_no)
