"""Online acceptance of proposed tokens, position by position: what SmartSpec expects a proposal to emit.

A single acceptance rate alpha treats every proposed token as accepted independently, so k proposals emit
(1 - alpha^(k+1)) / (1 - alpha) tokens. Proposers break that. An n-gram lookup that matched the start of a
quoted span keeps matching while one that matched a common word fails at once: on the `quote` workload the
first proposed token is accepted ~58% of the time, but the 2nd..5th ~80-95% of the time once the ones before
were. One alpha then overprices the first proposal and underprices the tail, and a goodput maximizer trims
long proposals that would have paid. So the chance that proposal j is accepted given 1..j-1 were (its hazard
h_j) is estimated per position, and k proposals are expected to emit 1 + sum_{n<=k} prod_{j<=n} h_j tokens;
independent acceptance (a typical draft model) is the special case of equal hazards.

- A verification of k proposals of which a were accepted tested positions 1..min(a + 1, k) and accepted
  1..a; positions past the first rejection are censored, not rejected.
- Hazards are exponentially discounted counts, kept per request and globally per *state*: the request's
  previous verification (none yet, all accepted, some rejected), since a request inside a quoted span tends
  to stay there (first-token acceptance ~0.8 after a full acceptance, ~0.45 after a rejection).
- Each estimate is shrunk toward the next coarser one (request -> state -> all positions of the state ->
  overall rate -> prior), so sparse cells (a new request, a rarely reached position) borrow from dense ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STATES = ("new", "hit", "miss")  # the request's previous verification: none, all accepted, some rejected
NEW, HIT, MISS = range(len(STATES))


def expected_tokens(survival: np.ndarray, n: int) -> float:
    """Tokens one verification of n proposals emits on average; `survival[j]` is P(proposals 1..j+1 accepted)."""
    return 1.0 + float(survival[:max(n, 0)].sum())


class Acceptance:
    """Discounted accepted / tested counts per (state, position), globally and per request (module docstring)."""

    def __init__(self, max_k: int = 8, prior: float = 0.5, global_decay: float = 0.995, request_decay: float = 0.8,
                 shrink: float = 8.0, request_shrink: float = 4.0) -> None:
        self.max_k = max_k
        self.prior, self.shrink, self.request_shrink = prior, shrink, request_shrink
        self.global_decay, self.request_decay = global_decay, request_decay
        self.accepted = np.zeros((len(STATES), max_k))
        self.tested = np.zeros((len(STATES), max_k))
        self.table = np.zeros((2, len(STATES), max_k))  # undiscounted [accepted, tested], for profiles
        # Each request's discounted [accepted, tested] counts and state, one row of dense arrays per request, so
        # a step reads and updates its whole batch with a few array operations. Row 0 stays a request without
        # history of its own (NEW, no counts): every key not seen yet reads it.
        self._row: dict[Any, int] = {}
        self._own = np.zeros((64, 2, max_k))
        self._state = np.full(64, NEW, dtype=np.int64)
        self._free = list(range(63, 0, -1))
        self.total_proposed = self.total_accepted = self.total_tested = 0
        self._hazards: np.ndarray | None = None  # `_state_hazards`, until the next observation

    @property
    def rate(self) -> float:
        """Accepted / tested tokens over every state and position (recent ones weigh most)."""
        m = self.shrink
        return (float(self.accepted.sum()) + self.prior * m) / (float(self.tested.sum()) + m)

    def hazards(self, state: int) -> np.ndarray:
        """Global P(proposal j accepted | 1..j-1 accepted) for requests in `state`, j = 1..max_k."""
        return self._state_hazards()[state]

    def _state_hazards(self) -> np.ndarray:
        """[states, max_k]: `hazards` of every state at once (kept until the counts change)."""
        if self._hazards is None:
            m = self.shrink
            pooled = (self.accepted.sum(axis=1) + m * self.rate) / (self.tested.sum(axis=1) + m)  # [states]
            self._hazards = (self.accepted + m * pooled[:, None]) / (self.tested + m)
        return self._hazards

    def survival(self, key: Any) -> np.ndarray:
        """P(proposals 1..j all accepted) for request `key`, j = 1..max_k: its own hazards shrunk to its state's."""
        return self.survivals([key])[0]

    def survivals(self, keys: list[Any]) -> np.ndarray:
        """[len(keys), max_k]: `survival` of every request at once (the controller asks for a whole batch)."""
        hazards = self._state_hazards()
        rows = self._rows(keys)
        counts = self._own[rows]  # [B, 2, max_k]
        m = self.request_shrink  # no history of its own: its state's hazards
        return np.cumprod((counts[:, 0] + m * hazards[self._state[rows]]) / (counts[:, 1] + m), axis=1)

    def states(self, keys: list[Any]) -> list[int]:
        """Each request's state: its previous verification (NEW, HIT or MISS)."""
        return self._state[self._rows(keys)].tolist()

    def _rows(self, keys: list[Any]) -> np.ndarray:
        """The requests' rows (0 for a request without history)."""
        get = self._row.get
        return np.fromiter((get(key, 0) for key in keys), dtype=np.int64, count=len(keys))

    def _add(self, key: Any) -> int:
        """A zeroed row for a new request (the arrays double when full)."""
        if not self._free:
            n = len(self._state)
            self._own = np.concatenate([self._own, np.zeros_like(self._own)])
            self._state = np.concatenate([self._state, np.full(n, NEW, dtype=np.int64)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        row = self._row[key] = self._free.pop()
        return row

    def observe(self, key: Any, proposed: int, accepted: int) -> None:
        """Request `key` proposed `proposed` tokens and the target accepted the first `accepted` of them."""
        self.observe_many([key], [proposed], [accepted])

    def observe_many(self, keys: list[Any], proposed: list[int], accepted: list[int]) -> None:
        """One step's verifications of distinct requests, as `observe` called for each in turn would count them
        (the global counts decay once per verification), in a few array operations."""
        rows = [(key, p, a) for key, p, a in zip(keys, proposed, accepted, strict=True) if p > 0]
        if not rows:
            return
        for _, p, a in rows:
            if not 0 <= a <= p <= self.max_k:
                raise ValueError(f"need 0 <= accepted ({a}) <= proposed ({p}) <= max_k ({self.max_k})")
        acc = np.array([a for _, _, a in rows])
        proposed = np.array([p for _, p, _ in rows])
        tested = np.minimum(acc + 1, proposed)
        slots = np.array([self._row.get(key) or self._add(key) for key, _, _ in rows])  # distinct requests
        states = self._state[slots]
        position = np.arange(self.max_k)[None, :]
        acc_mask, test_mask = (position < acc[:, None]).astype(np.float64), (position < tested[:, None]).astype(
            np.float64)
        self._own[slots] = self._own[slots] * self.request_decay + np.stack([acc_mask, test_mask], axis=1)
        self._state[slots] = np.where(acc == proposed, HIT, MISS)
        self._hazards = None
        m = len(rows)
        later = self.global_decay ** np.arange(m - 1, -1, -1)[:, None]  # decays after each verification
        self.accepted *= self.global_decay**m
        self.tested *= self.global_decay**m
        np.add.at(self.accepted, states, acc_mask * later)
        np.add.at(self.tested, states, test_mask * later)
        np.add.at(self.table[0], states, acc_mask)
        np.add.at(self.table[1], states, test_mask)
        self.total_proposed += sum(p for _, p, _ in rows)
        self.total_accepted += int(acc.sum())
        self.total_tested += int(tested.sum())

    def forget(self, key: Any) -> None:
        row = self._row.pop(key, None)
        if row is not None:
            self._own[row] = 0.0
            self._state[row] = NEW
            self._free.append(row)

    def to_profile(self) -> dict[str, Any]:
        """The undiscounted counts, for a profile (`load_profile` of a later run, `merge_tables`)."""
        return {"states": list(STATES), "accepted": self.table[0].tolist(), "tested": self.table[1].tolist()}

    def load_profile(self, rate: float, table: dict[str, Any] | None) -> None:
        """Warm start: `rate` becomes the prior, and a profile's counts (see `to_profile`) count as recent
        history of at most one discount window, so this run's own observations soon outweigh them."""
        self.prior = min(max(rate, 0.0), 1.0)
        self._hazards = None
        if not table or table.get("states") != list(STATES):
            return
        accepted, tested = (_fit_width(np.array(table[name], dtype=np.float64), self.max_k)
                            for name in ("accepted", "tested"))
        total = float(tested.sum())
        if total > 0:
            scale = min(1.0, 1.0 / (1.0 - self.global_decay) / total)
            self.accepted, self.tested = accepted * scale, tested * scale


def _fit_width(counts: np.ndarray, width: int) -> np.ndarray:
    """[states, positions] counts cut or zero-padded to `width` positions."""
    out = np.zeros((len(STATES), width))
    n = min(width, counts.shape[1]) if counts.ndim == 2 else 0
    out[:, :n] = counts[:, :n]
    return out


def merge_tables(tables: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Several profiles' counts (of any widths) summed; None when none has them."""
    tables = [t for t in tables if t and t.get("states") == list(STATES)]
    if not tables:
        return None
    width = max(len(t["tested"][0]) for t in tables)
    accepted = sum(_fit_width(np.array(t["accepted"], dtype=np.float64), width) for t in tables)
    tested = sum(_fit_width(np.array(t["tested"], dtype=np.float64), width) for t in tables)
    return {"states": list(STATES), "accepted": accepted.tolist(), "tested": tested.tolist()}
