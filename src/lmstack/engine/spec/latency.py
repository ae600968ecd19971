"""SmartSpec's step-time model: what a step is made of (`StepShape`), the features a step is measured by, the
non-negative least-squares fit, and the windows of measured steps it is fitted from. Why these features: the
"Step time" part of `controller`'s docstring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FEATURES = ("intercept", "batched_tokens", "kv_tokens", "draft_forwards", "draft_tokens", "mixed", "mixed_seqs",
            "eager")


@dataclass
class StepShape:
    """What a step is made of before speculation: the controller adds each candidate k on top of it.

    `caps[i]` is the most tokens decode request i may propose (remaining output budget, context window, and
    for a free proposer the tokens it found); `keys[i]` identifies it for its acceptance rate. Chunks that
    sample but do not decode (the last prefill chunk of a prompt) emit one token whatever k is.
    `num_chunks` counts every chunk of the step (default: the decodes); `mixed` says that one of them
    already has more than one token (a prefill chunk), so the step is mixed whatever k is. A step of
    decodes whose longest chunk (1 + proposals) is at most `graph_len` replays the chunk graph of batch
    `graph_batch` (0: none), which computes every row at the longest chunk's length. `graphs` says that the
    device replays decode and chunk graphs but no token graphs, so a step that is neither (mixed, or proposing
    beyond the chunk graphs) is eager; a plain decode step is taken to replay its graph (and with token graphs
    every step is, up to their size). `lags[i]` is how
    many tokens a draft model must catch up on for request i before its first proposal, beyond the one it
    always feeds (default: none), and `remaining[i]` the most tokens request i may still emit (default: its
    lag is charged in full).
    """

    batched_tokens: int
    kv_tokens: int
    num_other_samples: int
    keys: list[Any]
    caps: list[int]
    num_chunks: int | None = None
    mixed: bool = False
    lags: list[int] | None = None
    remaining: list[int] | None = None
    graph_batch: int = 0
    graph_len: int = 0
    graphs: bool = False
    alone: StepShape | None = None  # a mixed step's decodes as a pure step of their own

    def __post_init__(self) -> None:
        if self.num_chunks is None:
            self.num_chunks = len(self.caps)

    def padded(self, longest: int) -> tuple[int, int] | None:
        """(batched, KV tokens) of the step when its longest proposal is `longest` and it replays a chunk
        graph: `graph_batch` rows of longest + 1 tokens each, whatever the others propose; None: run as is."""
        q = longest + 1
        if not self.graph_batch or longest == 0 or q > self.graph_len:
            return None
        return padded_tokens(self.batched_tokens, self.kv_tokens, self.graph_batch, q)


def padded_tokens(batched_tokens: int, kv_tokens: int, graph_batch: int, q: int) -> tuple[int, int]:
    """(batched, KV tokens) that a chunk graph of `graph_batch` rows of q tokens computes for a step of these
    tokens: every chunk padded to q tokens (its KV too), and padding rows of q tokens."""
    pad = graph_batch * q - batched_tokens
    return batched_tokens + pad, kv_tokens + pad


def step_features(batched_tokens: int, kv_tokens: int, draft_forwards: int, draft_tokens: int,
                  mixed_seqs: int = 0, eager: bool = False) -> np.ndarray:
    """The latency model's inputs; `mixed_seqs` is the number of chunks of a mixed step (0: a pure decode),
    `eager` that the step ran without a graph on a device that replays them."""
    return np.array([1.0, batched_tokens, kv_tokens, draft_forwards, draft_tokens, float(mixed_seqs > 0),
                     mixed_seqs, float(eager)], dtype=np.float64)


def fit_nonnegative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||(x c - y) / y|| over c >= 0, by Lawson-Hanson's active set on the normal equations.

    Relative error, so that cheap decode steps are fitted as well as long prefills; non-negative, since no
    extra token makes a step faster. The active set works on the column-scaled problem's normal equations
    (one row per feature), so a refit costs the same for 30 samples or 3,000 and a few small solves (it runs on the host
    between a step's launch and its results, where a small model's whole step takes about a millisecond).
    """
    used = np.flatnonzero(np.any(x != 0, axis=0))  # a feature that is always 0 (no draft model) gets 0
    if len(used) < x.shape[1]:
        out = np.zeros(x.shape[1])
        out[used] = fit_nonnegative(x[:, used], y)
        return out
    w = 1.0 / np.maximum(y, 1e-9)
    xw, yw = x * w[:, None], y * w
    scale = np.linalg.norm(xw, axis=0)
    scale[scale == 0] = 1.0
    xs = xw / scale
    return nnls_normal(xs.T @ xs, xs.T @ yw) / scale


