"""RMSNorm, fused residual RMSNorm and the sandwich step against transformers' rounding."""
import pytest
import torch

from glmrt.kernels.rmsnorm import rms_norm, rms_norm_ref, sandwich_rms_norm, sandwich_rms_norm_ref
from glmrt_testing.hopper import compile_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# fp32: the row sum's order and rsqrt differ from torch's by an ulp or two, then scale the output;
# fp16/bf16: the fp32 statistics agree to far below the dtype's ulp, so at most one rounding flips.
MAX_ULPS = {torch.float32: 4, torch.float16: 1, torch.bfloat16: 1}


def _max_ulps(out: torch.Tensor, ref: torch.Tensor, per_row: bool = False) -> float:
    """Largest |out - ref| in units of ref's last place (no NaN allowed in out); per_row measures
    in the last place of the row's largest |ref|, for sums where the addends may cancel."""
    assert out.shape == ref.shape and out.dtype == ref.dtype and not out.isnan().any()
    finfo = torch.finfo(ref.dtype)
    ref64 = ref.double()
    mag = ref64.abs().amax(-1, keepdim=True) if per_row else ref64.abs()
    ulp = torch.exp2(torch.floor(torch.log2(mag.clamp_min(finfo.tiny)))) * finfo.eps
    return ((out.double() - ref64).abs() / ulp).max().item()


def _strided_rows(n: int, d: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0):
    """[n, d] rows with row stride 3d: the middle slice of a packed [n, 3, d] tensor."""
    packed = (torch.randn(n, 3, d, generator=gen) * scale).to(dtype).to(DEVICE)
    return packed[:, 1]


