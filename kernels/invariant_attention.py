"""Batch-invariant paged attention: one reduction order per query, whatever else is in the step.

paged.py's kernels are tuned per call shape: decode splits each sequence's keys into as many
parts as fill the GPU for the batch at hand, and prefill reduces a chunk's keys in tiles aligned
to the chunk. Either way a query's softmax is summed in an order that follows the batch size or
how its prompt was chunked, so its output bits do too. Here a query's result depends only on the
query itself, its position and the cache:

- a query at cache index p sees keys 0 .. p, cut into fixed splits of SPLIT keys (split s holds
  keys s*SPLIT .. s*SPLIT + SPLIT - 1), each reduced by an online softmax over BLOCK_N-key tiles
  from its first key (`_split_partial`), the splits then folded in order, 0, 1, 2, ... by
  `_merge` into (m, l, acc), and out = acc / l;
- decode (`decode_attention`: Q queries per sequence, Q = 1, or k + 1 when verifying drafts)
  computes the splits in parallel programs (a sequence's splits fill the GPU at batch 1) and
  folds them in a second kernel; prefill (`prefill_attention`: packed chunks after a cached
  prefix, or whole prompts) folds them inside each program. Both run the same jit functions on
  the same [BLOCK_R, BLOCK_D] tiles, so a token's output is the same bits whether it was decoded,
  verified with drafts, prefilled whole, in chunks of any size, or recomputed after preemption;
- a program's rows are (query, q head) pairs of one kv head, BLOCK_R of them whatever the call,
  so every tl.dot has the same shape; rows see their own keys only: tiles and splits a row does
  not see (run because another row of the program does) leave its state unchanged bit for bit
  (p = 0, alpha = 1; a split it saw nothing of merges with weight 0).

The cost against paged.py: decode writes one partial per split (fp32) where paged.py writes a few
per sequence, and prefill rescales once per split. benchmarks/kernel_bench.py measures both.
Arguments and results as paged.paged_decode_attention / paged_prefill_attention (their `_ref`
twins are these kernels' references too).
"""
import math

import torch
import triton
import triton.language as tl

from .paged import check_decode_args, check_prefill_args

# Keys per split: a multiple of every BLOCK_N. A 5k-token context at batch 1 gives 20 splits per
# kv head (160 programs on GLM-OCR's 8 kv heads); a 16k table 64.
SPLIT = 256
_BLOCK_R = 64  # (query, q head) rows per program: the M of every tl.dot


def tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, BLOCK_D): rows per program, keys per tile, the head dim padded to a
    power of two >= 16 (tl.dot's minimum K). 64-key tiles of 16-bit K/V up to BLOCK_D 128
    (16 KiB per K or V tile), 32 above and in fp32 (tests), which holds its tiles in registers."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 and dtype != torch.float32 else 32
    return _BLOCK_R, block_n, block_d


@triton.jit
def _rows(cu_seqlens_ptr, context_lens_ptr, seq, kv_head, row_block, max_blocks,
          GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_QUERIES: tl.constexpr,
          BLOCK_R: tl.constexpr):
    # The program's rows: r = j * GROUP + g is query j of the sequence with q head
    # kv_head * GROUP + g. -> (token [BLOCK_R] (int64: its q / out row), head [BLOCK_R],
    # valid [BLOCK_R], last [BLOCK_R]: the last cache index each row sees (-1: none),
    # hi: one past the largest).
    if NUM_QUERIES > 0:  # decode: Q queries per sequence, packed
        q_start = seq.to(tl.int64) * NUM_QUERIES
        num_q = NUM_QUERIES
    else:
        q_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        num_q = (tl.load(cu_seqlens_ptr + seq + 1) - q_start).to(tl.int32)
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    kv_len = tl.minimum(ctx, max_blocks * BLOCK_SIZE)
    r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    j = r // GROUP
    valid = j < num_q
    # query j sits at cache index ctx - num_q + j; keys past the table's end are never read
    last = tl.where(valid, tl.minimum(ctx - num_q + j, kv_len - 1), -1)
    return q_start + j, kv_head * GROUP + r % GROUP, valid, last, tl.max(last, axis=0) + 1


@triton.jit
def _split_partial(q, k_base, v_base, bt_row, last, lo, hi, qk_scale,
                   stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Online softmax (base 2) of q [BLOCK_R, BLOCK_D] over keys [lo, hi) in BLOCK_N tiles from lo;
    # row r sees keys <= last[r]. -> unnormalised (m [BLOCK_R], l [BLOCK_R], acc [BLOCK_R,
    # BLOCK_D]),
    # m = -inf, l = 0, acc = 0 for a row that saw no key.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < hi
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_block = pos % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + block[:, None] * stride_kc_block + in_block[:, None] * stride_kc_slot
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_R, BLOCK_N]
        s = tl.where(pos[None, :] <= last[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with no key so far: subtract 0 instead of -inf, so alpha = p = 0, never NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + block[:, None] * stride_vc_block + in_block[:, None] * stride_vc_slot
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _merge(m, l, acc, m_s, l_s, acc_s):
    # Fold a split's partial into the running state. Into the empty state (m = -inf) it is the
    # partial itself, exactly; a split the row saw nothing of (m_s = -inf) changes nothing.
    m_new = tl.maximum(m, m_s)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(m - m_sub)
    b = tl.exp2(m_s - m_sub)
    return m_new, l * a + l_s * b, acc * a[:, None] + acc_s * b[:, None]


@triton.jit
def _finish(l, acc):
    # [BLOCK_R, BLOCK_D] outputs: acc / l, zeros for a row that saw no key
    seen = l > 0.0
    return tl.where(seen[:, None], acc / tl.where(seen, l, 1.0)[:, None], 0.0)


# The launch arguments that follow the step (table width) are not specialized on: one compiled
# kernel for every step.
@triton.jit(do_not_specialize=["max_blocks", "stride_bt"])
def _attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    qk_scale,  # softmax scale * log2(e)
    max_blocks,
    stride_qt, stride_qh,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_bt, stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_QUERIES: tl.constexpr, GRID_SPLITS: tl.constexpr,
    SPLIT_KEYS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid (sequences * GRID_SPLITS, row blocks, Hkv) (the first axis takes up to 2^31 - 1).
    # GRID_SPLITS == 1: the program folds every split itself and writes out. Else program
    # (b * GRID_SPLITS + s, ..) writes split s's partial of its rows to part_* [T, Hq,
    # GRID_SPLITS(, BLOCK_D)], for _combine_kernel.
    seq = tl.program_id(0) // GRID_SPLITS
    split = tl.program_id(0) % GRID_SPLITS
    row_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    token, head, valid, last, hi = _rows(cu_seqlens_ptr, context_lens_ptr, seq, kv_head,
                                         row_block, max_blocks, GROUP, BLOCK_SIZE, NUM_QUERIES,
                                         BLOCK_R)
    if GRID_SPLITS > 1 and split * SPLIT_KEYS >= hi:
        return  # no row of the block sees this split: _combine_kernel will not read it
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + (token * stride_qt + head * stride_qh)[:, None] + offs_d[None, :],
                mask=io_mask, other=0.0)
    k_base = k_cache_ptr + kv_head * stride_kc_head
    v_base = v_cache_ptr + kv_head * stride_vc_head
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if GRID_SPLITS > 1:
        lo = split * SPLIT_KEYS
        m, l, acc = _split_partial(q, k_base, v_base, bt_row, last, lo,
                                   tl.minimum(lo + SPLIT_KEYS, hi), qk_scale,
                                   stride_kc_block, stride_kc_slot, stride_vc_block,
                                   stride_vc_slot, HEAD_DIM, BLOCK_SIZE, BLOCK_R, BLOCK_N,
                                   BLOCK_D, DOT_PRECISION)
        part = (token * NUM_Q_HEADS + head) * GRID_SPLITS + split
        tl.store(part_m_ptr + part, m, mask=valid)
        tl.store(part_l_ptr + part, l, mask=valid)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=valid[:, None])
    else:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for lo in range(0, hi, SPLIT_KEYS):
            m_s, l_s, acc_s = _split_partial(q, k_base, v_base, bt_row, last, lo,
                                             tl.minimum(lo + SPLIT_KEYS, hi), qk_scale,
                                             stride_kc_block, stride_kc_slot, stride_vc_block,
                                             stride_vc_slot, HEAD_DIM, BLOCK_SIZE, BLOCK_R,
                                             BLOCK_N, BLOCK_D, DOT_PRECISION)
            m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s)
        out = _finish(l, acc)
        tl.store(out_ptr + (token * stride_ot + head * stride_oh)[:, None] + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=["max_blocks"])
