"""Varlen (packed) flash-attention forward: block-diagonal per sequence, optionally causal, GQA.

Used twice by GLM-OCR:
- vision encoder: all images of a step packed into one sequence of patches, attention never
  crossing an image; non-causal, 16 heads, D 64, up to 24,576 patches;
- text prefill: the new tokens of several prompts packed; causal, 16 q / 8 kv heads, D 128.
Any head dim up to 256 runs: the tiles pad it to a power of two and mask the padding.

Layout: q [T, Hq, D], k and v [T, Hkv, D] (any token/head strides, D contiguous: strided views of
a packed qkv projection are read in place); cu_seqlens [N + 1] int32/int64 with cu_seqlens[0] = 0
and cu_seqlens[N] = T; sequence i is tokens [cu_seqlens[i], cu_seqlens[i + 1]). Causal masks are
per sequence (query i sees keys 0..i of its own sequence). Query head h reads kv head
h // (Hq / Hkv). The output is a fresh contiguous [T, Hq, D] tensor in q.dtype.

The kernel is FlashAttention-2: one program owns BLOCK_M query rows of one (sequence, q head),
keeps them in registers and streams the sequence's K/V in BLOCK_N tiles through tl.dot (fp16/bf16
operands, fp32 accumulation) with an online softmax in base 2 (the scale is pre-multiplied by
log2(e), so each score costs one FMA and one exp2). Only tiles that need a mask pay for it: the
last, partial tile of a non-causal sequence and the diagonal tiles of a causal one; tiles past the
diagonal are never visited.
"""
import math

import torch
import triton
import triton.language as tl

from . import check_head_dim

# Inner-loop modes of _attn_tiles.
_FULL = tl.constexpr(0)  # every key of every tile is valid: no mask at all
_TAIL = tl.constexpr(1)  # keys at or past seqlen are masked (last tile of a non-causal sequence)
_DIAGONAL = tl.constexpr(2)  # causal: key n is visible to query m iff n <= m

