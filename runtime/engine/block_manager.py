"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, per-sequence block tables."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one KV block (num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of `seq` (prefill of the prompt, or of prompt + output after preemption)."""
        assert not seq.block_table, f"request {seq.request_id} already holds blocks"
        for _ in range(self.blocks_needed(seq.num_tokens)):
            seq.block_table.append(self._take())

    def can_append(self, seq: Sequence) -> bool:
        """Whether the token at index num_tokens-1 (about to be decoded) has a slot."""
        return len(seq.block_table) >= self.blocks_needed(seq.num_tokens) or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take())

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []

    def _take(self) -> int:
        block_id = self.free_block_ids.popleft()
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id
