"""Rotary position embeddings for GLM-OCR and GLM-Image, applied in place.

Two kernels, both memory-bound elementwise passes that read q/k once and write them once:

- `vision_qk_norm_rope_`: the vision attention's per-head q/k RMSNorm fused with the 2D
  (row, col) rotary embedding, NeoX half-rotate over the whole head dim.
- `mrope_write_kv_`: the text decoder's 3D M-RoPE on q and k, fused with the paged KV-cache write
  of k and v (one launch per decoder layer). rotary_dim/2 frequencies split into contiguous
  (t, h, w) sections, each turning by that row's position, rotate the first rotary_dim dims of
  every head (None = all of them) in one of two layouts:
  - interleaved=True, GPT-J pairs: frequency j rotates dims (2j, 2j+1). GLM-OCR, full rotation
    (transformers' GlmOcr `rotate_half_llm`, cos/sin `repeat_interleave(2)`).
  - interleaved=False, NeoX halves: frequency j rotates dims (j, rotary_dim/2 + j). GLM-Image,
    partial rotation over the first half of a 128-dim head (GlmImage `rotate_half`, cos/sin
    `cat([freqs, freqs])`).
  Dims [rotary_dim, D) pass through: neither read nor written in q and k, copied into the cache
  with the rest of the k row. The kernel lives here because it is the M-RoPE kernel with a store
  epilogue, while the cache layout it stores into is a few lines of slot addressing (see paged.py,
  which holds the layout's argument check and the write's reference).

Head dims: tiles pad to a power of two and mask the padding, so any D up to MAX_HEAD_DIM works
that the rotation allows: D and rotary_dim even for M-RoPE (pairs or halves), a multiple of 4 for
the vision rope (halves, each split into row and column frequencies).

cos/sin are computed in the kernel from integer positions, so no [T, D] table is read from memory.
The inverse frequencies are the only table: a few floats built once on the host with the same torch
expression transformers uses (over rotary_dim, not D), so every angle is bit-identical to the
reference's.

Rounding mirrors transformers in bf16/fp16:
- vision: RMSNorm in fp32, rounded to the dtype, times the weight, rounded again; rotation in fp32
  with fp32 cos/sin; one final rounding (GlmOcrRMSNorm + apply_rotary_pos_emb_vision).
- text, both layouts: cos/sin rounded to the dtype (transformers casts them to the activation
  dtype); each of the two products rounded to the dtype, then their sum rounded: exactly
  transformers' `q_rot * cos + rotate_half(q_rot) * sin` evaluated in bf16/fp16 (a no-op in fp32).
"""
from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import check_head_dim
from .paged import check_kv_write, write_kv_cache_ref

# Elements of q a program holds: [BLOCK_T, BLOCK_H, BLOCK_D] ~ 4096 is 32 fp32 values per thread at
# 4 warps, enough independent 16-byte loads in flight to cover latency without spilling.
_TILE_ELEMS = 4096


