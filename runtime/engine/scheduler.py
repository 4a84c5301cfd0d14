"""Continuous batching: admit waiting requests by free KV blocks, decode all running ones.

A step is either a prefill of several new (or preempted) sequences packed into one varlen batch,
or one decode token for every running sequence. Prefill goes first, so new requests reach their
first token quickly, but never twice in a row while sequences are running: when more arrivals
wait than one step's token budget admits, each further prefill comes after a decode step, so
running streams stall for one prefill at a time (a decode step costs a few ms at most, a
page's prefill tens to hundreds).

Running sequences own the rows 0..B-1 of the device-resident batch (`running[i]` is row i), so
a decode step is always rows [0, B) and a CUDA graph for a bucket >= B covers it. A sequence that
leaves (finished, aborted, preempted, or with its last token scheduled) gives its row to the last
row's sequence; `rows` mirrors every move on the device.

Steps may overlap: the engine schedules step N+1 before it has read step N's tokens. The
scheduler therefore counts scheduled steps and cache slots (`num_pending`, `num_cached`) rather
than known tokens; with speculative decoding a decode step reserves k + 1 slots per sequence;
a sequence whose stop token is still in flight is scheduled once more and that token is dropped.
When a decode step needs more blocks than are free, in-flight results must be read first
(`NEEDS_DRAIN`); then the most recently admitted sequences are preempted: their blocks are freed
and they re-enter the waiting queue at the front, to be recomputed from their prompt and the
tokens they already produced. No request is dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class RowMirror(Protocol):
    """The device side of the batch's rows (the runner's DeviceBatch)."""

    def move_row(self, src: int, dst: int) -> None: ...

    def clear_row(self, row: int) -> None: ...


@dataclass
class ScheduledStep:
    is_prefill: bool
    seqs: list[Sequence]  # prefill: the admitted sequences; decode: every running one, in row order
    first_row: int  # row of seqs[0]
    new_blocks: list[tuple[int, int, int]] = field(default_factory=list)  # decode: (row, table index, block id)
    reserved_tokens: int = 1  # decode: cache slots reserved per sequence (k + 1 with speculation)


NEEDS_DRAIN = "needs-drain"


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, rows: RowMirror,
                 tokens_per_step: int = 1):
        self.block_manager = block_manager
        # Cache slots a decode step may write per sequence: 1, or k + 1 when verifying k speculated
        # tokens (all reserved up front; what a step did not accept is given back when it is read).
        self.tokens_per_step = tokens_per_step
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.rows = rows
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.draining: list[Sequence] = []
        self.num_preemptions = 0
        self.last_step_was_prefill = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.draining)

    def schedule(self) -> ScheduledStep | str | None:
        """-> the next step, NEEDS_DRAIN (read in-flight results, then ask again), or None."""
        for seq in reversed(self.running):  # reversed: releasing a row only moves rows already visited
            if not seq.can_schedule_more():
                self._release_row(seq)
                seq.status = SequenceStatus.DRAINING
                self.draining.append(seq)

        batch: list[Sequence] = []
        num_tokens = 0
        may_prefill = not (self.last_step_was_prefill and self.running)
        while may_prefill and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # A prompt longer than the token budget still runs, alone, rather than never.
            if batch and (seq.prefill_alone or num_tokens + seq.num_tokens > self.max_num_batched_tokens):
                break
            if not self.block_manager.can_allocate(seq.num_tokens):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            seq.row = len(self.running)
            seq.num_cached, seq.num_pending = seq.num_tokens, 1
            self.running.append(seq)
            batch.append(seq)
            num_tokens += seq.num_tokens
            if seq.prefill_alone:
                break
        if batch:
            self.last_step_was_prefill = True
            return ScheduledStep(True, batch, first_row=batch[0].row)
        if not self.running:
            return None

        while self._new_blocks_needed() > self.block_manager.num_free_blocks:
            if self.draining or any(s.num_pending for s in self.running):
                return NEEDS_DRAIN
            self._preempt(self.running[-1])
        new_blocks = []
        for row, seq in enumerate(self.running):
            block_id = self.block_manager.grow(seq, seq.num_cached + self.tokens_per_step)
            if block_id is not None:
                new_blocks.append((row, len(seq.block_table) - 1, block_id))
            seq.num_cached += self.tokens_per_step
            seq.num_pending += 1
        self.last_step_was_prefill = False
        return ScheduledStep(False, list(self.running), first_row=0, new_blocks=new_blocks,
                             reserved_tokens=self.tokens_per_step)

    def _new_blocks_needed(self) -> int:
        bm = self.block_manager
        return sum(len(s.block_table) < bm.blocks_needed(s.num_cached + self.tokens_per_step) for s in self.running)

    def _release_row(self, seq: Sequence) -> None:
        row, last = seq.row, len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.running[row] = moved
            moved.row = row
            self.rows.move_row(last, row)
        self.running.pop()
        self.rows.clear_row(last)
        seq.row = None

    def _preempt(self, seq: Sequence) -> None:
        self._requeue(seq)
        self.num_preemptions += 1

    def _requeue(self, seq: Sequence) -> None:
        """Free a running sequence's row and blocks and put it at the head of the queue; it is
        recomputed from its tokens when admitted again."""
        self._release_row(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_cached = seq.num_pending = 0
        self.waiting.appendleft(seq)

    def retry_alone(self, seqs: list[Sequence]) -> None:
        """The prefill of `seqs` (just admitted, in admission order) failed before it ran: queue
        them again at the head, in their order, each to be prefilled in a step of its own."""
        for seq in reversed(seqs):  # the last admitted holds the last row: no rows move
            self._requeue(seq)
            seq.prefill_alone = True

    def finish(self, seq: Sequence) -> None:
        """Release a sequence wherever it is (call after seq.finish()); its blocks may still be
        written by an in-flight step, which is safe: later steps run after it on the stream."""
        if seq.row is not None:
            self._release_row(seq)
            self.block_manager.free(seq)
        elif seq in self.draining:
            self.draining.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
