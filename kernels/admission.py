"""Admission: the rows of sequences whose prefill ends in a step written into the device-resident
batch in one launch (`admit_rows`), with `admit_rows_ref` its plain-torch twin.

An admitted row gets its context length, M-RoPE delta, sampling state (top_k, seed, draws so far,
temperature, top_p, repetition penalty), draft-length default, its block table and its presence
mask: every id seen so far that the sampler can emit, i.e. below the vocabulary (GLM-Image's prompt
text lies outside its output vocabulary). The host sends one int64 row per sequence (`Column`).
The block table and most of the ids are already on the device, uploaded for the step's prefill:
a row names its chunk's table in the step's block tables and the span of the step's ids that its
chunk fed; only a chunk that starts after a cached or earlier-computed part of the sequence sends
those earlier ids (`history`).

In plain torch this is ~15 ops, one of them a memset of the whole [rows, vocabulary] presence
slice; the kernel is one program per admitted row: a few scalar stores, the table row, the
presence row cleared, a barrier, then its ids' entries set.
"""
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl


class Column(IntEnum):
    """Columns of an admitted row in `admitted` [n, len(Column)] int64."""

    CONTEXT = 0  # tokens known: the row's context length
    ROPE_DELTA = 1
    TOP_K = 2  # at most the vocabulary size (top_k beyond it keeps every token, as 0 does)
    SEED = 3
    COUNTER = 4  # tokens drawn so far (the output's length)
    DRAFT_LEN = 5  # draft-length default: -1 drafts with the MTP layer, 0 none
    TABLE = 6  # its chunk's row in the step's block tables
    IDS_START = 7  # its chunk's span of the step's ids
    IDS_LEN = 8
    HISTORY_START = 9  # the span of `history` holding its ids before the chunk
    HISTORY_LEN = 10
    TEMPERATURE = 11  # fp32 bit patterns (float32_bits): 0 is greedy
    TOP_P = 12
    PENALTY = 13


def float32_bits(values: np.ndarray) -> np.ndarray:
    """fp32 values -> their bit patterns as int64 (sign-extended int32), as `admitted` holds them."""
    return np.asarray(values, dtype=np.float32).view(np.int32).astype(np.int64)


class BatchRows(NamedTuple):
    """The device-resident batch's per-row state that admission writes, [R] or [R, X]."""

    block_tables: torch.Tensor  # [R, max_blocks] int32
    context_lens: torch.Tensor  # [R] int32
    active: torch.Tensor  # [R] bool
    rope_deltas: torch.Tensor  # [R] int64
    top_k: torch.Tensor  # [R] int64
    seeds: torch.Tensor  # [R] int64
    counters: torch.Tensor  # [R] int64
    temperature: torch.Tensor  # [R] fp32
    top_p: torch.Tensor  # [R] fp32
    penalty: torch.Tensor  # [R] fp32
    presence: torch.Tensor  # [R, V] bool
    draft_lens: torch.Tensor | None  # [R] int64, with speculative decoding


_DTYPES = dict(block_tables=torch.int32, context_lens=torch.int32, active=torch.bool, presence=torch.bool,
               temperature=torch.float32, top_p=torch.float32, penalty=torch.float32)


