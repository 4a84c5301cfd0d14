"""norm_linear (the input norm or sandwich step, the GEMM and SwiGLU in one launch) against the
unfused chain of reference ops."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from glmrt.kernels import linear
from glmrt.kernels.activation import silu_and_mul_ref
from glmrt.kernels.linear import MAX_FUSED_ROWS, norm_linear, norm_linear_ref
from glmrt.kernels.rmsnorm import rms_norm_ref, sandwich_rms_norm_ref
from glmrt_testing.hopper import compile_for_hopper, hopper_resources

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# y: fp32 sums in another order than torch's GEMM (and rstd an ulp off) move fp32 results by a
# few ulps of the row's scale; in fp16 they flip at most one rounding of h, y, silu(gate) or the
# product. r (the residual stream) as in test_rmsnorm: ulps of the row's largest element.
Y_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=4e-3),
         torch.bfloat16: dict(atol=1.6e-2, rtol=3.2e-2)}
R_ULPS = {torch.float32: 4, torch.float16: 1, torch.bfloat16: 1}


def _row_ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| in units of the last place of the row's largest |ref| (no NaN in out)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype and not out.isnan().any()
    finfo = torch.finfo(ref.dtype)
    mag = ref.double().abs().amax(-1, keepdim=True).clamp_min(finfo.tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * finfo.eps
    return ((out.double() - ref.double()).abs() / ulp).max().item()


def _strided_rows(m: int, k: int, dtype: torch.dtype, gen: torch.Generator, scale: float):
    """[m, k] rows with row stride 3k: the middle slice of a packed [m, 3, k] tensor."""
    packed = torch.randn(m, 3, k, generator=gen, device=gen.device) * scale
    return packed.to(dtype).to(DEVICE)[:, 1]


def _problem(m: int, k: int, n: int, dtype: torch.dtype, residual: bool, bias: bool,
             gen: torch.Generator) -> dict:
    """norm_linear's arguments: a strided branch x (and residual), norm weights near 1, a weight
    scaled so that y ~ N(0, 1)."""
    t = lambda *shape, scale=1.0, shift=0.0: (  # noqa: E731
        torch.randn(*shape, generator=gen, device=gen.device) * scale + shift).to(dtype).to(DEVICE)
    return dict(x=_strided_rows(m, k, dtype, gen, 3.0), weight=t(n, k, scale=k**-0.5),
                pre_weight=t(k, scale=0.5, shift=1.0), eps=EPS,
                residual=_strided_rows(m, k, dtype, gen, 2.0) if residual else None,
                post_weight=t(k, scale=0.5, shift=1.0) if residual else None,
                bias=t(n, scale=0.5) if bias else None)


# (K, N): ragged K and N tiles (32 columns), one K chunk and several (fp32 chunks are 64 wide,
# fp16 256), norm passes over one tile and several (16 rows take 256 columns a tile). N is even
# for SwiGLU (I = N / 2 odd), one less (odd) without.
_SHAPES = {torch.float32: [(199, 74), (40, 298)], torch.float16: [(300, 74), (57, 246)]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("residual,bias,silu", [
    (False, False, False), (False, True, True), (True, False, False), (True, True, False),
    (True, False, True), (True, True, True)])
def test_norm_linear_matches_reference(dtype, m, residual, bias, silu):
    for i, (k, n) in enumerate(_SHAPES[dtype]):
        n = n if silu else n - 1
        gen = torch.Generator().manual_seed(1000 * m + 100 * i + 4 * residual + 2 * bias + silu)
        args = _problem(m, k, n, dtype, residual, bias, gen)
        y, r = norm_linear(**args, silu_and_mul=silu)
        ref_y, ref_r = norm_linear_ref(**args, silu_and_mul=silu)
        assert y.shape == (m, n // 2 if silu else n) and y.is_contiguous()
        torch.testing.assert_close(y, ref_y, **Y_TOL[dtype])  # NaN (an unwritten element) fails
        if residual:
            assert r.shape == (m, k) and r.is_contiguous()
            assert _row_ulps(r, ref_r) <= R_ULPS[dtype]
        else:
            assert r is args["x"]
        if dtype == torch.float16:
            # the same roundings as the unfused ops, so almost every element is bit-equal
            assert (y == ref_y).float().mean() > 0.98 and (r == ref_r).float().mean() > 0.99


def test_every_row_count_up_to_the_limit():
    # rows 2..16 cover every padded norm tile (NORM_M 2, 4, 8, 16) and the masked MMA rows
    gen = torch.Generator().manual_seed(3)
    for m in range(2, MAX_FUSED_ROWS + 1):
        args = _problem(m, 72, 40, torch.float16, True, False, gen)
        y, r = norm_linear(**args)
        ref_y, ref_r = norm_linear_ref(**args)
        torch.testing.assert_close(y, ref_y, **Y_TOL[torch.float16])
        assert _row_ulps(r, ref_r) <= 1


@pytest.mark.parametrize("silu", [False, True])
def test_one_output_column(silu):
    gen = torch.Generator().manual_seed(8)
    args = _problem(2, 40, 2 if silu else 1, torch.float32, True, True, gen)
    y, r = norm_linear(**args, silu_and_mul=silu)
    ref_y, ref_r = norm_linear_ref(**args, silu_and_mul=silu)
    torch.testing.assert_close(y, ref_y, **Y_TOL[torch.float32])
    assert y.shape == (2, 1) and _row_ulps(r, ref_r) <= R_ULPS[torch.float32]


def test_empty_input():
    gen = torch.Generator().manual_seed(4)
    args = _problem(0, 40, 24, torch.float32, True, True, gen)
    y, r = norm_linear(**args, silu_and_mul=True)
    assert y.shape == (0, 12) and r.shape == (0, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_the_unfused_chain(dtype):
    # the reference ops of the unfused layer, one after another: norm or sandwich step, F.linear,
    # SwiGLU
    gen = torch.Generator().manual_seed(5)
    for residual in (False, True):
        for bias in (False, True):
            a = _problem(5, 48, 32, dtype, residual, bias, gen)
            if residual:
                h, r = sandwich_rms_norm_ref(a["x"], a["residual"], a["post_weight"],
                                             a["pre_weight"], EPS)
            else:
                h, r = rms_norm_ref(a["x"], a["pre_weight"], EPS), a["x"]
            y = F.linear(h, a["weight"], a["bias"])
            ref_y, ref_r = norm_linear_ref(**a)
            assert torch.equal(ref_y, y) and torch.equal(ref_r, r)
            ref_y, ref_r = norm_linear_ref(**a, silu_and_mul=True)
            assert torch.equal(ref_y, silu_and_mul_ref(y)) and torch.equal(ref_r, r)


def test_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(6)
    a = _problem(4, 40, 24, torch.float32, True, True, gen)

    def call(**changes):
        norm_linear(**{**a, **changes})

    cases = [
        (dict(x=a["x"][0]), "x must be \\[M, K\\]"),
        (dict(x=torch.ones(4, 40, 2, device=DEVICE)[..., 0]), "x must be contiguous in its last"),
        (dict(x=a["x"].half()), "weight"),
        (dict(x=torch.ones(4, 40, dtype=torch.int32, device=DEVICE)), "x must be fp32"),
        (dict(x=torch.ones(MAX_FUSED_ROWS + 1, 40, device=DEVICE), residual=None, post_weight=None),
         "MAX_FUSED_ROWS"),
        (dict(weight=a["weight"][:, :39]), "weight"),
        (dict(weight=a["weight"].half()), "weight"),
        (dict(weight=torch.ones(40, 24, device=DEVICE).t()), "weight"),
        (dict(weight=torch.ones(0, 40, device=DEVICE)), "weight"),
        (dict(pre_weight=a["pre_weight"][:39]), "pre_weight"),
        (dict(pre_weight=a["pre_weight"].half()), "pre_weight"),
        (dict(residual=a["residual"][:3]), "residual"),
        (dict(residual=torch.ones(4, 40, 2, device=DEVICE)[..., 0]), "residual must be contiguous"),
        (dict(post_weight=None), "post_weight is required"),
        (dict(residual=None), "post_weight .* needs a residual"),
        (dict(post_weight=torch.ones(41, device=DEVICE)), "post_weight"),
        (dict(bias=a["bias"][:23]), "bias"),
        (dict(silu_and_mul=True, weight=a["weight"][:23], bias=None), "even"),
    ]
    for changes, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**changes)
    with pytest.raises(ValueError, match="post_weight is required"):
        norm_linear_ref(**{**a, "post_weight": None})


# ----------------------------------------------------------------------------- sm_90 compile

# GLM-OCR's decode GEMMs behind a norm: qkv [4096, 1536] (with a bias: GLM-Image's layout) and
# gate_up [9216, 1536] with SwiGLU; the first layer's qkv reads input_norm(x), no residual.
_GLM_OCR_CASES = [  # (rows, residual, bias, silu, N)
    (m, residual, bias, silu, n) for m in (1, 16) for residual, bias, silu, n in (
        (False, False, False, 4096), (True, False, False, 4096), (True, True, False, 4096),
        (True, False, True, 9216))]
_PATTERNS = ["cp.async.cg", "mma.sync"]


def _spec(dtype: str, m: int, k: int, residual: bool, bias: bool, silu: bool,
          batch_invariant: bool = False, norm: bool = True) -> tuple:
    """(module, kernel, signature, constexprs, options) as norm_linear (norm=False: linear)
    launches it on a GPU."""
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    cfg = linear._launch_config(m, k, 4096, torch_dtype, silu, batch_invariant)
    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    sig = {n: f"*{dtype}" for n in ("x_ptr", "res_ptr", "post_w_ptr", "pre_w_ptr", "w_ptr",
                                     "bias_ptr", "y_ptr", "r_ptr")}
    sig.update({n: "i32" for n in ("M", "N_OUT", "stride_x", "stride_res", "stride_w", "stride_y",
                                   "stride_r")})
    sig["eps"] = "fp32"
    consts = dict(K=k, HAS_NORM=norm, HAS_RESIDUAL=residual, HAS_BIAS=bias, SILU=silu,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **cfg)
    sig.update({n: "constexpr" for n in consts})
    return "glmrt.kernels.linear", "_norm_linear_kernel", sig, consts, options


def test_norm_linear_compiles_for_sm90():
    # the paths GLM-OCR does not take at its shapes: fp16/fp32, ragged K, odd row counts
    specs = [_spec("fp16", 3, 1536, True, True, True), _spec("fp16", 8, 200, False, False, False),
             _spec("fp32", 16, 200, True, False, True)]
    one_column = _spec("fp32", 1, 72, False, True, False)  # N_OUT == 1: a constexpr too
    one_column[2]["N_OUT"], one_column[3]["N_OUT"] = "constexpr", 1
    # batch-invariant: any M (not a constexpr past 1), with the norm and as a plain GEMM
    invariant = [_spec("fp16", 100, 200, True, False, True, batch_invariant=True),
                 _spec("bf16", 37, 1536, False, True, False, batch_invariant=True, norm=False)]
    compile_for_hopper([spec[:4] for spec in specs + [one_column] + invariant])


def test_glm_ocr_decode_configs_fit_sm90():
    # What the kernel's speed rests on and the interpreter cannot show: weight (and activation)
    # chunks copied ahead of use by cp.async, tensor-core MMAs, no register spills, and two
    # programs per SM (gate_up's 144 programs must not run in two waves on 132 SMs).
    specs = [(*_spec("bf16", m, 1536, residual, bias, silu), _PATTERNS)
             for m, residual, bias, silu, _ in _GLM_OCR_CASES]
    # one compiling subprocess per half (ptxas is single-threaded)
    with ThreadPoolExecutor(2) as pool:
        halves = pool.map(hopper_resources, (specs[::2], specs[1::2]))
    results = [r for half in halves for r in half]
    cases = _GLM_OCR_CASES[::2] + _GLM_OCR_CASES[1::2]
    for (m, residual, bias, silu, n), r in zip(cases, results):
        block_n = linear._launch_config(m, 1536, n, torch.bfloat16, silu)["BLOCK_N"]
        r.update(rows=m, residual=residual, bias=bias, silu=silu, N=n,
                 programs=-(-(n // 2 if silu else n) // block_n))
        assert r["spills"] == 0, f"registers spill: {r}"
        assert r["cp.async.cg"] > 0 and r["mma.sync"] > 0, f"not pipelined / no MMA: {r}"
        assert 2 * r["regs"] * r["threads"] <= 65536, f"2 programs do not fit the registers: {r}"
        assert 2 * (r["shared"] + 1024) <= 228 * 1024, f"2 programs do not fit shared memory: {r}"
        assert 128 <= r["programs"] <= 2 * 132, f"programs do not fill the 132 SMs once: {r}"


# ----------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16])
def test_norm_linear_bf16_real_sizes(m):
    gen = torch.Generator(DEVICE).manual_seed(m)
    dt = torch.bfloat16
    for residual, bias, silu, n in ((False, False, False, 4096), (True, True, False, 4096),
                                    (True, False, True, 9216)):
        args = _problem(m, 1536, n, dt, residual, bias, gen)
        y, r = norm_linear(**args, silu_and_mul=silu)
        ref_y, ref_r = norm_linear_ref(**args, silu_and_mul=silu)
        torch.testing.assert_close(y, ref_y, **Y_TOL[dt])
        assert (y == ref_y).float().mean() > 0.9
        assert _row_ulps(r, ref_r) <= R_ULPS[dt]


@pytest.mark.gpu
def test_norm_linear_cuda_graph_replay():
    # captured once, replayed on new inputs: the launcher reads nothing from the device
    gen = torch.Generator(DEVICE).manual_seed(7)
    args = _problem(4, 1536, 9216, torch.bfloat16, True, False, gen)
    norm_linear(**args, silu_and_mul=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, r = norm_linear(**args, silu_and_mul=True)
    fresh = _problem(4, 1536, 9216, torch.bfloat16, True, False, gen)
    for name in ("x", "residual"):
        args[name].copy_(fresh[name])
    graph.replay()
    ref_y, ref_r = norm_linear_ref(**args, silu_and_mul=True)
    torch.testing.assert_close(y, ref_y, **Y_TOL[torch.bfloat16])
    assert _row_ulps(r, ref_r) <= 1


# ----------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("silu,bias,residual", [(False, True, True), (True, False, False)])
def test_batch_invariant_norm_linear_rows_do_not_depend_on_m(dtype, silu, bias, residual):
    """Any M (past MAX_FUSED_ROWS, ragged row blocks): each row bit for bit what it is alone or in
    any other batch, and the reference's within rounding."""
    k, n = _SHAPES[dtype][0]
    n += silu and n % 2
    args = _problem(100, k, n, dtype, residual, bias, torch.Generator().manual_seed(11))
    full_y, full_r = norm_linear(**args, silu_and_mul=silu, batch_invariant=True)
    ref_y, ref_r = norm_linear_ref(**args, silu_and_mul=silu)
    torch.testing.assert_close(full_y, ref_y, **Y_TOL[dtype])
    assert _row_ulps(full_r, ref_r) <= R_ULPS[dtype]
    for lo, hi in ((0, 1), (5, 6), (0, 15), (3, 20), (40, 100), (99, 100)):
        part = {name: (v[lo:hi] if name in ("x", "residual") and v is not None else v)
                for name, v in args.items()}
        y, r = norm_linear(**part, silu_and_mul=silu, batch_invariant=True)
        assert torch.equal(y, full_y[lo:hi]) and torch.equal(r, full_r[lo:hi]), (lo, hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("silu,bias", [(False, True), (True, False)])
def test_linear_matches_reference_and_is_batch_invariant(dtype, silu, bias):
    gen = torch.Generator().manual_seed(12)
    k, n = _SHAPES[dtype][1]
    x = _strided_rows(70, k, dtype, gen, 1.0)
    weight = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype).to(DEVICE)
    b = (torch.randn(n, generator=gen) * 0.5).to(dtype).to(DEVICE) if bias else None
    full = linear.linear(x, weight, b, silu_and_mul=silu)
    torch.testing.assert_close(full, linear.linear_ref(x, weight, b, silu_and_mul=silu), **Y_TOL[dtype])
    for lo, hi in ((0, 1), (7, 8), (0, 17), (30, 70)):
        assert torch.equal(linear.linear(x[lo:hi], weight, b, silu_and_mul=silu), full[lo:hi]), (lo, hi)
    assert linear.linear(x[:0], weight, b).shape == (0, n)


def test_specialised_norm_tiles_follow_m():
    """Why batch_invariant exists: the decode-specialised configuration sums a row's rms over
    tiles whose width follows M, so past K 256 its bits can change with the batch."""
    one, seven = (linear._launch_config(m, 1536, 4096, torch.bfloat16, False) for m in (1, 7))
    assert one["NORM_K"] != seven["NORM_K"]
    for interpreter in (False, True):
        configs = [linear._launch_config(m, 1536, 4096, torch.bfloat16, False, True, interpreter)
                   for m in (1, 7, 16, 300)]
        assert all(c == configs[0] for c in configs)
