"""The KV block pool: a free list of fixed-size blocks and each sequence's block table.

Block 0 is never handed out: padded rows of a captured CUDA graph write their K/V there.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class HasBlocks(Protocol):
    """Anything with a block table: a request, or a draft model's view of one (speculative decoding)."""

    block_table: list[int]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks (one is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    def blocks_needed(self, seq: HasBlocks, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens in total."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free)

    def allocate(self, seq: HasBlocks, num_tokens: int) -> None:
        """Grow `seq`'s block table to cover `num_tokens` tokens; the caller checked there is room."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self.free.popleft())

    def truncate(self, seq: HasBlocks, num_tokens: int) -> None:
        """Shrink `seq`'s block table to what `num_tokens` tokens need (rejected speculative tokens' blocks)."""
        keep = -(-num_tokens // self.block_size)
        if keep < len(seq.block_table):
            self.free.extend(seq.block_table[keep:])
            del seq.block_table[keep:]

    def release(self, seq: HasBlocks) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
