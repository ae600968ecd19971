"""Static priorities: smaller `priority` value first, then arrival order."""

from __future__ import annotations

from lmstack.engine.policies import Policy, register
from lmstack.engine.sequence import Sequence


@register
class PriorityPolicy(Policy):
    name = "priority"

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority, seq.arrival_time, seq.seq_no)
