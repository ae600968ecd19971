"""A step's chunks as flat arrays, gathered in one pass and then indexed whole, instead of a few numpy calls per
chunk (an arange, a table lookup, a slice assignment each): staging a verify step of 32 requests with 5
proposals each for its chunk graph took 216-349 µs that way on our 2-core CPU, 154 µs this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from lmstack.engine.scheduler import ScheduledChunk


@dataclass
class StepArrays:
    tokens: np.ndarray  # [R] int64: each chunk's own tokens, then its proposals, chunk after chunk
    lengths: np.ndarray  # [n] rows of each chunk (own tokens + proposals)
    starts: np.ndarray  # [n] first position each chunk computes
    owns: np.ndarray  # [n] rows of each chunk that sample: its last own token and each proposal (0: none)
    tables: np.ndarray  # [n, width] int32 block tables, zero-padded

    @classmethod
    def of(cls, chunks: list[ScheduledChunk]) -> StepArrays:
        tokens = list(chain.from_iterable(c.seq.tokens(c.start, c.start + c.num_tokens) + c.spec_tokens
                                          for c in chunks))
        lengths = np.array([c.num_tokens + len(c.spec_tokens) for c in chunks], dtype=np.int64)
        starts = np.array([c.start for c in chunks], dtype=np.int64)
        owns = np.array([1 + len(c.spec_tokens) if c.samples else 0 for c in chunks], dtype=np.int64)
        sizes = np.array([len(c.seq.block_table) for c in chunks], dtype=np.int64)
        tables = np.zeros((len(chunks), int(sizes.max(initial=1))), dtype=np.int32)
        flat = np.fromiter(chain.from_iterable(c.seq.block_table for c in chunks), dtype=np.int32,
                           count=int(sizes.sum()))
        tables[np.repeat(np.arange(len(chunks)), sizes), _within(sizes)] = flat
        return cls(np.array(tokens, dtype=np.int64), lengths, starts, owns, tables)

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    def offsets(self) -> np.ndarray:
        """[R]: each row's index within its chunk."""
        return _within(self.lengths)

    def positions(self) -> np.ndarray:
        """[R]: each row's position in its sequence."""
        return np.repeat(self.starts, self.lengths) + self.offsets()

    def slots(self, block_size: int) -> np.ndarray:
        """[R]: each row's flat KV slot (block * block_size + offset)."""
        pos = self.positions()
        blocks = self.tables[np.repeat(np.arange(len(self.lengths)), self.lengths), pos // block_size]
        return blocks.astype(np.int64) * block_size + pos % block_size

    def picks(self, row_starts: np.ndarray) -> np.ndarray:
        """[sum(owns)]: the rows that sample, in chunk order, where chunk i's rows begin at `row_starts[i]`."""
        return np.repeat(row_starts + self.lengths - self.owns, self.owns) + _within(self.owns)


def _within(sizes: np.ndarray) -> np.ndarray:
    """[sum(sizes)]: 0..size-1 for each size, concatenated."""
    return np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
