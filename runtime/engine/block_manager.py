"""Paged KV-cache bookkeeping: fixed-size blocks, each held by one sequence, per-sequence block tables."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one KV block (num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used_block_ids: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Blocks for the first num_tokens tokens of `seq` (a prefill: the prompt, or prompt +
        output when a preempted request is recomputed)."""
        assert not seq.block_table, f"request {seq.request_id} already holds blocks"
        for _ in range(self.blocks_needed(num_tokens)):
            seq.block_table.append(self._take())

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can hold num_tokens tokens (at most one more block than it has)."""
        return len(seq.block_table) >= self.blocks_needed(num_tokens) or self.num_free_blocks > 0

    def grow(self, seq: Sequence, num_tokens: int) -> int | None:
        """Make room for num_tokens tokens; -> the new block id if one was added."""
        if len(seq.block_table) >= self.blocks_needed(num_tokens):
            return None
        block_id = self._take()
        seq.block_table.append(block_id)
        return block_id

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            assert block_id in self.used_block_ids, f"request {seq.request_id} frees block {block_id}, which is free"
            self.used_block_ids.remove(block_id)
            self.free_block_ids.append(block_id)
        seq.block_table = []

    def _take(self) -> int:
        block_id = self.free_block_ids.popleft()
        self.used_block_ids.add(block_id)
        return block_id
