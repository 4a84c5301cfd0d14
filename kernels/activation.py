"""Activations of GLM-OCR's MLPs: SwiGLU over a fused gate|up output, and the merger's LayerNorm + GELU.

Rounding mirrors the eager torch ops in bf16/fp16: each op computes in fp32 and rounds its own
output to the activation dtype, so silu(gate) is rounded before the product with up, and the
LayerNorm output is rounded before GELU.
"""
import torch
import triton
import triton.language as tl

from .rmsnorm import check_rows

# Columns per program of silu_and_mul: the intermediate width (4096 vision, 4608 merger) is split
# into several tiles so that a one-row decode step still spreads over a few SMs.
_SILU_BLOCK_N = 1024


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, I, stride_x, stride_out,
    BLOCK_N: tl.constexpr,
):
    # grid (rows, cdiv(I, BLOCK_N)); x [rows, 2I] = gate | up; out [rows, I]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < I
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(dtype), mask=mask)


@triton.jit
def _layer_norm_gelu_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, stride_x, stride_out, D, eps,
    BLOCK: tl.constexpr,
):
    # one program per row of x [rows, D]: out = gelu_erf(round(layer_norm(x) * w + b))
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (xc * rstd * w + b).to(dtype).to(tl.float32)
    out = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    tl.store(out_ptr + row * stride_out + cols, out.to(dtype), mask=mask)


def _as_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> a [rows, N] view (a copy only if the leading dims cannot be flattened)."""
    check_rows(name, x)
    return x.reshape(-1, x.shape[-1])


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (gate | up halves, rows may be strided) -> silu(gate) * up [..., I], contiguous."""
    rows = _as_rows("x", x)
    if rows.shape[1] % 2:
        raise ValueError(f"x's last dim must be even (gate | up), got {x.shape[-1]}")
    I = rows.shape[1] // 2
    out = torch.empty((*x.shape[:-1], I), dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        block_n = min(triton.next_power_of_2(I), _SILU_BLOCK_N)
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(I, block_n))](
            rows, out, I, rows.stride(0), I, BLOCK_N=block_n, num_warps=4,
        )
    return out


def layer_norm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """Exact (erf) GELU of LayerNorm(x) over the last dim with affine weight/bias [D]; x [..., D]."""
    rows = _as_rows("x", x)
    D = rows.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (D,) or t.stride(0) != 1 or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must be a contiguous [{D}] {x.dtype} tensor on {x.device}, "
                             f"got {tuple(t.shape)} {t.dtype} {t.device}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        block = triton.next_power_of_2(D)
        _layer_norm_gelu_kernel[(rows.shape[0],)](
            rows, weight, bias, out, rows.stride(0), D, D, float(eps),
            BLOCK=block, num_warps=min(max(block // 256, 1), 8),
        )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of `silu_and_mul` (the eager SwiGLU of GlmOcr's MLPs)."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def layer_norm_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """Plain-torch twin of `layer_norm_gelu` (GlmOcr's merger: nn.LayerNorm then nn.GELU())."""
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return torch.nn.functional.gelu(h)
