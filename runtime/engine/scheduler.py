"""Continuous batching: admit waiting requests by free KV blocks, decode all running ones.

A step decodes one token for every running sequence and/or runs prefill work: chunks of the
prompts of admitted sequences (a preempted one recomputes its prompt and the tokens it already
produced). One token budget per step (`max_num_batched_tokens`) covers the decode tokens, the
chunks' tokens and the vision patches of images first encoded in the step; the first chunk of a
step always runs, so a prompt (or an image) larger than the budget still makes progress.

With chunked prefill (the engine's default) a step is *mixed*: every running sequence decodes
and the rest of the budget goes to prefill chunks, so a page entering costs the running streams
one step's budget at a time instead of freezing them for its whole prefill. A sequence whose
prompt is not yet wholly computed is PREFILLING: it holds all its KV blocks but no row; the step
with its last chunk samples its first token and gives it a row; structured-output rows are rows
like any other (the engine fills their masks between the step's forward and its sampling).
Without chunked prefill (speculative decoding, whose MTP layer prefills whole prompts), prefill
and decode steps alternate: prefill goes first, so new requests reach their first token quickly, but never twice
in a row while sequences are running, so running streams stall for one prefill at a time.

Running sequences own the rows 0..B-1 of the device-resident batch (`running[i]` is row i), so
a decode step is always rows [0, B) and a CUDA graph for a bucket >= B covers it; a step's
sampled rows are its decode rows, then its last chunks' sequences, which take the rows after
them. A sequence that leaves (finished, aborted, preempted, or with its last token scheduled)
gives its row to the last row's sequence; `rows` mirrors every move on the device.

Steps may overlap: the engine schedules step N+1 before it has read step N's tokens. The
scheduler therefore counts scheduled steps and cache slots (`num_pending`, `num_reserved`) rather
than known tokens; with speculative decoding a decode step reserves k + 1 slots per sequence;
a sequence whose stop token is still in flight is scheduled once more and that token is dropped.
When a decode step needs more blocks than are free, prefilling sequences are preempted first
(latest first; they have no token in flight), then in-flight results must be read
(`NEEDS_DRAIN`) and the most recently admitted running sequences are preempted: their blocks are
freed and they re-enter the waiting queue at the front, to be recomputed from their prompt and
the tokens they already produced. No request is dropped.

A step that fails without a culprit is retried without its suspects mixed together: they are
requeued in two isolation groups that run one after the other (`isolate`), so a poisoned row is
narrowed down by bisection and fails alone.
"""
from __future__ import annotations

import functools
import itertools
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
class PrefillChunk:
    """Prompt tokens [start, end) of a sequence (cache indices); the chunk that ends at the
    sequence's last known token samples its first (next) token."""

    seq: Sequence
    start: int
    end: int
    samples: bool


@dataclass
class ScheduledStep:
    decode: list[Sequence]  # running rows 0..len-1 in row order, one decode token each (k + 1 reserved with speculation)
    chunks: list[PrefillChunk]
    first_row: int  # row of the first sequence the chunks sample
    new_blocks: list[tuple[int, int, int]] = field(default_factory=list)  # decode: (row, table index, block id)
    reserved_tokens: int = 1  # decode: cache slots reserved per sequence (k + 1 with speculation)

    @property
    def is_prefill(self) -> bool:
        """Prefill only: no decode row."""
        return not self.decode

    @functools.cached_property
    def seqs(self) -> list[Sequence]:
        """The sequences the step samples, in row order: the decode rows, then the last chunks'."""
        return self.decode + [c.seq for c in self.chunks if c.samples]

    @property
    def prefill_seqs(self) -> list[Sequence]:
        return [c.seq for c in self.chunks]


