"""Paged KV cache: split-KV decode attention (flash-decoding), chunked-prefill attention, and the
cache write's argument check and reference (the write itself is the epilogue of rope.py's
`mrope_write_kv_`, fused with the M-RoPE that precedes it in every decoder layer).

Cache layout (vLLM / nano-vllm "flash" layout), one tensor per layer for K and one for V:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], last dim contiguous.
A slot is `block_id * block_size + offset_in_block`; `slot_mapping[t]` is where token t goes, -1
means "no slot" (padding rows of a CUDA-graph batch) and is skipped.
`block_tables[b, i]` is the block holding tokens [i*block_size, (i+1)*block_size) of sequence b;
`context_lens[b]` is how many of them are valid (0 is allowed and yields a zero output row).

Decode attention also serves Q = num_queries new tokens per sequence at once (speculative-decoding
verification: the k+1 tokens of a draft, causal among themselves): q holds B * Q rows, sequence b's
at b*Q .. b*Q+Q-1, all Q already in the cache, and context_lens[b] counts the last one's context.
Query j then sees the first context_lens[b] - (Q-1-j) tokens (none: a zero row). The Q * GROUP
rows of one kv head share the MMA's M dimension that a single query pads to 16 anyway, so each
K/V tile is still read once per (sequence, kv head) and Q=1 runs exactly the single-query kernel.

Prefill attention serves the new tokens ("chunk") of several sequences packed as in varlen
attention, each after a prefix already in the cache (chunked prefill, or a prompt whose first
blocks are shared): q holds T rows, sequence i's n_i at cu_seqlens_q[i] .. cu_seqlens_q[i+1]-1,
all n_i already written at cache indices context_lens[i] - n_i .. context_lens[i] - 1, and query j
attends causally to cache tokens 0 .. context_lens[i] - n_i + j through block_tables[i].

No launcher reads a device tensor: grids and intermediates depend on shapes only (and on
max_seqlen_q, a host int, for prefill), so every call is safe to capture in a CUDA graph and
replay with new slot mappings / tables / lengths.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import check_head_dim

# Decode tile: 64 tokens x 128 dims x 2 B = 16 KiB per K (and V) tile, whole cache blocks for
# block_size <= 64; K/V rows are copied as 16-byte vectors. Head dims padded past 128 take
# 32-token tiles of the same 16 KiB: with 64 tokens ptxas needs 253-255 registers and 140 KiB of
# shared memory (one program per SM), with 32 it needs ~110 and 74 KiB, as at D 128.
_BLOCK_N = 64
# All q heads of one kv group go through tl.dot together, padded to 16 rows (mma's minimum M).
# With GLM-OCR's group of 2, 7/8 of the MMA rows are wasted, but that is free: the padded dots
# need 16 flop per byte of K/V, Hopper's tensor cores do ~200 per byte of HBM bandwidth. What the
# dot path buys is that Triton's pipeliner turns the K/V loads feeding it into cp.async copies
# through shared memory issued ahead of use (see test_decode_kernel_is_pipelined_on_sm90).
_MIN_DOT_M = 16
# The block-table load is itself a pipeline stage (the K/V addresses depend on it), so it takes 5
# stages to get two K/V buffers: tile i+1 (and soon i+2) is in flight while tile i is consumed,
# 32-64 KiB per program. 3 stages gives a single buffer, filled only after the previous tile is
# used. Triton 3.6 and 3.7 (ptxas, sm_90): 122-124 registers with 4 warps and ~72 KiB of shared
# memory, so 3 programs fit on an SM (shared memory bound).
_DECODE_WARPS = 4
_DECODE_STAGES = 5
_PROGRAMS_PER_SM = 3
_MAX_SPLITS = 64


# ----------------------------------------------------------------------------- cache write


def _check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    _check_last_dim_contiguous("k_cache", k_cache)
    _check_last_dim_contiguous("v_cache", v_cache)


def check_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """The arguments of a cache write: k, v [T, Hkv, D] with contiguous D, caches [num_blocks,
    block_size, Hkv, D], slot_mapping [T] int32/int64."""
    _check_cache(k_cache, v_cache)
    _, _, num_heads, head_dim = k_cache.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (num_heads, head_dim):
            raise ValueError(f"{name} must be [T, {num_heads}, {head_dim}], got {tuple(t.shape)}")
        _check_last_dim_contiguous(name, t)
    if v.shape[0] != k.shape[0] or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} and v {tuple(v.shape)} must "
                         f"have k's {k.shape[0]} tokens")
    if slot_mapping.dtype not in (torch.int32, torch.int64) or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be a contiguous int32 or int64 tensor, got "
                         f"{slot_mapping.dtype} strides {slot_mapping.stride()}")


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache write in plain torch (the write of `rope.mrope_write_kv_ref`): k, v [T, Hkv, D]
    index_put at slot_mapping into clones of the caches, rows with slot -1 dropped; returns the
    new (k_cache, v_cache)."""
    num_blocks, block_size, num_heads, head_dim = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_out = k_cache.clone().view(num_blocks * block_size, num_heads, head_dim)
    v_out = v_cache.clone().view(num_blocks * block_size, num_heads, head_dim)
    k_out.index_put_((slots,), k[keep].to(k_cache.dtype))
    v_out.index_put_((slots,), v[keep].to(v_cache.dtype))
    return k_out.view_as(k_cache), v_out.view_as(v_cache)