def _check(rows: BatchRows, first_row: int, admitted: torch.Tensor, tables: torch.Tensor, ids: torch.Tensor,
           history: torch.Tensor) -> None:
    r, device = rows.context_lens.shape[0], rows.context_lens.device
    for name, t in rows._asdict().items():
        if t is None and name == "draft_lens":
            continue
        dtype = _DTYPES.get(name, torch.int64)
        if t is None or t.shape[0] != r or t.dtype != dtype or t.device != device or not t.is_contiguous():
            got = "None" if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}"
            raise ValueError(f"rows.{name} must be a contiguous {dtype} tensor of {r} rows on {device}, got {got}")
    for name, t, dim, dtype in (("admitted", admitted, 2, torch.int64), ("tables", tables, 2, torch.int32),
                                ("ids", ids, 1, torch.int64), ("history", history, 1, torch.int64)):
        if t.dim() != dim or t.dtype != dtype or t.device != device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dim}-d {dtype} tensor on {device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if admitted.shape[1] != len(Column):
        raise ValueError(f"admitted must have {len(Column)} columns (Column), got {admitted.shape[1]}")
    if tables.shape[1] > rows.block_tables.shape[1]:
        raise ValueError(f"tables are {tables.shape[1]} blocks wide, more than the batch's {rows.block_tables.shape[1]}")
    if not 0 <= first_row <= r - admitted.shape[0]:
        raise ValueError(f"rows [{first_row}, {first_row + admitted.shape[0]}) are outside the batch's {r} rows")


@triton.jit
def _admit_rows_kernel(
    admitted_ptr, tables_ptr, ids_ptr, history_ptr,
    block_tables_ptr, context_ptr, active_ptr, deltas_ptr, top_k_ptr, seeds_ptr, counters_ptr,
    temperature_ptr, top_p_ptr, penalty_ptr, draft_lens_ptr, presence_ptr,
    first_row, stride_admitted, stride_tables, table_width, max_blocks, vocab,
    HAS_DRAFTS: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (n,): admitted row i -> batch row first_row + i (the Column indices are written out)
    i = tl.program_id(0)
    a = admitted_ptr + i * stride_admitted
    row = (first_row + i).to(tl.int64)
    tl.store(context_ptr + row, tl.load(a + 0).to(tl.int32))
    tl.store(deltas_ptr + row, tl.load(a + 1))
    tl.store(top_k_ptr + row, tl.load(a + 2))
    tl.store(seeds_ptr + row, tl.load(a + 3))
    tl.store(counters_ptr + row, tl.load(a + 4))
    if HAS_DRAFTS:
        tl.store(draft_lens_ptr + row, tl.load(a + 5))
    tl.store(temperature_ptr + row, tl.load(a + 11).to(tl.int32).to(tl.float32, bitcast=True))
    tl.store(top_p_ptr + row, tl.load(a + 12).to(tl.int32).to(tl.float32, bitcast=True))
    tl.store(penalty_ptr + row, tl.load(a + 13).to(tl.int32).to(tl.float32, bitcast=True))
    tl.store(active_ptr + row, tl.full([], 1, tl.uint8))
    cols = tl.arange(0, BLOCK)
    table = tables_ptr + tl.load(a + 6) * stride_tables
    for start in range(0, max_blocks, BLOCK):  # the chunk's table, zeros after it
        c = start + cols
        blocks = tl.load(table + c, mask=c < table_width, other=0)
        tl.store(block_tables_ptr + row * max_blocks + c, blocks, mask=c < max_blocks)
    presence = presence_ptr + row * vocab
    for start in range(0, vocab, BLOCK):
        c = start + cols
        tl.store(presence + c, tl.zeros([BLOCK], tl.uint8), mask=c < vocab)
    tl.debug_barrier()  # the row's clear lands before its ids are set (other threads set them)
    _mark_span(presence, ids_ptr + tl.load(a + 7), tl.load(a + 8), vocab, BLOCK)
    _mark_span(presence, history_ptr + tl.load(a + 9), tl.load(a + 10), vocab, BLOCK)


@triton.jit
def _mark_span(presence, ids, n, vocab, BLOCK: tl.constexpr):
    # presence[id] = 1 for the n ids at `ids` that lie in [0, vocab)
    for start in range(0, n, BLOCK):
        c = start + tl.arange(0, BLOCK)
        token = tl.load(ids + c, mask=c < n, other=-1)
        tl.store(presence + token, tl.full([BLOCK], 1, tl.uint8), mask=(c < n) & (token >= 0) & (token < vocab))


def admit_rows(rows: BatchRows, first_row: int, admitted: torch.Tensor, tables: torch.Tensor, ids: torch.Tensor,
               history: torch.Tensor) -> None:
    """Write batch rows [first_row, first_row + n) of the admitted sequences, in place.
    admitted [n, len(Column)] int64 (see Column); tables [c, W] int32: the step's block tables
    (a row's table is its TABLE row, zero-padded to max_blocks; W <= max_blocks); ids [T] int64:
    the step's prefill ids, of which each row's presence takes its IDS span, and history [H]
    int64 its HISTORY span (ids outside [0, V) are not marked). One launch, no host sync."""
    _check(rows, first_row, admitted, tables, ids, history)
    n = admitted.shape[0]
    if n == 0:
        return
    draft_lens = rows.draft_lens if rows.draft_lens is not None else rows.seeds  # never written then
    _admit_rows_kernel[(n,)](
        admitted, tables, ids, history, rows.block_tables, rows.context_lens, rows.active.view(torch.uint8),
        rows.rope_deltas, rows.top_k, rows.seeds, rows.counters, rows.temperature, rows.top_p, rows.penalty,
        draft_lens, rows.presence.view(torch.uint8), first_row, admitted.stride(0), tables.stride(0), tables.shape[1],
        rows.block_tables.shape[1], rows.presence.shape[1], HAS_DRAFTS=rows.draft_lens is not None, BLOCK=1024,
        num_warps=4,
    )


def _mark(presence: torch.Tensor, ids: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor) -> None:
    """presence [n, V] bool (a view, set in place) |= row r's ids[starts[r]: starts[r] + lens[r]]
    that lie in [0, V)."""
    n, vocab = presence.shape
    t = torch.arange(ids.shape[0], device=ids.device)
    covered = (t >= starts[:, None]) & (t < (starts + lens)[:, None]) & (ids >= 0) & (ids < vocab)  # [n, T]
    hits = torch.zeros(n, vocab + 1, dtype=torch.bool, device=presence.device)  # column V: where nothing is set
    hits.scatter_(1, torch.where(covered, ids, vocab), True)
    presence |= hits[:, :vocab]


def admit_rows_ref(rows: BatchRows, first_row: int, admitted: torch.Tensor, tables: torch.Tensor, ids: torch.Tensor,
                   history: torch.Tensor) -> None:
    """Plain-torch twin of `admit_rows` (no host sync either)."""
    _check(rows, first_row, admitted, tables, ids, history)
    r, a = slice(first_row, first_row + admitted.shape[0]), admitted
    rows.context_lens[r] = a[:, Column.CONTEXT].int()
    rows.rope_deltas[r] = a[:, Column.ROPE_DELTA]
    rows.top_k[r], rows.seeds[r], rows.counters[r] = a[:, Column.TOP_K], a[:, Column.SEED], a[:, Column.COUNTER]
    if rows.draft_lens is not None:
        rows.draft_lens[r] = a[:, Column.DRAFT_LEN]
    floats = a[:, Column.TEMPERATURE:].int().view(torch.float32)
    rows.temperature[r], rows.top_p[r], rows.penalty[r] = floats[:, 0], floats[:, 1], floats[:, 2]
    rows.active[r] = True
    width = tables.shape[1]
    rows.block_tables[r] = 0
    rows.block_tables[r, :width] = tables[a[:, Column.TABLE]]
    presence = rows.presence[r]
    presence.zero_()
    _mark(presence, ids, a[:, Column.IDS_START], a[:, Column.IDS_LEN])
    _mark(presence, history, a[:, Column.HISTORY_START], a[:, Column.HISTORY_LEN])