def _tile(num_tokens: int, block_h: int, block_d: int) -> tuple[int, int]:
    """(tokens per program, warps): about _TILE_ELEMS elements of q per program; a single token's
    heads may hold more (e.g. 32 heads x 256 dims), then warps grow to keep 32 values a thread."""
    block_t = max(1, min(triton.next_power_of_2(num_tokens), _TILE_ELEMS // (block_h * block_d)))
    return block_t, min(16, max(4, block_t * block_h * block_d // 1024))


@lru_cache(maxsize=None)
def _inv_freq(theta: float, rotary_dim: int, device: torch.device) -> torch.Tensor:
    """[rotary_dim // 2] fp32: theta^(-2i/rotary_dim), built on the CPU exactly as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    return inv_freq.to(device)


# ---------------------------------------------------------------------------------------------------
# Vision: per-head RMSNorm + 2D NeoX rotary
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_rope_neox(x_ptr, w_ptr, stride_s, stride_h, offs_s, offs_h, offs_d, d_valid, mask,
                        cos, sin, eps, HALF: tl.constexpr):
    # x [BLOCK_S, BLOCK_H, 2*HALF] as two halves of BLOCK_HALF lanes, those past HALF masked;
    # cos/sin [BLOCK_S, 1, BLOCK_HALF] fp32
    dtype = x_ptr.dtype.element_ty
    ptrs = (x_ptr + offs_s.to(tl.int64)[:, None, None] * stride_s
            + offs_h[None, :, None] * stride_h + offs_d[None, None, :])
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, None, :]
    w2 = tl.load(w_ptr + HALF + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, None, :]
    mean_sq = (tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / (2 * HALF)
    rstd = tl.math.rsqrt(mean_sq + eps)[:, :, None]
    y1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    y2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    tl.store(ptrs, (y1 * cos - y2 * sin).to(dtype), mask=mask)
    tl.store(ptrs + HALF, (y2 * cos + y1 * sin).to(dtype), mask=mask)


@triton.jit
def _vision_qk_norm_rope_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, pos_ptr, inv_freq_ptr,
    S, H,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_ps, stride_pc,
    eps,
    HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One program: BLOCK_S tokens x all heads, q then k; cos/sin computed once for both.
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_valid = offs_d < HALF
    mask_s = offs_s < S
    pos_row = tl.load(pos_ptr + offs_s * stride_ps, mask=mask_s, other=0).to(tl.float32)
    pos_col = tl.load(pos_ptr + offs_s * stride_ps + stride_pc, mask=mask_s, other=0).to(tl.float32)
    # angle slot i < HALF/2 rotates with the row, the rest with the column (same frequencies)
    inv_freq = tl.load(inv_freq_ptr + offs_d % (HALF // 2))
    pos = tl.where((offs_d < HALF // 2)[None, :], pos_row[:, None], pos_col[:, None])
    angle = pos * inv_freq[None, :]
    cos = tl.cos(angle)[:, None, :]
    sin = tl.sin(angle)[:, None, :]
    mask = mask_s[:, None, None] & (offs_h < H)[None, :, None] & d_valid[None, None, :]
    _rms_norm_rope_neox(q_ptr, qw_ptr, stride_qs, stride_qh, offs_s, offs_h, offs_d, d_valid, mask,
                        cos, sin, eps, HALF)
    _rms_norm_rope_neox(k_ptr, kw_ptr, stride_ks, stride_kh, offs_s, offs_h, offs_d, d_valid, mask,
                        cos, sin, eps, HALF)


def _check_heads(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim, got strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be fp32, fp16 or bf16, got {x.dtype}")


def _check_positions(positions: torch.Tensor, shape: tuple[int, int], like: torch.Tensor) -> None:
    if tuple(positions.shape) != shape:
        raise ValueError(f"positions must have shape {shape}, got {tuple(positions.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if positions.device != like.device:
        raise ValueError(f"positions is on {positions.device}, q on {like.device}")


def vision_qk_norm_rope_(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                         k_weight: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
                         eps: float = 1e-5) -> None:
    """In place: q = rope(RMSNorm(q) * q_weight), k likewise, per head.

    q, k: [S, H, D] (same shape and dtype, any token/head strides, head_dim contiguous; typically
    the q and k slices of the packed qkv output viewed as [S, 3, H, D]). q_weight, k_weight: [D].
    positions: [S, 2] int32/int64, (row, col) of each patch (transformers' get_vision_position_ids).
    D a multiple of 4 up to 256; angles are [row * f, col * f] with f = theta^(-2i/(D/2)), i < D/4.
    The first call per (theta, D, device) uploads a small frequency table: make it before CUDA-graph
    capture (any warm-up run does).
    """
    _check_heads("q", q)
    _check_heads("k", k)
    if k.shape != q.shape or k.dtype != q.dtype:
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} must match q {tuple(q.shape)} {q.dtype}")
    S, H, D = q.shape
    check_head_dim("head_dim", D, 4)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (D,) or w.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous [{D}] tensor, got {tuple(w.shape)}")
    _check_positions(positions, (S, 2), q)
    if S == 0:
        return
    block_h = triton.next_power_of_2(H)
    block_half = triton.next_power_of_2(D // 2)
    block_s, num_warps = _tile(S, block_h, 2 * block_half)
    _vision_qk_norm_rope_kernel[(triton.cdiv(S, block_s),)](
        q, k, q_weight, k_weight, positions, _inv_freq(float(theta), D // 2, q.device),
        S, H,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), positions.stride(0), positions.stride(1),
        float(eps),
        HALF=D // 2, BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )


def vision_qk_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                            k_weight: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
                            eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `vision_qk_norm_rope_` (GlmOcrRMSNorm + apply_rotary_pos_emb_vision)."""
    D = q.shape[-1]
    freqs = positions[..., None].float() * _inv_freq(float(theta), D // 2, q.device)  # [S, 2, D/4]
    freqs = freqs.flatten(1)  # [S, D/2]: row frequencies, then column frequencies
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [S, 1, D]
    cos, sin = emb.cos(), emb.sin()

    def norm_rope(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (weight.float() * xf.to(x.dtype).float()).to(x.dtype).float()
        y1, y2 = y.chunk(2, dim=-1)
        return (y * cos + torch.cat([-y2, y1], dim=-1) * sin).to(x.dtype)

    return norm_rope(q, q_weight), norm_rope(k, k_weight)


# ---------------------------------------------------------------------------------------------------
# Text: 3D M-RoPE, interleaved pairs (GLM-OCR) or NeoX halves (GLM-Image), full or partial
# ---------------------------------------------------------------------------------------------------
#
# Both layouts rotate the first ROTARY = 2 * HALF dims of a head with HALF frequencies; dims
# [ROTARY, HEAD_DIM) pass through: the in-place rotation never loads or stores them, the KV-cache
# epilogue copies them into the cache row unchanged.


@triton.jit
def _mrope_cos_sin(pos_ptr, inv_freq_ptr, stride_pr, stride_pt, offs_t, mask_t, dtype: tl.constexpr,
                   HALF: tl.constexpr, SEC_T: tl.constexpr, SEC_TH: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    # -> cos, sin [BLOCK_T, 1, BLOCK_HALF] fp32, rounded to the activation dtype like transformers;
    # slot j is frequency j (j < HALF), the same for both layouts (they differ in which dims use it)
    offs_j = tl.arange(0, BLOCK_HALF)
    pos_ptrs = pos_ptr + offs_t * stride_pt
    pos_t = tl.load(pos_ptrs, mask=mask_t, other=0).to(tl.float32)
    pos_h = tl.load(pos_ptrs + stride_pr, mask=mask_t, other=0).to(tl.float32)
    pos_w = tl.load(pos_ptrs + 2 * stride_pr, mask=mask_t, other=0).to(tl.float32)
    # frequency slot j takes its position from row t, h or w by contiguous section
    pos = tl.where((offs_j < SEC_T)[None, :], pos_t[:, None],
                   tl.where((offs_j < SEC_TH)[None, :], pos_h[:, None], pos_w[:, None]))
    inv_freq = tl.load(inv_freq_ptr + offs_j, mask=offs_j < HALF, other=0.0)
    angle = pos * inv_freq[None, :]  # [BLOCK_T, BLOCK_HALF]
    cos = tl.cos(angle).to(dtype).to(tl.float32)[:, None, :]
    sin = tl.sin(angle).to(dtype).to(tl.float32)[:, None, :]
    return cos, sin


@triton.jit
def _rope_interleaved(x_ptr, stride_t, stride_h, H, offs_t, mask_t, cos, sin,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # GPT-J pairs: dims (2j, 2j+1) rotate by frequency j.
    # x [BLOCK_T, BLOCK_H, 2 * BLOCK_HALF] loaded contiguously (16-byte vectors), then split into
    # its even and odd lanes in registers; loading the two lanes with stride-2 pointers would halve
    # the vector width. Lanes past 2 * HALF (padding up to a power of two, or pass-through dims) are
    # masked. Rotated in place; returns the rotated tile in x's dtype.
    dtype = x_ptr.dtype.element_ty
    BLOCK_T: tl.constexpr = offs_t.shape[0]
    BLOCK_HALF: tl.constexpr = cos.shape[2]
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, 2 * BLOCK_HALF)
    ptrs = (x_ptr + offs_t.to(tl.int64)[:, None, None] * stride_t
            + offs_h[None, :, None] * stride_h + offs_d[None, None, :])
    mask = mask_t[:, None, None] & (offs_h < H)[None, :, None] & (offs_d < 2 * HALF)[None, None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_HALF, 2)))
    # Each product is rounded to the storage dtype before the add, as transformers' bf16 math does.
    even = (x_even * cos).to(dtype).to(tl.float32) - (x_odd * sin).to(dtype).to(tl.float32)
    odd = (x_odd * cos).to(dtype).to(tl.float32) + (x_even * sin).to(dtype).to(tl.float32)
    out = tl.reshape(tl.join(even, odd), (BLOCK_T, BLOCK_H, 2 * BLOCK_HALF)).to(dtype)
    tl.store(ptrs, out, mask=mask)
    return out


@triton.jit
def _rope_neox(x_ptr, stride_t, stride_h, H, offs_t, mask_t, cos, sin,
               HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # NeoX halves: dims j and HALF + j rotate by frequency j (transformers' rotate_half).
    # x1 = dims [0, HALF), x2 = dims [HALF, 2 * HALF), each [BLOCK_T, BLOCK_H, BLOCK_HALF] with the
    # lanes past HALF masked, so nothing at or past 2 * HALF is touched. Rotated in place; returns
    # the two rotated halves in x's dtype.
    dtype = x_ptr.dtype.element_ty
    BLOCK_HALF: tl.constexpr = cos.shape[2]
    offs_h = tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, BLOCK_HALF)
    ptrs = (x_ptr + offs_t.to(tl.int64)[:, None, None] * stride_t
            + offs_h[None, :, None] * stride_h + offs_j[None, None, :])
    mask = mask_t[:, None, None] & (offs_h < H)[None, :, None] & (offs_j < HALF)[None, None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    # q * cos + rotate_half(q) * sin with rotate_half(q) = (-x2, x1), each product rounded to the
    # storage dtype before the add (round(-a) = -round(a), so the subtraction is the same sum).
    out1 = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(ptrs, out1, mask=mask)
    tl.store(ptrs + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _mrope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    T, HQ, HK,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_pr, stride_pt,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, SEC_T: tl.constexpr, SEC_TH: tl.constexpr,
    INTERLEAVED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_T tokens x all q heads and all k heads, cos/sin computed once for both,
    # q and k rotated in place (only their first ROTARY = 2 * HALF dims are read or written).
    # Then the whole k row of the same tokens is stored at its cache slot (slot -1 rows skipped):
    # the rotated dims [0, ROTARY) from registers, the pass-through dims [ROTARY, HEAD_DIM) (a
    # BLOCK_PASS tile, absent when the rotation is full) copied from k, which the rotation did not
    # touch; then v [BLOCK_T, BLOCK_HK, BLOCK_D].
    ROTARY: tl.constexpr = 2 * HALF
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    cos, sin = _mrope_cos_sin(pos_ptr, inv_freq_ptr, stride_pr, stride_pt, offs_t, mask_t,
                              q_ptr.dtype.element_ty, HALF, SEC_T, SEC_TH, BLOCK_HALF)
    if INTERLEAVED:
        _rope_interleaved(q_ptr, stride_qt, stride_qh, HQ, offs_t, mask_t, cos, sin, HALF, BLOCK_HQ)
        k = _rope_interleaved(k_ptr, stride_kt, stride_kh, HK, offs_t, mask_t, cos, sin, HALF,
                              BLOCK_HK)
    else:
        _rope_neox(q_ptr, stride_qt, stride_qh, HQ, offs_t, mask_t, cos, sin, HALF, BLOCK_HQ)
        k1, k2 = _rope_neox(k_ptr, stride_kt, stride_kh, HK, offs_t, mask_t, cos, sin, HALF,
                            BLOCK_HK)

    slot = tl.load(slot_mapping_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_HK)
    # [BLOCK_T, BLOCK_HK, 1]: whether each (token, kv head) row is stored, and where it starts
    row_mask = (slot >= 0)[:, None, None] & (offs_h < HK)[None, :, None]
    block = (slot // BLOCK_SIZE)[:, None, None]
    in_block = (slot % BLOCK_SIZE)[:, None, None]
    kc_row = (k_cache_ptr + block * stride_kc_block + in_block * stride_kc_slot
              + offs_h[None, :, None] * stride_kc_head)
    kc_dtype = k_cache_ptr.dtype.element_ty
    if INTERLEAVED:
        offs_r = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
        tl.store(kc_row + offs_r, k.to(kc_dtype), mask=row_mask & (offs_r < ROTARY))
    else:
        offs_j = tl.arange(0, BLOCK_HALF)[None, None, :]
        half_mask = row_mask & (offs_j < HALF)
        tl.store(kc_row + offs_j, k1.to(kc_dtype), mask=half_mask)
        tl.store(kc_row + HALF + offs_j, k2.to(kc_dtype), mask=half_mask)
    if ROTARY < HEAD_DIM:
        offs_p = ROTARY + tl.arange(0, BLOCK_PASS)[None, None, :]
        pass_mask = row_mask & (offs_p < HEAD_DIM)
        k_pass = tl.load(k_ptr + offs_t.to(tl.int64)[:, None, None] * stride_kt
                         + offs_h[None, :, None] * stride_kh + offs_p, mask=pass_mask)
        tl.store(kc_row + offs_p, k_pass.to(kc_dtype), mask=pass_mask)

    offs_d = tl.arange(0, BLOCK_D)[None, None, :]
    v_mask = row_mask & (offs_d < HEAD_DIM)
    v = tl.load(v_ptr + offs_t.to(tl.int64)[:, None, None] * stride_vt
                + offs_h[None, :, None] * stride_vh + offs_d, mask=v_mask)
    vc = (v_cache_ptr + block * stride_vc_block + in_block * stride_vc_slot
          + offs_h[None, :, None] * stride_vc_head + offs_d)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def _check_rotary(head_dim: int, rotary_dim: int | None, mrope_section, interleaved: bool
                  ) -> tuple[list[int], int]:
    """Validate the rotation's arguments for a head dim; returns (3 section sizes, rotary_dim)."""
    if not isinstance(interleaved, bool):
        raise ValueError(f"interleaved must be a bool, got {interleaved!r}")
    rotary = head_dim if rotary_dim is None else rotary_dim
    if (isinstance(rotary, bool) or not isinstance(rotary, int) or rotary % 2
            or not 2 <= rotary <= head_dim):
        raise ValueError(f"rotary_dim must be an even number from 2 to head_dim = {head_dim} "
                         f"(None: the whole head), got {rotary_dim!r}")
    sections = [int(s) for s in mrope_section]
    if len(sections) != 3 or sum(sections) != rotary // 2 or min(sections) < 0:
        raise ValueError(f"mrope_section must be 3 sizes summing to rotary_dim/2 = {rotary // 2} "
                         f"(rotary_dim {rotary}, head_dim {head_dim}), got {sections}")
    return sections, rotary


def _check_mrope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 mrope_section: tuple[int, int, int] | list[int], rotary_dim: int | None,
                 interleaved: bool) -> tuple[list[int], int]:
    """Validate the rotation's arguments of mrope_write_kv_; returns (the three section sizes,
    rotary_dim)."""
    _check_heads("q", q)
    _check_heads("k", k)
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D or k.dtype != q.dtype:
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} must match q {tuple(q.shape)} {q.dtype} "
                         "in tokens, head_dim and dtype")
    check_head_dim("head_dim", D, 2)
    sections, rotary = _check_rotary(D, rotary_dim, mrope_section, interleaved)
    _check_positions(positions, (3, T), q)
    return sections, rotary


def mrope_write_kv_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    mrope_section: tuple[int, int, int] | list[int], theta: float,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, rotary_dim: int | None = None,
                    interleaved: bool = True) -> None:
    """In place: rotate the first rotary_dim dims of q [T, Hq, D] and k [T, Hkv, D] with 3D M-RoPE,
    then store the whole rotated k rows and v [T, Hkv, D] in the paged caches.

    q, k, v: same dtype, any token/head strides, head_dim contiguous (views into a packed q|k|v
    projection output are fine); D even, up to 256. q and k are rotated in place (prefill
    attention reads k from there). positions: [3, T] int32/int64 (t, h, w rows), any strides.
    rotary_dim: even, 2..D, None = D; dims [rotary_dim, D) of q and k are neither read nor written,
    those of k are copied into the cache. mrope_section: 3 section sizes summing to rotary_dim/2
    (GLM-OCR: [16, 24, 24] with D = rotary_dim = 128; GLM-Image: [8, 12, 12] with D = 128,
    rotary_dim = 64). Frequency j = theta^(-2j/rotary_dim) turns by pos[row(j)]; interleaved=True
    rotates the pair (2j, 2j+1) (GPT-J, GLM-OCR), interleaved=False the dims (j, rotary_dim/2 + j)
    (NeoX rotate_half, GLM-Image).
    k_cache, v_cache: [num_blocks, block_size, Hkv, D], D contiguous; token t goes to slot
    slot_mapping[t] (contiguous int32/int64, -1 = skip) = block * block_size + offset.
    Reads no device tensor on the host, so it can be captured in a CUDA graph, after a first call
    per (theta, rotary_dim, device), which uploads the frequency table.
    """
    sections, rotary = _check_mrope(q, k, positions, mrope_section, rotary_dim, interleaved)
    check_kv_write(k, v, k_cache, v_cache, slot_mapping)
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0:
        return
    block_hq = triton.next_power_of_2(HQ)
    block_half = triton.next_power_of_2(rotary // 2)
    block_t, num_warps = _tile(T, block_hq, 2 * block_half)
    _mrope_write_kv_kernel[(triton.cdiv(T, block_t),)](
        q, k, v, positions, _inv_freq(float(theta), rotary, q.device), k_cache, v_cache,
        slot_mapping,
        T, HQ, HK,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        positions.stride(0), positions.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=D, HALF=rotary // 2, SEC_T=sections[0], SEC_TH=sections[0] + sections[1],
        INTERLEAVED=interleaved, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(HK),
        BLOCK_HALF=block_half, BLOCK_PASS=triton.next_power_of_2(D - rotary) if rotary < D else 1,
        BLOCK_D=triton.next_power_of_2(D), num_warps=num_warps,
    )


def mrope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
              mrope_section: tuple[int, int, int] | list[int], theta: float = 10000.0,
              rotary_dim: int | None = None, interleaved: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of `mrope_write_kv_` in plain torch: transformers' text rotary embedding +
    apply_rotary_pos_emb, GlmOcr's (interleaved=True) or GlmImage's (interleaved=False).
    q [T, Hq, D], k [T, Hk, D], positions [3, T]; returns new (q, k), dims [rotary_dim, D) copied
    unchanged."""
    D = q.shape[-1]
    sections, rotary = _check_rotary(D, rotary_dim, mrope_section, interleaved)
    freqs = positions[..., None].float() * _inv_freq(float(theta), rotary, q.device)  # [3, T, R/2]
    # [T, R/2]: section i of the frequencies turns by position row i
    freqs = torch.cat([f[i] for i, f in enumerate(freqs.split(sections, dim=-1))], dim=-1)
    cos, sin = freqs.cos().to(q.dtype).float(), freqs.sin().to(q.dtype).float()
    if interleaved:  # frequency j on dims (2j, 2j+1)
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    else:  # frequency j on dims j and R/2 + j
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, R]

    def rope(x: torch.Tensor) -> torch.Tensor:  # x * cos + rotate(x) * sin, rounded like x's dtype
        xf = x[..., :rotary].float()
        if interleaved:
            rotated = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            rotated = torch.cat((-x2, x1), dim=-1)
        out = ((xf * cos).to(x.dtype).float() + (rotated * sin).to(x.dtype).float()).to(x.dtype)
        return torch.cat([out, x[..., rotary:]], dim=-1)

    return rope(q), rope(k)


def mrope_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       mrope_section: tuple[int, int, int] | list[int], theta: float,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       rotary_dim: int | None = None, interleaved: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `mrope_write_kv_`: returns (rotated q, rotated k, new k_cache, new
    v_cache), the inputs left untouched (`mrope_ref` then `write_kv_cache_ref`)."""
    q_rot, k_rot = mrope_ref(q, k, positions, mrope_section, theta, rotary_dim, interleaved)
    k_out, v_out = write_kv_cache_ref(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot, k_rot, k_out, v_out