# ----------------------------------------------------------------------------- decode attention


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    max_blocks,
    stride_qb, stride_qh,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_bt,
    stride_ob, stride_oh,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_QUERIES: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid (Hkv, NUM_SPLITS, B). Split s of sequence b covers its own context, cut into BLOCK_N
    # tiles and shared out evenly, so the work follows context_lens (read here, on the device)
    # while the grid follows shapes only. A split with no tile leaves lse = -inf, out = 0.
    # kv heads vary fastest so that programs launched together read neighbouring 256-byte head
    # rows of the same cache blocks (same DRAM pages).
    # With NUM_QUERIES > 1 the MMA rows hold NUM_QUERIES * GROUP (query, q head) pairs: row r is
    # query r // GROUP (q row b * NUM_QUERIES + r // GROUP) of head kv_head * GROUP + r % GROUP.
    # The tiles follow the last query's context, the longest; each row masks its own length.
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)

    seq_len = tl.load(context_lens_ptr + b)
    ctx = tl.minimum(seq_len, max_blocks * BLOCK_SIZE)
    num_tiles = tl.cdiv(ctx, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    b64 = b.to(tl.int64)
    if NUM_QUERIES == 1:
        heads = kv_head * GROUP + offs_h
        h_mask = offs_h < GROUP
        q_rows = b64  # the q / out row of every MMA row
        q_rows_2d = b64
    else:
        query = offs_h // GROUP  # [BLOCK_H]
        heads = kv_head * GROUP + offs_h % GROUP
        h_mask = offs_h < NUM_QUERIES * GROUP
        q_rows = b64 * NUM_QUERIES + query  # [BLOCK_H] the q / out row of each MMA row
        q_rows_2d = q_rows[:, None]
        # [BLOCK_H] tokens each row sees, <= ctx (<= 0: none, a zero row); padding rows see ctx
        row_ctx = tl.minimum(seq_len - (NUM_QUERIES - 1 - query), ctx)
    d_mask = offs_d < HEAD_DIM

    # [BLOCK_H, BLOCK_D]; padding rows are zeros (finite scores, never stored).
    q = tl.load(q_ptr + q_rows_2d * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = k_cache_ptr + kv_head * stride_kc_head
    v_base = v_cache_ptr + kv_head * stride_vc_head
    bt_row = block_tables_ptr + b64 * stride_bt

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for tile in range(tile_start, tile_end):
        pos = tile * BLOCK_N + offs_n  # [BLOCK_N] token positions in the sequence
        n_mask = pos < ctx
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_block = pos % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + block[:, None] * stride_kc_block + in_block[:, None] * stride_kc_slot
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
        if NUM_QUERIES == 1:
            s = tl.where(n_mask[None, :], s, float("-inf"))
            # The first token of every visited tile is valid, so m_new is finite: no NaN from exp2.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_sub = m_new
        else:
            s = tl.where(pos[None, :] < row_ctx[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # An earlier query may have no token in this tile nor before it: m_new = -inf, and
            # exp2(-inf - -inf) would be NaN. Subtracting 0 instead gives alpha = p = 0 there.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BLOCK_H]
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + block[:, None] * stride_vc_block + in_block[:, None] * stride_vc_slot
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_tokens = l_i > 0.0
    out = tl.where(has_tokens[:, None], acc / tl.where(has_tokens, l_i, 1.0)[:, None], 0.0)
    store_mask = h_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + q_rows_2d * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # part_out [B * Q, Hq, NUM_SPLITS, HEAD_DIM] fp32, part_lse [B * Q, Hq, NUM_SPLITS] fp32
        # (base 2), one row per q row like `out`
        row = (q_rows * NUM_Q_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=store_mask)
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=h_mask)


@triton.jit
def _paged_decode_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (B * Q * Hq): out = sum_s 2^(lse_s - max) * out_s / sum_s 2^(lse_s - max).
    row = tl.program_id(0).to(tl.int64)
    b = row // NUM_Q_HEADS
    h = row % NUM_Q_HEADS
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # All splits empty (context_len 0): every weight becomes 0 and the row is written as zeros.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)  # [BLOCK_S]
    parts = tl.load(part_out_ptr + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    denom = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def decode_tiles(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N) of the decode kernel: the head dim padded to a power of two >= 16
    (tl.dot's minimum K), and tokens per K/V tile (see _BLOCK_N)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return block_d, _BLOCK_N if block_d <= 128 else _BLOCK_N // 2


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (132 on H100 / H200); 1 elsewhere: Triton's interpreter runs the
    programs one after another, so splitting the work only adds programs."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int,
                       num_sms: int = 132) -> int:
    """KV splits per (sequence, kv head): as many as fit B * Hkv * splits programs into one wave
    of resident programs (3 per SM; equal splits finish together, a second, partial wave would
    leave SMs idle at the end), keeping at least one tile (BLOCK_N tokens, whole cache blocks)
    per split of a full table. Depends on shapes only, so a captured graph keeps its grid."""
    wanted = num_sms * _PROGRAMS_PER_SM // max(batch * num_kv_heads, 1)
    tiles = triton.cdiv(max_blocks * block_size, _BLOCK_N)
    return max(1, min(wanted, tiles, _MAX_SPLITS))


def check_decode_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor,
                      num_queries: int) -> None:
    """The arguments of a decode attention call (see paged_decode_attention); ValueError naming
    the first that is wrong."""
    _check_cache(k_cache, v_cache)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    check_head_dim("head_dim", head_dim)
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
        raise ValueError(f"num_queries must be an int >= 1, got {num_queries!r}")
    q_rows = "B" if num_queries == 1 else f"B * {num_queries}"
    if (q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads != 0
            or q.shape[0] % num_queries != 0):
        raise ValueError(f"q must be [{q_rows}, Hq, {head_dim}] with Hq a multiple of "
                         f"{num_kv_heads}, got {tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the cache dtype {k_cache.dtype}")
    _check_last_dim_contiguous("q", q)
    rows, num_q_heads, _ = q.shape
    batch = rows // num_queries  # sequences
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_blocks] (q is [{q_rows}, Hq, D] with "
                         f"B = {batch}), got {tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1 or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables must be int32/int64 with contiguous rows, got "
                         f"{block_tables.dtype} strides {block_tables.stride()}")
    if context_lens.shape != (batch,) or context_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_lens must be [{batch}] int32/int64, got "
                         f"{tuple(context_lens.shape)} {context_lens.dtype}")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float | None = None, num_splits: int | None = None,
                           num_queries: int = 1) -> torch.Tensor:
    """num_queries decode queries per sequence against its paged K/V; returns [B * Q, Hq, D] in
    q.dtype (Q = num_queries).

    q: [B * Q, Hq, D], sequence b's queries at rows b*Q .. b*Q+Q-1 in token order (any row/head
    strides, contiguous D, any D from 1 to 256); k_cache, v_cache: [num_blocks, block_size, Hkv, D];
    block_tables: [B, max_blocks] int32; context_lens: [B] int32, the context of each sequence's
    last query, whose Q tokens are all in the cache already. Query j of sequence b attends to the
    first context_lens[b] - (Q-1-j) tokens (causal among the Q new ones; <= 0 gives a zero row).
    Query head h reads kv head h // (Hq // Hkv). Tokens past max_blocks * block_size are ignored.
    Q=1 is plain decode; Q=k+1 verifies k speculative tokens in the same kernel and K/V reads.
    """
    check_decode_args(q, k_cache, v_cache, block_tables, context_lens, num_queries)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    rows, num_q_heads, _ = q.shape
    batch = rows // num_queries
    max_blocks = block_tables.shape[1]
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, max_blocks, block_size,
                                        multiprocessor_count(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    out = torch.empty((rows, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits == 1:  # the split kernel writes `out` itself; the part buffers are unused
        part_out = part_lse = out
    else:  # one row per q row, as `out`: the combine kernel sees B * Q independent rows
        part_out = torch.empty((rows, num_q_heads, num_splits, head_dim), dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty((rows, num_q_heads, num_splits), dtype=torch.float32,
                               device=q.device)
    group = num_q_heads // num_kv_heads
    block_d, block_n = decode_tiles(head_dim)
    _paged_decode_split_kernel[(num_kv_heads, num_splits, batch)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_out, part_lse,
        scale * math.log2(math.e), max_blocks,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_Q_HEADS=num_q_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, NUM_QUERIES=num_queries,
        # MMA rows: the Q * GROUP (query, q head) pairs of one kv head, padded to mma's minimum M
        BLOCK_H=max(_MIN_DOT_M, triton.next_power_of_2(num_queries * group)),
        BLOCK_D=block_d, BLOCK_N=block_n,
        # fp32 inputs (tests, CPU) must not silently drop to tf32 on the GPU
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=_DECODE_WARPS, num_stages=_DECODE_STAGES,
    )
    if num_splits > 1:
        _paged_decode_combine_kernel[(rows * num_q_heads,)](
            part_out, part_lse, out,
            out.stride(0), out.stride(1),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float | None = None, num_queries: int = 1) -> torch.Tensor:
    """Reference: per sequence and query, gather its K/V through its block table, then the SDPA
    call of transformers' sdpa attention over a DynamicCache (one query, contiguous [1, Hkv, n, D]
    K/V, no mask, not causal, enable_gqa when Hq != Hkv): on CPU bit-identical to it, in q.dtype.
    q is [B * Q, Hq, D] as in paged_decode_attention: query j of sequence b (row b*Q + j) over the
    first n = context_lens[b] - (Q-1-j) tokens; a row with n <= 0 is zeros."""
    rows, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(rows, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    for b in range(rows // num_queries):
        for j in range(num_queries):
            n = int(context_lens[b]) - (num_queries - 1 - j)
            if n <= 0:
                continue
            blocks = block_tables[b, : triton.cdiv(n, block_size)].long()
            k, v = (c[blocks].reshape(-1, num_kv_heads, head_dim)[:n].transpose(0, 1)
                    .unsqueeze(0).contiguous() for c in (k_cache, v_cache))  # [1, Hkv, n, D]
            row = b * num_queries + j
            o = torch.nn.functional.scaled_dot_product_attention(
                q[row, :, None].unsqueeze(0), k, v, scale=scale,
                enable_gqa=num_q_heads != num_kv_heads)
            out[row] = o[0, :, 0]  # [1, Hq, 1, D] -> [Hq, D]
    return out


# ----------------------------------------------------------------------------- prefill attention
#
# FlashAttention-2 over the paged cache, as the varlen kernel (attention.py) over packed K/V: one
# program owns BLOCK_M queries of one (q head, sequence), keeps them in registers and streams the
# sequence's cache in BLOCK_N-token tiles through tl.dot (fp16/bf16 operands, fp32 accumulation)
# with an online softmax in base 2. The only difference is where a key lives: token `pos` of
# sequence i is row pos % block_size of cache block block_tables[i, pos // block_size], looked up
# per token (a tile may span several cache blocks, or a cache block several tiles).
# Query m of the block sits at cache index prefix + m (prefix = context_lens[i] - n_i), so keys
# 0 .. prefix + m_start are visible to every row of the block: whole tiles among them run without
# a mask, only the tiles from there up to the block's last query (the diagonal, shifted right by
# the prefix) pay for the causal mask, and tiles past it are never visited.

_PREFILL_FULL = tl.constexpr(0)  # every key of every tile is visible to every row: no mask
_PREFILL_DIAGONAL = tl.constexpr(1)  # key pos is visible to row m iff pos <= its last key


@triton.jit
def _paged_prefill_tiles(
    acc, l_i, m_i, q, k_base, v_base, bt_row, row_last, offs_n, offs_d, d_valid, lo, hi, qk_scale,
    stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, PAD_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Online softmax over the key tiles [lo, hi) of one sequence's cache; scores in base 2.
    # row_last [BLOCK_M]: the last key each row sees (_PREFILL_DIAGONAL only). K/V lanes past the
    # head dim (PAD_D) load as zeros: they add nothing to the scores and stay zero in acc.
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + offs_n  # [BLOCK_N] token positions in the sequence
        if MODE == _PREFILL_FULL:
            block = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
            kv_mask = d_valid[None, :]
        else:  # the last tile may run past hi: past the context, or even the table's end
            n_valid = pos < hi
            block = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
            kv_mask = n_valid[:, None] & d_valid[None, :]
        in_block = (pos % BLOCK_SIZE)[:, None]
        k_ptrs = (k_base + block[:, None] * stride_kc_block + in_block * stride_kc_slot
                  + offs_d[None, :])  # [BLOCK_N, BLOCK_D]
        v_ptrs = (v_base + block[:, None] * stride_vc_block + in_block * stride_vc_slot
                  + offs_d[None, :])
        if MODE == _PREFILL_FULL and not PAD_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if MODE == _PREFILL_FULL:
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        else:
            qk = tl.where(pos[None, :] <= row_last[:, None], qk * qk_scale, float("-inf"))
            # Key 0 is in every row's first tile and visible to it, so m_i is finite from then on
            # and a row with no visible key in a later tile gets p = 0 there, never NaN.
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            qk = qk - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    max_blocks,
    stride_qt, stride_qh,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid (Hq, N, cdiv(max_seqlen_q, BLOCK_M)): heads vary fastest, so the q heads of one kv
    # group run side by side and share its K/V tiles in L2. Query blocks run last-first: the last
    # blocks see the most keys, and starting them first shortens the tail.
    head = tl.program_id(0)
    seq = tl.program_id(1)
    m_block = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    num_q = (tl.load(cu_seqlens_ptr + seq + 1) - q_start).to(tl.int32)  # n_i
    m_start = m_block * BLOCK_M
    if m_start >= num_q:  # past this chunk's end (or an empty chunk)
        return
    q_start = q_start.to(tl.int64)
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    prefix = context_len - num_q  # cache index of query 0
    # Keys stop at the table's end: a context past it (an invalid call) reads no entry beyond.
    kv_len = tl.minimum(context_len, max_blocks * BLOCK_SIZE)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # BLOCK_D: the head dim padded to a power of two >= 16 (tl.dot's minimum K); lanes past
    # HEAD_DIM are zeros in q, k, v and never stored.
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    m_valid = offs_m < num_q
    io_mask = m_valid[:, None] & d_valid[None, :]
    # Row offsets in int32 from an int64 base (as the varlen kernel: a chunk's offsets stay below
    # 2^31): int64 row pointers would be computed before the loop and held through it for the
    # store, 16 more registers a thread at BLOCK_M 128, which spill under the 128 cap.
    q_ptrs = (q_ptr + q_start * stride_qt + head * stride_qh
              + offs_m[:, None] * stride_qt + offs_d[None, :])
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D], rows past n_i zero
    kv_head = head // GROUP
    k_base = k_cache_ptr + kv_head * stride_kc_head
    v_base = v_cache_ptr + kv_head * stride_vc_head
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

    # Keys 0 .. prefix + m_start are visible to every row: the whole tiles among them need no
    # mask. The masked tiles run up to the block's last valid query, prefix + min(m_start +
    # BLOCK_M, n_i) - 1; each row sees up to its own query, rows past n_i (never stored) up to
    # the last valid one's.
    full_end = tl.minimum(prefix + m_start + 1, kv_len) // BLOCK_N * BLOCK_N
    hi = tl.minimum(prefix + tl.minimum(m_start + BLOCK_M, num_q), kv_len)
    row_last = tl.minimum(prefix + offs_m, hi - 1)  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _paged_prefill_tiles(
        acc, l_i, m_i, q, k_base, v_base, bt_row, row_last, offs_n, offs_d, d_valid,
        0, full_end, qk_scale, stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
        BLOCK_SIZE, BLOCK_N, _PREFILL_FULL, PAD_D, DOT_PRECISION)
    acc, l_i, m_i = _paged_prefill_tiles(
        acc, l_i, m_i, q, k_base, v_base, bt_row, row_last, offs_n, offs_d, d_valid,
        full_end, hi, qk_scale, stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot,
        BLOCK_SIZE, BLOCK_N, _PREFILL_DIAGONAL, PAD_D, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = (out_ptr + q_start * stride_ot + head * stride_oh
              + offs_m[:, None] * stride_ot + offs_d[None, :])
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)


def prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile shape, warps, pipeline depth and register cap of the prefill kernel (sm_90, Triton 3.7).

    The tiles of the varlen kernel (attention._launch_config): BLOCK_D is the head dim padded to a
    power of two >= 16; fp16/bf16 take 128 query rows over 8 warps (two warpgroups issuing 64-row
    wgmmas on every K/V tile in shared memory), 64-key tiles up to BLOCK_D 64, 32-key ones above.
    One more stage than there: the block-table load is itself a pipeline stage (the K/V addresses
    depend on it), and with 4 stages the loop waits for every copy at the top of each iteration,
    so a tile's K/V are only fetched while the previous tile is consumed; 5 give three K/V buffers
    with two tiles in flight. ptxas: BLOCK_D <= 128 fits the 128-register cap without spills
    (82 KB of shared memory at BLOCK_D 128), so two programs share an SM and one's softmax runs
    under the other's MMAs; BLOCK_D 256 takes 252 registers and 164 KB, one program per SM.
    fp32 inputs (correctness tests only) take FMA dots on smaller tiles.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=2)
    if block_d > 128:
        return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=5)
    return dict(BLOCK_M=128, BLOCK_N=64 if block_d <= 64 else 32, BLOCK_D=block_d, num_warps=8,
                num_stages=5, maxnreg=128)


def check_prefill_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, max_seqlen_q: int) -> None:
    """The arguments of a prefill attention call (see paged_prefill_attention); ValueError naming
    the first that is wrong."""
    _check_cache(k_cache, v_cache)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    check_head_dim("head_dim", head_dim)
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"q must be [T, Hq, {head_dim}] with Hq a multiple of {num_kv_heads}, "
                         f"got {tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the cache dtype {k_cache.dtype}")
    _check_last_dim_contiguous("q", q)
    num_tokens, num_q_heads, _ = q.shape
    if (cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1
            or cu_seqlens_q.dtype not in (torch.int32, torch.int64)
            or not cu_seqlens_q.is_contiguous()):
        raise ValueError(f"cu_seqlens_q must be a contiguous [N + 1] int32/int64 tensor, got "
                         f"{tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype} strides "
                         f"{cu_seqlens_q.stride()}")
    num_seqs = cu_seqlens_q.shape[0] - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks] (cu_seqlens_q holds "
                         f"N = {num_seqs} sequences), got {tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1 or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables must be int32/int64 with contiguous rows, got "
                         f"{block_tables.dtype} strides {block_tables.stride()}")
    if (context_lens.shape != (num_seqs,) or context_lens.dtype not in (torch.int32, torch.int64)
            or not context_lens.is_contiguous()):
        raise ValueError(f"context_lens must be a contiguous [{num_seqs}] int32/int64 tensor, got "
                         f"{tuple(context_lens.shape)} {context_lens.dtype}")
    for name, t in (("k_cache", k_cache), ("cu_seqlens_q", cu_seqlens_q),
                    ("block_tables", block_tables), ("context_lens", context_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be an int >= 0, got {max_seqlen_q!r}")


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor, max_seqlen_q: int,
                            scale: float | None = None) -> torch.Tensor:
    """Causal attention of packed prefill chunks over their paged cache; returns a fresh
    contiguous [T, Hq, D] in q.dtype.

    q: [T, Hq, D] (any row/head strides, contiguous D, any D from 1 to 256), sequence i's n_i new
    tokens at rows cu_seqlens_q[i] .. cu_seqlens_q[i+1]-1 (cu_seqlens_q [N + 1] int32/int64,
    cu_seqlens_q[0] = 0 and cu_seqlens_q[N] = T; n_i may be 0); k_cache, v_cache: [num_blocks,
    block_size, Hkv, D]; block_tables: [N, max_blocks] int32/int64; context_lens: [N] int32/int64,
    the cache tokens of sequence i including its n_i new ones, already written at indices
    context_lens[i] - n_i .. context_lens[i] - 1. Query j of sequence i sits at index
    p = context_lens[i] - n_i + j and attends to cache tokens 0 .. p. Query head h reads kv head
    h // (Hq // Hkv). max_seqlen_q >= every n_i sizes the grid (rows of a longer chunk past it
    are left unwritten). scale defaults to 1/sqrt(D). Reads no device tensor on the host: the call
    never synchronizes and can be captured in a CUDA graph (the grid follows max_seqlen_q).
    """
    check_prefill_args(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens, max_seqlen_q)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_tokens, num_q_heads, _ = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if not scale > 0.0:
        raise ValueError(f"scale must be positive, got {scale}")

    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    config = prefill_config(head_dim, q.dtype)
    grid = (num_q_heads, num_seqs, triton.cdiv(max_seqlen_q, config["BLOCK_M"]))
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens, out,
        scale * math.log2(math.e), block_tables.shape[1],
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        # fp32 inputs (tests, CPU) must not silently drop to tf32 on the GPU
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **config,
    )
    return out


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, scale: float | None = None
                                ) -> torch.Tensor:
    """Reference: per sequence, gather its context_lens[i] = L tokens through its block table into
    contiguous [1, Hkv, L, D] K/V and make one SDPA call for its n_i queries [1, Hq, n_i, D]
    (enable_gqa when Hq != Hkv), in q.dtype. Without a prefix (L == n_i) that is the call
    transformers' sdpa attention makes for one unpadded sequence (is_causal, no mask); after one,
    a boolean mask causal from the bottom right: query j sees keys 0 .. L - n_i + j.
    Arguments as in paged_prefill_attention; every row of q belongs to a sequence, so all are
    written."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens_q.tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        n, ctx = e - s, int(context_lens[i])
        if n == 0:
            continue
        blocks = block_tables[i, : triton.cdiv(ctx, block_size)].long()
        k, v = (c[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].transpose(0, 1)
                .unsqueeze(0).contiguous() for c in (k_cache, v_cache))  # [1, Hkv, L, D]
        if ctx == n:
            mask = None
        else:  # [n, L]: query j (at cache index L - n + j) sees keys <= its own index
            keys = torch.arange(ctx, device=q.device)
            mask = keys[None, :] <= (ctx - n + torch.arange(n, device=q.device))[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask, is_causal=mask is None,
            scale=scale, enable_gqa=num_q_heads != num_kv_heads)
        out[s:e] = o[0].transpose(0, 1)  # [1, Hq, n, D] -> [n, Hq, D]
    return out