def _weight(d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (1.0 + 0.5 * torch.randn(d, generator=gen)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,d", [(1, 40), (37, 96), (5, 1536), (19, 64)])
def test_rms_norm_matches_reference(dtype, rows, d):
    gen = torch.Generator().manual_seed(rows * d)
    x = _strided_rows(rows, d, dtype, gen, scale=3.0)
    assert x.stride(0) == 3 * d
    w = _weight(d, dtype, gen)
    out = rms_norm(x, w, EPS)
    ref = rms_norm_ref(x, w, EPS)
    assert out.is_contiguous()
    assert _max_ulps(out, ref) <= MAX_ULPS[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,d", [(1, 40), (37, 96), (5, 1536)])
def test_rms_norm_with_residual_matches_reference(dtype, rows, d):
    gen = torch.Generator().manual_seed(7 + rows * d)
    x = _strided_rows(rows, d, dtype, gen)
    residual = _strided_rows(rows, d, dtype, gen, scale=4.0)
    w = _weight(d, dtype, gen)
    out, total = rms_norm(x, w, EPS, residual=residual)
    ref, ref_total = rms_norm_ref(x, w, EPS, residual=residual)
    assert torch.equal(total, ref_total)  # one dtype add: bit-exact
    assert _max_ulps(out, ref) <= MAX_ULPS[dtype]


def test_rms_norm_per_head_rows():
    # the vision q/k use: [S, H, 64] heads sliced out of a packed [S, 3, H, 64] qkv output
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(13, 3, 5, 64, generator=gen).to(torch.float16).to(DEVICE)
    q = qkv[:, 0]
    w = _weight(64, torch.float16, gen)
    out = rms_norm(q, w, EPS)
    assert out.shape == q.shape
    assert _max_ulps(out, rms_norm_ref(q, w, EPS)) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,d", [(1, 40), (37, 96), (3, 1536)])
def test_sandwich_matches_reference(dtype, rows, d):
    gen = torch.Generator().manual_seed(11 + rows * d)
    branch = _strided_rows(rows, d, dtype, gen, scale=5.0)
    residual = _strided_rows(rows, d, dtype, gen, scale=2.0)
    post_w, pre_w = _weight(d, dtype, gen), _weight(d, dtype, gen)
    out, total = sandwich_rms_norm(branch, residual, post_w, pre_w, EPS)
    # one pass computes exactly what the unfused kernels compute in three
    unfused_total = residual + rms_norm(branch, post_w, EPS)
    assert torch.equal(total, unfused_total)
    assert torch.equal(out, rms_norm(unfused_total, pre_w, EPS))
    ref, ref_total = sandwich_rms_norm_ref(branch, residual, post_w, pre_w, EPS)
    # s = residual + n can cancel: measure in the row's largest place; a flipped s rounding then
    # moves rms(s) as well
    assert _max_ulps(total, ref_total, per_row=True) <= MAX_ULPS[dtype]
    assert _max_ulps(out, ref, per_row=True) <= 2 * MAX_ULPS[dtype]


def test_fp16_results_are_almost_all_bit_exact():
    gen = torch.Generator().manual_seed(5)
    branch = _strided_rows(33, 1536, torch.float16, gen, scale=5.0)
    residual = _strided_rows(33, 1536, torch.float16, gen)
    post_w, pre_w = _weight(1536, torch.float16, gen), _weight(1536, torch.float16, gen)
    out, total = sandwich_rms_norm(branch, residual, post_w, pre_w, EPS)
    ref, ref_total = sandwich_rms_norm_ref(branch, residual, post_w, pre_w, EPS)
    assert (out == ref).float().mean() > 0.999 and (total == ref_total).float().mean() > 0.999
    plain = rms_norm(branch, post_w, EPS)
    assert (plain == rms_norm_ref(branch, post_w, EPS)).float().mean() > 0.999


def test_leading_dims_and_empty_input():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 40, generator=gen).to(DEVICE)
    w = _weight(40, torch.float32, gen)
    assert _max_ulps(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS)) <= MAX_ULPS[torch.float32]
    empty = torch.zeros(0, 40, device=DEVICE)
    assert rms_norm(empty, w, EPS).shape == (0, 40)
    out, total = sandwich_rms_norm(empty, empty, w, w, EPS)
    assert out.shape == total.shape == (0, 40)


def test_rejects_bad_arguments():
    x = torch.randn(4, 40, device=DEVICE)
    w = torch.ones(40, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(41, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w.half(), EPS)
    with pytest.raises(ValueError, match="last dim"):
        rms_norm(x.t(), torch.ones(4, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, EPS, residual=torch.randn(4, 41, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        sandwich_rms_norm(x, x.half(), w, w, EPS)
    with pytest.raises(ValueError, match="pre_weight"):
        sandwich_rms_norm(x, x, w, torch.ones(2, device=DEVICE), EPS)


# ----------------------------------------------------------------------------- sm_90 compile


def _rms_spec(dtype: str, block: int, has_residual: bool) -> tuple:
    sig = {n: f"*{dtype}" for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "sum_ptr")}
    sig.update({n: "i32" for n in ("n_inner", "stride_xa", "stride_xb", "stride_ra", "stride_rb", "D")})
    sig["eps"] = "fp32"
    consts = dict(BLOCK=block, HAS_RESIDUAL=has_residual)
    sig.update({n: "constexpr" for n in consts})
    return ("glmrt.kernels.rmsnorm", "_rms_norm_kernel", sig, consts)


def _sandwich_spec(dtype: str, block: int) -> tuple:
    sig = {n: f"*{dtype}" for n in ("branch_ptr", "res_ptr", "post_w_ptr", "pre_w_ptr", "out_ptr",
                                     "sum_ptr")}
    sig.update({n: "i32" for n in ("n_inner", "stride_ba", "stride_bb", "stride_ra", "stride_rb", "D")})
    sig["eps"] = "fp32"
    sig["BLOCK"] = "constexpr"
    return ("glmrt.kernels.rmsnorm", "_sandwich_rms_norm_kernel", sig, dict(BLOCK=block))


def test_rmsnorm_kernels_compile_for_sm90():
    specs = []
    for dtype in ("fp16", "bf16"):
        for block in (64, 1024, 2048):
            specs += [_rms_spec(dtype, block, False), _rms_spec(dtype, block, True)]
            specs.append(_sandwich_spec(dtype, block))
    compile_for_hopper(specs)


# ----------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
def test_rmsnorm_bf16_real_sizes():
    gen = torch.Generator().manual_seed(21)
    dt = torch.bfloat16
    # text decoder: 4096 prefill tokens x 1536, the sandwich step and the first input norm
    branch = _strided_rows(4096, 1536, dt, gen, scale=5.0)
    residual = _strided_rows(4096, 1536, dt, gen)
    post_w, pre_w = _weight(1536, dt, gen), _weight(1536, dt, gen)
    out, total = sandwich_rms_norm(branch, residual, post_w, pre_w, EPS)
    ref, ref_total = sandwich_rms_norm_ref(branch, residual, post_w, pre_w, EPS)
    assert torch.equal(total, residual + rms_norm(branch, post_w, EPS))
    assert _max_ulps(total, ref_total, per_row=True) <= 1 and _max_ulps(out, ref, per_row=True) <= 2
    assert (out == ref).float().mean() > 0.99
    assert _max_ulps(rms_norm(residual, pre_w, EPS), rms_norm_ref(residual, pre_w, EPS)) <= 1
    # vision: 24,576 patches x 1024 with the residual add; per-head q norm [S, 16, 64]
    x = _strided_rows(24576, 1024, dt, gen)
    res = torch.randn(24576, 1024, generator=gen).to(dt).to(DEVICE)
    w = _weight(1024, dt, gen)
    out, total = rms_norm(x, w, EPS, residual=res)
    ref, ref_total = rms_norm_ref(x, w, EPS, residual=res)
    assert torch.equal(total, ref_total) and _max_ulps(out, ref) <= 1
    q = torch.randn(24576, 3, 16, 64, generator=gen).to(dt).to(DEVICE)[:, 0]
    qw = _weight(64, dt, gen)
    assert _max_ulps(rms_norm(q, qw, EPS), rms_norm_ref(q, qw, EPS)) <= 1
