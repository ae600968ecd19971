"""Scheduling policies: the order in which waiting and running requests are served and preempted.

A policy is one class with `key(seq)` (smaller = served first, preempted last) registered in POLICIES.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from lmstack.engine.sequence import Sequence
from lmstack.errors import LmstackError


class Policy(ABC):
    """Base policy; hooks let a policy score requests on arrival or re-rank them every step."""

    name = "base"

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


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, **options: Any) -> Policy:
    if name not in POLICIES:
        raise LmstackError(f"unknown scheduling policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**options)


from lmstack.engine.policies import fcfs, priority  # noqa: E402,F401  (registers the built-in policies)
