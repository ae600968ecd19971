"""Scheduling policies: the order in which waiting and running requests are served and preempted.

A policy is one class with `key(seq)` (smaller = served first, preempted last) registered in POLICIES.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any

from lmstack.engine.sequence import Sequence
from lmstack.errors import LmstackError


class Policy(ABC):
    """Base policy; hooks let a policy score requests on arrival or re-rank them every step.

    A `preemptive` policy keeps the running batch made of its best-ranked requests: when the batch is full, a
    waiting request that ranks above a running one takes its place (the running one is recomputed later).
    """

    name = "base"
    preemptive = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise LmstackError(f"policy {self.name!r} takes no options, got {sorted(options)}")

    @abstractmethod
    def key(self, seq: Sequence) -> tuple:
        """Sort key of a request: the smallest is served first and preempted last."""

    def on_arrival(self, seqs: list[Sequence]) -> None:
        """Called once with newly added requests (e.g. to score them in one batch)."""

    def on_step(self, step: int, waiting: list[Sequence], running: list[Sequence]) -> None:
        """Called at the start of every scheduling step."""

    def on_admit(self, seqs: list[Sequence]) -> None:
        """Called with the waiting requests a step admits to the batch (never empty), in admission order."""

    def outranks(self, newcomer: Sequence, running: Sequence) -> bool:
        """Whether a waiting request may evict a running one from a full batch (preemptive policies only)."""
        return self.key(newcomer) < self.key(running)

    def ready(self, seq: Sequence) -> bool:
        """Whether a waiting request may be admitted now; a request that is not must sort after all that are."""
        return True

    def on_idle(self) -> None:
        """Called when a step has nothing to run although requests wait (not ready); may block briefly."""

    def close(self) -> None:
        """Release what the policy holds (threads, models); the policy is not used afterwards."""


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, **options: Any) -> Policy:
    if name not in POLICIES:
        raise LmstackError(f"unknown scheduling policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = sorted(set(params) - {"self"})
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise LmstackError(f"policy {name!r} has no option(s) {', '.join(unknown)}; "
                               f"it takes {', '.join(accepted)}")
    return cls(**options)


# Importing the modules registers the built-in policies.
from lmstack.engine.policies import fcfs, ltr, mlfq, oracle_sjf, priority  # noqa: E402,F401