def _combine_kernel(
    context_lens_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, max_blocks,
    stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_QUERIES: tl.constexpr, GRID_SPLITS: tl.constexpr,
    SPLIT_KEYS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (B, row blocks, Hkv): the rows of one split program block, their splits folded in order
    tl.static_assert(NUM_QUERIES > 0)  # decode only: context_lens stands in for cu_seqlens
    seq = tl.program_id(0)
    row_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    token, head, valid, last, hi = _rows(context_lens_ptr, context_lens_ptr, seq, kv_head,
                                         row_block, max_blocks, GROUP, BLOCK_SIZE, NUM_QUERIES,
                                         BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    part = (token * NUM_Q_HEADS + head) * GRID_SPLITS
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for split in range(0, tl.cdiv(hi, SPLIT_KEYS)):
        m_s = tl.load(part_m_ptr + part + split, mask=valid, other=float("-inf"))
        l_s = tl.load(part_l_ptr + part + split, mask=valid, other=0.0)
        acc_s = tl.load(part_acc_ptr + (part + split)[:, None] * BLOCK_D + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
        m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s)
    out = _finish(l, acc)
    tl.store(out_ptr + (token * stride_ot + head * stride_oh)[:, None] + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _launch(q, k_cache, v_cache, cu_seqlens, block_tables, context_lens, num_seqs: int,
            num_queries: int, max_seqlen_q: int, grid_splits: int,
            scale: float | None) -> torch.Tensor:
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    rows, num_q_heads, _ = q.shape
    group = num_q_heads // num_kv_heads
    out = torch.empty((rows, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if rows == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    block_r, block_n, block_d = tiles(head_dim, q.dtype)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    row_blocks = triton.cdiv(max_seqlen_q * group, block_r)
    if grid_splits > 1:
        part_m = torch.empty((rows, num_q_heads, grid_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((rows, num_q_heads, grid_splits, block_d), dtype=torch.float32,
                               device=q.device)
    else:
        part_m = part_l = part_acc = out
    common = dict(NUM_Q_HEADS=num_q_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                  NUM_QUERIES=num_queries, GRID_SPLITS=grid_splits, SPLIT_KEYS=SPLIT,
                  BLOCK_R=block_r, BLOCK_D=block_d)
    # each multiply and add rounded as written (no FMA contraction): the decode and prefill
    # kernels, compiled separately, fold splits with the same roundings (and as the interpreter)
    common["enable_fp_fusion"] = False
    _attention_kernel[(num_seqs * grid_splits, row_blocks, num_kv_heads)](
        q, k_cache, v_cache, cu_seqlens, block_tables, context_lens, out, part_m, part_l, part_acc,
        scale * math.log2(math.e), block_tables.shape[1],
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_N=block_n,
        # fp32 inputs (tests, CPU) must not silently drop to tf32 on the GPU
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, **common,
    )
    if grid_splits > 1:
        _combine_kernel[(num_seqs, row_blocks, num_kv_heads)](
            context_lens, out, part_m, part_l, part_acc, block_tables.shape[1],
            out.stride(0), out.stride(1), num_warps=4, **common,
        )
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     num_queries: int = 1, scale: float | None = None,
                     splits_in_grid: bool = False) -> torch.Tensor:
    """paged.paged_decode_attention, batch-invariant: [B * Q, Hq, D]. On a GPU the splits run in
    parallel programs, as many as a full block table has (shapes only: CUDA-graph safe; a
    sequence's splits past its own context exit at once), then the fold. The interpreter (CPU)
    runs programs one after another, so there each program folds its splits itself, as prefill
    does, unless splits_in_grid (tests: both give the same bits)."""
    check_decode_args(q, k_cache, v_cache, block_tables, context_lens, num_queries)
    block_size = k_cache.shape[1]
    grid_splits = 1
    if q.device.type == "cuda" or splits_in_grid:
        grid_splits = max(1, triton.cdiv(block_tables.shape[1] * block_size, SPLIT))
    return _launch(q, k_cache, v_cache, context_lens, block_tables, context_lens,
                   q.shape[0] // num_queries, num_queries, num_queries, grid_splits, scale)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, max_seqlen_q: int,
                      scale: float | None = None) -> torch.Tensor:
    """paged.paged_prefill_attention, batch-invariant: [T, Hq, D], each row as decode_attention
    would give it for the same query and cache."""
    check_prefill_args(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens, max_seqlen_q)
    return _launch(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens,
                   cu_seqlens_q.shape[0] - 1, 0, max_seqlen_q, 1, scale)