NEEDS_DRAIN = "needs-drain"


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, rows: RowMirror,
                 tokens_per_step: int = 1, chunked_prefill: bool = False):
        self.block_manager = block_manager
        # Cache slots a decode step may write per sequence: 1, or k + 1 when verifying k speculated
        # tokens (all reserved up front; what a step did not accept is given back when it is read).
        self.tokens_per_step = tokens_per_step
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.rows = rows
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, prompt partly computed, in admission order
        self.running: list[Sequence] = []
        self.draining: list[Sequence] = []
        self.num_preemptions = 0
        self.last_step_was_prefill = False
        self._group_ids = itertools.count()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.draining)

    def schedule(self) -> ScheduledStep | str | None:
        """-> the next step, NEEDS_DRAIN (read in-flight results, then ask again), or None."""
        for seq in reversed(self.running):  # reversed: releasing a row only moves rows already visited
            if not seq.can_schedule_more():
                self._release_row(seq)
                seq.status = SequenceStatus.DRAINING
                self.draining.append(seq)

        budget = self.max_num_batched_tokens
        if self.running and self.chunked_prefill:
            decode = self._schedule_decode()
            if decode == NEEDS_DRAIN:
                return NEEDS_DRAIN
            seqs, new_blocks = decode
            self.last_step_was_prefill = False
            first_row = len(self.running)
            return ScheduledStep(seqs, self._schedule_chunks(budget - len(seqs) * self.tokens_per_step), first_row,
                                 new_blocks, self.tokens_per_step)
        if not (self.last_step_was_prefill and self.running):
            first_row = len(self.running)
            chunks = self._schedule_chunks(budget)
            if chunks:
                self.last_step_was_prefill = True
                return ScheduledStep([], chunks, first_row)
        if not self.running:
            return None
        decode = self._schedule_decode()
        if decode == NEEDS_DRAIN:
            return NEEDS_DRAIN
        self.last_step_was_prefill = False
        seqs, new_blocks = decode
        return ScheduledStep(seqs, [], 0, new_blocks, self.tokens_per_step)

    def _schedule_decode(self) -> tuple[list[Sequence], list[tuple[int, int, int]]] | str:
        """Reserve the next decode token(s) of every running sequence -> (them in row order, new
        blocks), preempting as needed, or NEEDS_DRAIN."""
        # Each row needs at most one new block: only a shortfall that large is counted.
        while len(self.running) > self.block_manager.num_free_blocks and \
                self._new_blocks_needed() > self.block_manager.num_free_blocks:
            if self.prefilling:
                self._preempt(self.prefilling[-1])
                continue
            if self.draining or any(s.num_pending for s in self.running):
                return NEEDS_DRAIN
            self._preempt(self.running[-1])
        new_blocks, step, block_size = [], self.tokens_per_step, self.block_manager.block_size
        for row, seq in enumerate(self.running):
            seq.num_reserved += step
            if seq.num_reserved > len(seq.block_table) * block_size:  # it crosses into a new block
                new_blocks.append((row, len(seq.block_table), self.block_manager.grow(seq, seq.num_reserved)))
            seq.num_pending += 1
        return list(self.running), new_blocks

    def _schedule_chunks(self, budget: int) -> list[PrefillChunk]:
        """Prefill work for `budget` tokens: the prefilling sequences' next chunks, then newly
        admitted ones (first come, first served: a sequence that does not fit stops the rest)."""
        chunks: list[PrefillChunk] = []
        for seq in list(self.prefilling):
            cost = self._chunk_cost(chunks, seq, budget)
            if cost is None:
                return chunks
            budget = self._add_chunk(chunks, seq, cost, budget)
            if budget is None:
                return chunks
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq.num_tokens) or not self._may_join(seq):
                break
            cost = self._chunk_cost(chunks, seq, budget)
            if cost is None:
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, seq.num_tokens)
            seq.status = SequenceStatus.PREFILLING
            seq.num_reserved, seq.num_pending = 0, 0
            self.prefilling.append(seq)
            budget = self._add_chunk(chunks, seq, cost, budget)
            if budget is None:
                break
        return chunks

    def _chunk_cost(self, chunks: list[PrefillChunk], seq: Sequence, budget: int) -> tuple[int, int] | None:
        """-> (tokens, vision patches) of seq's next chunk within `budget`, or None if it must wait.
        Without chunked prefill a chunk is the whole rest of the prompt."""
        remaining = seq.num_tokens - seq.num_reserved
        vision = seq.num_unencoded_patches
        if not chunks:  # the first chunk of a step always runs
            return (min(remaining, max(budget, 1)) if self.chunked_prefill else remaining), vision
        if seq.prefill_alone or chunks[0].seq.prefill_alone:
            return None
        room = budget - vision
        if room < (1 if self.chunked_prefill else remaining):
            return None
        return min(remaining, room), vision

    def _add_chunk(self, chunks: list[PrefillChunk], seq: Sequence, cost: tuple[int, int], budget: int) -> int | None:
        """Append seq's next chunk of `cost` (_chunk_cost) -> the budget left, or None when the
        step is full (a sequence that prefills alone ends it)."""
        tokens, vision = cost
        start = seq.num_reserved
        seq.num_reserved += tokens
        samples = seq.num_reserved == seq.num_tokens
        chunks.append(PrefillChunk(seq, start, seq.num_reserved, samples))
        if samples:  # its last chunk: it takes the next row and samples its first token
            self.prefilling.remove(seq)
            seq.status = SequenceStatus.RUNNING
            seq.row = len(self.running)
            seq.num_pending = 1
            self.running.append(seq)
        budget -= tokens + vision
        return None if seq.prefill_alone or budget <= 0 else budget

    def _may_join(self, seq: Sequence) -> bool:
        """Whether seq may be admitted beside the admitted sequences: only within its isolation
        group (see isolate); a group waiting at the head of the queue holds back the rest. The
        admitted sequences all share one group (each was admitted against all of them), so one
        of them stands for all."""
        admitted = self.running or self.prefilling
        return not admitted or admitted[0].isolation_group == seq.isolation_group

    def _new_blocks_needed(self) -> int:
        """Blocks the running sequences' next decode tokens need (at most one each: see _schedule_decode)."""
        reach, block_size = self.tokens_per_step, self.block_manager.block_size
        return sum(s.num_reserved + reach > len(s.block_table) * block_size for s in self.running)

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
        """Free a running or prefilling sequence's row and blocks and put it at the head of the
        queue; it is recomputed from its tokens when admitted again."""
        if seq.row is not None:
            self._release_row(seq)
        else:
            self.prefilling.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_reserved = seq.num_pending = 0
        self.waiting.appendleft(seq)

    def retry_alone(self, seqs: list[Sequence]) -> None:
        """The prefill of `seqs` (a step's prefill sequences, in admission order) failed before it
        ran: queue them again at the head, in their order, each to be prefilled in steps of its own."""
        for seq in reversed(seqs):  # the last admitted holds the last row: no rows move
            self._requeue(seq)
            seq.prefill_alone = True

    def isolate(self, seqs: list[Sequence]) -> None:
        """A step shared by `seqs` (at least two, none with a step in flight) failed and no one of
        them can be blamed: queue them again at the head, to be recomputed from their tokens, split
        into two isolation groups that run one after the other. A row that breaks every step it is
        in is thus found in log2(len(seqs)) failures and fails alone; the others give their solo
        output."""
        half = (len(seqs) + 1) // 2
        groups = (next(self._group_ids), next(self._group_ids))
        for i, seq in reversed(list(enumerate(seqs))):
            self._requeue(seq)
            seq.isolation_group = groups[i >= half]

    def finish(self, seq: Sequence) -> None:
        """Release a sequence wherever it is (call after seq.finish()); its blocks may still be
        written by an in-flight step, which is safe: later steps run after it on the stream."""
        if seq.row is not None:
            self._release_row(seq)
            self.block_manager.free(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.draining:
            self.draining.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
