"""Paged KV-cache bookkeeping: fixed-size blocks, each held by one sequence, per-sequence block tables."""
from __future__ import annotations

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one KV block (num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: a prefill takes its blocks from the top in one slice, and a freed block is the
        # next one reused (its lines may still be in the device's L2).
        self.free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))
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
        n, free = self.blocks_needed(num_tokens), self.free_block_ids
        if n > len(free):
            raise RuntimeError(f"request {seq.request_id} needs {n} KV blocks, {len(free)} are free")
        taken = free[len(free) - n:]
        del free[len(free) - n:]
        taken.reverse()  # ascending on a fresh cache
        self.used_block_ids.update(taken)
        seq.block_table = taken

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can hold num_tokens tokens (at most one more block than it has)."""
        return len(seq.block_table) >= self.blocks_needed(num_tokens) or self.num_free_blocks > 0

    def grow(self, seq: Sequence, num_tokens: int) -> int | None:
        """Make room for num_tokens tokens; -> the new block id if one was added."""
        if len(seq.block_table) >= self.blocks_needed(num_tokens):
            return None
        block_id = self.free_block_ids.pop()
        self.used_block_ids.add(block_id)
        seq.block_table.append(block_id)
        return block_id

    def free(self, seq: Sequence) -> None:
        table, used = seq.block_table, self.used_block_ids
        if not used.issuperset(table):
            block_id = next(b for b in table if b not in used)
            raise AssertionError(f"request {seq.request_id} frees block {block_id}, which is free")
        used.difference_update(table)
        self.free_block_ids.extend(reversed(table))  # its first block is reused first
        seq.block_table = []