def nnls_normal(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """argmin c' G c - 2 r' c over c >= 0 (least squares given as its normal equations G = A'A, r = A'b).

    Lawson-Hanson: free the variable whose gradient most wants to grow, solve on the free set, and step back
    to the boundary whenever that solution leaves c >= 0. A tiny ridge keeps the solves defined where two
    features moved together (a singular G): they then share the weight.
    """
    n = len(rhs)
    tol = 1e-10 * max(1.0, float(np.abs(rhs).max(initial=0.0)))
    c, free = np.zeros(n), np.zeros(n, dtype=bool)
    ridge = 1e-10 * max(1.0, float(np.trace(gram)) / max(n, 1)) * np.eye(n)  # features that moved together
    for _ in range(3 * n):
        grad = np.where(free, -np.inf, rhs - gram @ c)
        j = int(np.argmax(grad))
        if grad[j] <= tol:
            break
        free[j] = True
        while True:
            idx = np.flatnonzero(free)
            s = np.zeros(n)
            s[idx] = np.linalg.solve(gram[idx][:, idx] + ridge[: len(idx), : len(idx)], rhs[idx])
            if (s[idx] > tol).all():
                c = s
                break
            out = idx[s[idx] <= tol]
            alpha = float(np.min(c[out] / np.maximum(c[out] - s[out], 1e-300)))
            c = c + alpha * (s - c)
            free &= c > tol
            c[~free] = 0.0
            if not free.any():
                break
    return c


def size_bucket(num_decodes: int) -> int:
    """Decode batch sizes grouped by powers of two: 0 (no decode), 1, 2-3, 4-7, 8-15, ..."""
    return num_decodes.bit_length()


class SampleWindow:
    """The latest `size` steps of one (k, size bucket) group in a ring of arrays: a refit reads every group's
    rows as they lie, without stacking hundreds of per-step arrays."""

    def __init__(self, size: int) -> None:
        self.decodes = np.zeros(size, dtype=np.int64)
        self.features = np.zeros((size, len(FEATURES)))
        self.seconds = np.zeros(size)
        self.added = 0  # steps ever appended

    def __len__(self) -> int:
        return min(self.added, len(self.seconds))

    def append(self, num_decodes: int, features: np.ndarray, seconds: float) -> None:
        i = self.added % len(self.seconds)
        self.decodes[i], self.features[i], self.seconds[i] = num_decodes, features, seconds
        self.added += 1

    def rows(self) -> list[tuple[int, np.ndarray, float]]:
        """(decode requests, features, seconds) of every kept step, oldest first."""
        n, size = len(self), len(self.seconds)
        return [(int(self.decodes[i]), self.features[i], float(self.seconds[i]))
                for i in (np.arange(n) + self.added - n) % size]


def group_medians(codes: np.ndarray, values: np.ndarray) -> tuple[list[int], list[float], list[int]]:
    """The distinct codes, and the median and count of the values of each, in one sort."""
    order = np.lexsort((values, codes))
    codes, values = codes[order], values[order]
    groups, starts, counts = np.unique(codes, return_index=True, return_counts=True)
    medians = (values[starts + (counts - 1) // 2] + values[starts + counts // 2]) / 2
    return groups.tolist(), medians.tolist(), counts.tolist()
