"""SwiGLU (silu_and_mul) and the merger's LayerNorm + exact GELU against the eager torch ops."""
import pytest
import torch

from glmrt.kernels.activation import (
    layer_norm_gelu,
    layer_norm_gelu_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from glmrt_testing.hopper import compile_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def _tol(dtype: torch.dtype) -> dict:
    # exp/erf differ from torch's by an ulp in fp32; in fp16/bf16 that flips at most one rounding
    # of the intermediate (silu(gate) or the LayerNorm output) and one of the result
    return {torch.float32: dict(atol=1e-6, rtol=2e-6),
            torch.float16: dict(atol=1e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}[dtype]


def _strided_rows(n: int, d: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0,
                  shift: float = 0.0) -> torch.Tensor:
    """[n, d] rows with row stride 3d: the middle slice of a packed [n, 3, d] tensor."""
    packed = torch.randn(n, 3, d, generator=gen, device=gen.device) * scale + shift
    return packed.to(dtype).to(DEVICE)[:, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,inter", [(1, 20), (7, 1100), (3, 4608)])
def test_silu_and_mul_matches_reference(dtype, rows, inter):
    gen = torch.Generator().manual_seed(rows + inter)
    x = _strided_rows(rows, 2 * inter, dtype, gen, scale=4.0)
    out = silu_and_mul(x)
    ref = silu_and_mul_ref(x)
    assert out.shape == (rows, inter) and out.is_contiguous()
    torch.testing.assert_close(out, ref, **_tol(dtype))
    if dtype == torch.float16:
        assert (out == ref).float().mean() > 0.99


def test_silu_and_mul_leading_dims_and_empty():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 96, generator=gen).to(DEVICE)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **_tol(torch.float32))
    assert silu_and_mul(torch.zeros(0, 96, device=DEVICE)).shape == (0, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,d", [(1, 40), (9, 1536), (5, 1000)])
def test_layer_norm_gelu_matches_reference(dtype, rows, d):
    gen = torch.Generator().manual_seed(rows * d)
    x = _strided_rows(rows, d, dtype, gen, scale=3.0, shift=1.5)  # a mean far from 0
    w = (1.0 + 0.5 * torch.randn(d, generator=gen)).to(dtype).to(DEVICE)
    b = (0.5 * torch.randn(d, generator=gen)).to(dtype).to(DEVICE)
    out = layer_norm_gelu(x, w, b, EPS)
    ref = layer_norm_gelu_ref(x, w, b, EPS)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, **_tol(dtype))
    if dtype == torch.float16:
        # Bit-equal to the module (LayerNorm rounded to fp16, then GELU) except in GELU's far
        # negative tail, where 1 + erf(y / sqrt 2) cancels and fp32 erf implementations (torch's
        # AVX2 and AVX-512 paths, CUDA's) differ by a few ulps.
        tail = torch.nn.functional.layer_norm(x, (d,), w, b, EPS) < -3
        assert (out == ref)[~tail].float().mean() > 0.99


def test_rejects_bad_arguments():
    x = torch.randn(4, 40, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(4, 41, device=DEVICE))
    with pytest.raises(ValueError, match="last dim"):
        silu_and_mul(x.t())
    with pytest.raises(ValueError, match="bias"):
        layer_norm_gelu(x, torch.ones(40, device=DEVICE), torch.zeros(39, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="weight"):
        layer_norm_gelu(x, torch.ones(40, device=DEVICE).half(), torch.zeros(40, device=DEVICE), EPS)


# ----------------------------------------------------------------------------- sm_90 compile


def test_activation_kernels_compile_for_sm90():
    specs = []
    for dtype in ("fp16", "bf16"):
        for block_n in (32, 1024):
            sig = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "I": "i32", "stride_x": "i32",
                   "stride_out": "i32", "BLOCK_N": "constexpr"}
            specs.append(("glmrt.kernels.activation", "_silu_and_mul_kernel", sig,
                          dict(BLOCK_N=block_n)))
        for block in (64, 2048):
            sig = {n: f"*{dtype}" for n in ("x_ptr", "w_ptr", "b_ptr", "out_ptr")}
            sig.update({"stride_x": "i32", "stride_out": "i32", "D": "i32", "eps": "fp32",
                        "BLOCK": "constexpr"})
            specs.append(("glmrt.kernels.activation", "_layer_norm_gelu_kernel", sig,
                          dict(BLOCK=block)))
    compile_for_hopper(specs)


# ----------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
def test_activation_bf16_real_sizes():
    gen = torch.Generator(DEVICE).manual_seed(2)  # draws the large inputs on the GPU
    dt = torch.bfloat16
    # vision MLP: 24,576 patches, intermediate 4096; text MLP and merger: intermediate 4608
    for rows, inter in ((24576, 4096), (6144, 4608), (1, 4608)):
        x = _strided_rows(rows, 2 * inter, dt, gen, scale=4.0)
        out, ref = silu_and_mul(x), silu_and_mul_ref(x)
        torch.testing.assert_close(out, ref, **_tol(dt))
        assert (out == ref).float().mean() > 0.99
    # merger: 6,144 merged tokens x 1536
    x = _strided_rows(6144, 1536, dt, gen, scale=3.0, shift=1.5)
    w = (1.0 + 0.5 * torch.randn(1536, generator=gen, device=DEVICE)).to(dt)
    b = (0.5 * torch.randn(1536, generator=gen, device=DEVICE)).to(dt)
    out, ref = layer_norm_gelu(x, w, b, EPS), layer_norm_gelu_ref(x, w, b, EPS)
    torch.testing.assert_close(out, ref, **_tol(dt))
    assert (out == ref).float().mean() > 0.99
