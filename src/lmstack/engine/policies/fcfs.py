"""First come, first served: the baseline every serving system starts from."""

from __future__ import annotations

from lmstack.engine.policies import Policy, register
from lmstack.engine.sequence import Sequence


@register
class FCFS(Policy):
    name = "fcfs"

    def key(self, seq: Sequence) -> tuple:
        return (seq.arrival_time, seq.seq_no)
