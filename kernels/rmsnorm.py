"""RMSNorm over the last dim, alone, with a fused residual add, and GLM's fused "sandwich" step.

Rounding mirrors transformers' GlmOcrRMSNorm in bf16/fp16: statistics in fp32, x * rsqrt(mean(x^2)
+ eps) rounded to the activation dtype, THEN times the weight (a dtype product, rounded again).
A residual sum is rounded to the dtype before it is normalised, exactly as the eager model adds.

One program per row: rows are at most 1536 wide (text) / 1024 (vision) / 64 (per-head q/k), so a
whole row sits in registers and is read from memory once. Rows may be strided views (e.g. the q
slice of a packed qkv output): x is addressed as [A, B, D] with two row strides, D contiguous.
Outputs are fresh contiguous tensors.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _row_offset(row, n_inner, stride_a, stride_b):
    # row of a logical [A, B] grid of rows -> element offset of its first element
    row = row.to(tl.int64)
    return (row // n_inner) * stride_a + (row % n_inner) * stride_b


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    n_inner, stride_xa, stride_xb, stride_ra, stride_rb, D, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    # x, residual [A, B, D] strided rows; out, sum [A * B, D] contiguous; w [D]
    row = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + _row_offset(row, n_inner, stride_xa, stride_xb) + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + _row_offset(row, n_inner, stride_ra, stride_rb) + cols, mask=mask,
                    other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row.to(tl.int64) * D + cols, x, mask=mask)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    y = w * (x * rstd).to(dtype).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * D + cols, y.to(dtype), mask=mask)


@triton.jit
def _sandwich_rms_norm_kernel(
    branch_ptr, res_ptr, post_w_ptr, pre_w_ptr, out_ptr, sum_ptr,
    n_inner, stride_ba, stride_bb, stride_ra, stride_rb, D, eps,
    BLOCK: tl.constexpr,
):
    # s = residual + post_w * rms(branch); out = pre_w * rms(s); every step rounded to the dtype
    row = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    b = tl.load(branch_ptr + _row_offset(row, n_inner, stride_ba, stride_bb) + cols, mask=mask,
                other=0.0).to(tl.float32)
    r = tl.load(res_ptr + _row_offset(row, n_inner, stride_ra, stride_rb) + cols, mask=mask,
                other=0.0).to(tl.float32)
    post_w = tl.load(post_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pre_w = tl.load(pre_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd_b = tl.math.rsqrt(tl.sum(b * b, axis=0) / D + eps)
    n = (post_w * (b * rstd_b).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    s = (r + n).to(dtype)
    tl.store(sum_ptr + row.to(tl.int64) * D + cols, s, mask=mask)
    s = s.to(tl.float32)
    rstd_s = tl.math.rsqrt(tl.sum(s * s, axis=0) / D + eps)
    out = pre_w * (s * rstd_s).to(dtype).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * D + cols, out.to(dtype), mask=mask)


def check_rows(name: str, x: torch.Tensor) -> None:
    """A row-wise kernel's input: [..., N] fp32/fp16/bf16, contiguous in its last dim."""
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dim, got a scalar")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be fp32, fp16 or bf16, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {x.stride()}")


def _as_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> a [A, B, D] view (a copy only if the leading dims cannot be viewed that way)."""
    check_rows(name, x)
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor, x_name: str) -> None:
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} {t.device} must match "
                         f"{x_name} {tuple(x.shape)} {x.dtype} {x.device}")


def _check_weight(name: str, w: torch.Tensor, x: torch.Tensor) -> None:
    D = x.shape[-1]
    if w.shape != (D,) or w.stride(0) != 1 or w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"{name} must be a contiguous [{D}] {x.dtype} tensor on {x.device}, got "
                         f"{tuple(w.shape)} {w.dtype} {w.device}")


def _launch_params(D: int) -> tuple[int, int]:
    block = triton.next_power_of_2(D)
    # ~8 elements per thread: enough loads in flight per row, no register spills up to D = 2048
    return block, min(max(block // 256, 1), 8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x [..., D] (any leading shape, rows may be strided).

    Without residual: returns weight * rms(x), contiguous, shaped like x.
    With residual (same shape/dtype as x): s = x + residual; returns (weight * rms(s), s).
    """
    rows = _as_rows("x", x)
    _check_weight("weight", weight, x)
    A, B, D = rows.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        res_rows, total = rows, out
    else:
        _check_like("residual", residual, x, "x")
        res_rows = _as_rows("residual", residual)
        total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if A * B > 0:
        block, num_warps = _launch_params(D)
        _rms_norm_kernel[(A * B,)](
            rows, res_rows, weight, out, total,
            B, rows.stride(0), rows.stride(1), res_rows.stride(0), res_rows.stride(1), D, float(eps),
            BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps,
        )
    return out if residual is None else (out, total)


def sandwich_rms_norm(branch: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                      pre_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM's sandwich step in one pass: s = residual + rms(branch) * post_weight;
    returns (rms(s) * pre_weight, s). branch, residual: [..., D], same shape and dtype."""
    b_rows = _as_rows("branch", branch)
    _check_like("residual", residual, branch, "branch")
    r_rows = _as_rows("residual", residual)
    _check_weight("post_weight", post_weight, branch)
    _check_weight("pre_weight", pre_weight, branch)
    A, B, D = b_rows.shape
    out = torch.empty(branch.shape, dtype=branch.dtype, device=branch.device)
    total = torch.empty(branch.shape, dtype=branch.dtype, device=branch.device)
    if A * B > 0:
        block, num_warps = _launch_params(D)
        _sandwich_rms_norm_kernel[(A * B,)](
            b_rows, r_rows, post_weight, pre_weight, out, total,
            B, b_rows.stride(0), b_rows.stride(1), r_rows.stride(0), r_rows.stride(1), D, float(eps),
            BLOCK=block, num_warps=num_warps,
        )
    return out, total


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `rms_norm` (GlmOcrRMSNorm.forward, after an eager residual add)."""
    if residual is not None:
        x = x + residual
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


def sandwich_rms_norm_ref(branch: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                          pre_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `sandwich_rms_norm` (GlmOcrTextDecoderLayer's post-norm, add, pre-norm)."""
    total = residual + rms_norm_ref(branch, post_weight, eps)
    return rms_norm_ref(total, pre_weight, eps), total