_LOG2E = 1.4426950408889634


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile shape, warps, pipeline depth and register cap for one head dim (sm_90, Triton 3.7).

    BLOCK_D is the head dim padded to a power of two, at least 16 (tl.dot's minimum K); padded
    head dims take the config of their BLOCK_D.
    fp16/bf16, BLOCK_D <= 128: 128 query rows over 8 warps, so each of the two warpgroups issues
    64-row wgmmas (Hopper's native M) while every K/V tile in shared memory serves all 128 rows
    (half the L2 traffic per flop of 64-row blocks). ptxas fits these tiles in 128 registers
    without spilling (at BLOCK_D 128 the fp32 accumulator alone takes 64 a thread, hence 32-key
    tiles there), and the cap lets two programs share an SM (2 x 256 threads x 128 registers = the
    64K register file; 2 x 80-96 KB of the 228 KB of shared memory), so that one program's softmax
    can run under the other's MMAs. 4 stages: K/V copies are issued three tiles ahead.
    BLOCK_D 256: the accumulator alone takes 128 registers a thread, so one program owns the SM:
    the same 128 x 32 tiles without a cap (ptxas: 246-254 registers, no spill) and 3 stages
    (160 KB of shared memory; 4 would take 192 KB).
    Chosen from ptxas' resource counts (tests/kernels/test_attention.py checks them), not yet from
    timings on an H100. fp32 inputs (correctness tests only) take FMA dots on smaller tiles.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=2)
    if block_d > 128:
        return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64 if block_d <= 64 else 32, BLOCK_D=block_d, num_warps=8,
                num_stages=4, maxnreg=128)


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, lo, hi, seqlen, qk_scale,
    stride_kt, stride_vt, d_valid,
    BLOCK_N: tl.constexpr, MODE: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Online softmax over the key tiles [lo, hi) of one sequence; scores in base 2. K/V lanes past
    # the head dim (PAD_D) load as zeros: they add nothing to the scores and stay zero in acc.
    for start_n in range(lo, hi, BLOCK_N):
        if MODE == _FULL and not PAD_D:
            k = tl.load(k_ptrs + start_n * stride_kt)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptrs + start_n * stride_vt)
        else:
            kv_mask = d_valid[None, :]
            if MODE != _FULL:
                n_valid = (start_n + offs_n) < seqlen
                kv_mask = n_valid[:, None] & kv_mask
            k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if MODE == _FULL:
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        else:
            if MODE == _TAIL:
                visible = n_valid[None, :]
            else:
                visible = offs_m[:, None] >= (start_n + offs_n)[None, :]
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            # Key 0 is in every query's first tile, so m_i is finite from then on and a fully
            # masked row of a later tile yields p = 0, never NaN.
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            qk = qk - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid (Hq, num_seqs, cdiv(max_seqlen, BLOCK_M)): heads vary fastest, so the q heads of one kv
    # group run side by side and share its K/V tiles in L2. Query blocks run last-first: under a
    # causal mask the last blocks are the longest, and starting them first shortens the tail.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    head = tl.program_id(0)
    seq = tl.program_id(1)
    m_block = tl.num_programs(2) - 1 - tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - start
    m_start = m_block * BLOCK_M
    if m_start >= seqlen:  # past this sequence's end (or an empty sequence)
        return
    start = start.to(tl.int64)
    kv_head = head // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # BLOCK_D: the head dim padded to a power of two >= 16 (tl.dot's minimum K); lanes past
    # HEAD_DIM are zeros in q, k, v and never stored.
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    m_valid = offs_m < seqlen
    io_mask = m_valid[:, None] & d_valid[None, :]
    q_ptrs = (q_ptr + start * stride_qt + head * stride_qh
              + offs_m[:, None] * stride_qt + offs_d[None, :])
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D], rows past seqlen zero
    k_ptrs = (k_ptr + start * stride_kt + kv_head * stride_kh
              + offs_n[:, None] * stride_kt + offs_d[None, :])
    v_ptrs = (v_ptr + start * stride_vt + kv_head * stride_vh
              + offs_n[:, None] * stride_vt + offs_d[None, :])

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        # Tiles left of m_start are wholly visible to every row of the block (m_start is a
        # multiple of BLOCK_N); the diagonal tiles [m_start, m_start + BLOCK_M) need the mask.
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n,
                                    0, m_start, seqlen, qk_scale, stride_kt, stride_vt, d_valid,
                                    BLOCK_N, _FULL, PAD_D, DOT_PRECISION)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n,
                                    m_start, tl.minimum(m_start + BLOCK_M, seqlen), seqlen,
                                    qk_scale, stride_kt, stride_vt, d_valid,
                                    BLOCK_N, _DIAGONAL, PAD_D, DOT_PRECISION)
    else:
        full_end = seqlen - seqlen % BLOCK_N
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n,
                                    0, full_end, seqlen, qk_scale, stride_kt, stride_vt, d_valid,
                                    BLOCK_N, _FULL, PAD_D, DOT_PRECISION)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n,
                                    full_end, seqlen, seqlen, qk_scale, stride_kt, stride_vt,
                                    d_valid, BLOCK_N, _TAIL, PAD_D, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = (out_ptr + start * stride_ot + head * stride_oh
              + offs_m[:, None] * stride_ot + offs_d[None, :])
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, H, D], got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [T, Hkv, D] with q's "
                         f"T and D, q is {tuple(q.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.device != q.device
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"cu_seqlens must be [num_seqs + 1] int32/int64 on {q.device}, got "
                         f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype} on {cu_seqlens.device}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, causal: bool, scale: float | None = None) -> torch.Tensor:
    """Attention within each packed sequence; returns [T, Hq, D] in q.dtype.

    q [T, Hq, D], k and v [T, Hkv, D] (fp32/fp16/bf16, strided views allowed, D contiguous, any
    D from 1 to 256); cu_seqlens [N + 1] on q's device; max_seqlen >= the longest sequence
    (rows of a longer sequence past it are left unwritten). scale defaults to 1/sqrt(D).
    Reads no device tensor on the host (no sync); the grid depends on max_seqlen only.
    """
    _check(q, k, v, cu_seqlens)
    num_tokens, num_q_heads, head_dim = q.shape
    check_head_dim("head_dim", head_dim)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides "
                             f"{t.stride()}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if not scale > 0.0:
        raise ValueError(f"scale must be positive, got {scale}")

    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0 or max_seqlen <= 0:
        return out
    config = _launch_config(head_dim, q.dtype)
    grid = (num_q_heads, num_seqs, triton.cdiv(max_seqlen, config["BLOCK_M"]))
    _varlen_attention_kernel[grid](
        q, k, v, out, cu_seqlens,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=num_q_heads // k.shape[1], HEAD_DIM=head_dim, CAUSAL=causal,
        # fp32 inputs (tests) must not silently drop to tf32 on the GPU
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **config,
    )
    return out


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens: torch.Tensor, causal: bool,
                         scale: float | None = None) -> torch.Tensor:
    """Reference: per sequence, the SDPA call of transformers' sdpa attention, in q.dtype.

    Each sequence runs as one batch-1 [1, H, L, D] call without a mask (is_causal for a causal
    one, enable_gqa when Hq != Hkv), the call transformers makes for one unpadded sequence, so on
    CPU the result is bit-identical to it. SDPA's fused kernels never materialise the [H, L, L]
    scores, which for a full page (24,576 patches) would take 38 GB in fp32.
    """
    _check(q, k, v, cu_seqlens)
    scale = q.shape[2] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        seq = [x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # [1, H, L, D]
        o = torch.nn.functional.scaled_dot_product_attention(
            *seq, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        out[s:e] = o[0].transpose(0, 1)
    return out
