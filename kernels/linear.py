"""A decode-sized GEMM with the RMSNorm that feeds it fused into its prologue, and SwiGLU into its
epilogue: one launch where the unfused decoder layer runs two or three.

Every projection input of GLM's decoder layer comes out of a norm: the first layer's qkv GEMM
reads input_norm(x), every later GEMM after a branch reads the sandwich step
pre_norm(residual + post_norm(branch)), and gate_up's output goes through silu(gate) * up. At
decode (a few rows) each of those is a tiny launch between two weight-streaming GEMMs; here they
ride along with the GEMM:

    norm_linear(x, W, pre_w, eps)                    -> (h @ W^T, x),  h = pre_norm(x)
    norm_linear(x, W, pre_w, eps, residual, post_w)  -> (h @ W^T, r),  r = residual + post_norm(x),
                                                                       h = pre_norm(r)
    silu_and_mul=True, W = [gate rows; up rows]      -> silu(h @ Wg^T) * (h @ Wu^T)

At decode the kernel is a skinny GEMM for M <= MAX_FUSED_ROWS rows. One program per BLOCK_N
output columns streams its [BLOCK_N, K] weight rows (with SwiGLU: the same columns of the gate
and of the up half) in BLOCK_K chunks through tl.dot, the rows padded to 16 (tl.dot's minimum M),
so the weights are read exactly once in total; that read is what bounds the kernel. There is no
grid-wide sync, so every program recomputes the row norms itself from the [M, K] input (3 KB per
bf16 row of 1536, from L2): one pass over K for rms(x), with a residual a second one that builds
r and takes rms(r); the main loop then rebuilds each chunk of h right before its dot. The
column-block-0 programs write r. K (the hidden size) is a compile-time constant, as is M rounded
up to a power of two (the norm tiles): a model compiles a handful of variants.

Batch-invariant (`norm_linear(batch_invariant=True)`, and `linear`, the same kernel without the
norm): any M, over blocks of 16 rows (a 2D grid) with the M = 16 tiles, so a row's bits never
depend on M or on the other rows. For wide steps (prefill, vision) this re-reads the weights once
per 16 rows and recomputes each row block's norms in every column program: slower than cuBLAS
there (benchmarks/kernel_bench.py's invariant_linear rows measure by how much).

Rounding is exactly that of the unfused ops (kernels/rmsnorm.py, kernels/activation.py): fp32
statistics, x * rstd rounded to the dtype, times the weight, rounded again; r rounded before its
own norm; the GEMM output rounded to the dtype (fp32 accumulation, the bias added before that
rounding); silu(gate) rounded before the product with up. `norm_linear_ref` is those ops' refs
composed, bit for bit what calling them one after another gives.

The launcher reads no device tensor: the grid depends on shapes only (CUDA-graph safe).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .activation import silu_and_mul_ref
from .rmsnorm import check_rows, rms_norm_ref, sandwich_rms_norm_ref

# Rows (tokens) up to which the fused kernel is meant to be used: one MMA tile of rows. Beyond
# decode sizes the per-program norm passes grow with M and cuBLAS' tiling wins.
MAX_FUSED_ROWS = 16
_BLOCK_M = 16  # tl.dot's minimum M; rows past M load as zeros and are not stored
_INTERPRETER_BLOCK_M = 64  # batch-invariant rows per program in the interpreter (_launch_config)


@triton.jit
def _branch_chunk(x_ptr, res_ptr, post_w_ptrs, rows, kk, mask, post_w_mask, stride_x,
                  stride_res, rstd_x, HAS_RESIDUAL: tl.constexpr, dtype: tl.constexpr):
    # One [rows, kk] chunk (zero outside mask) of what the pre-norm normalises, in fp32: x itself,
    # or r = residual + post_w * rms(x) rounded as sandwich_rms_norm_ref does: x * rstd_x, the
    # weight product and the sum each to the dtype. post_w_ptrs [kk], post_w_mask [kk].
    x = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_res + kk[None, :], mask=mask, other=0.0)
        post_w = tl.load(post_w_ptrs, mask=post_w_mask, other=0.0).to(tl.float32)
        n = (post_w * (x * rstd_x[:, None]).to(dtype).to(tl.float32)).to(dtype)
        x = (res.to(tl.float32) + n.to(tl.float32)).to(dtype).to(tl.float32)
    return x


@triton.jit
def _norm_pass(x_ptr, res_ptr, post_w_ptr, rows, row_mask, stride_x, stride_res, rstd_x, eps,
               K: tl.constexpr, NORM_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
               dtype: tl.constexpr):
    # rsqrt(mean(v^2) + eps) [rows] of v = x, or (HAS_RESIDUAL) of v = r. Several tiles (16
    # rows): pipelined, tiles i+1 and i+2 copied by cp.async while tile i is summed, instead of
    # one dependent L2 round trip per tile. Nothing is stored here: a store between tiles would
    # hold the next tile's loads behind it.
    sq = tl.zeros([rows.shape[0], NORM_K], dtype=tl.float32)  # per-lane sums, reduced once
    for k0 in tl.range(0, K, NORM_K, num_stages=3):
        kk = k0 + tl.arange(0, NORM_K)
        k_mask = kk < K
        mask = row_mask[:, None] & k_mask[None, :]
        v = _branch_chunk(x_ptr, res_ptr, post_w_ptr + kk, rows, kk, mask, k_mask, stride_x,
                          stride_res, rstd_x, HAS_RESIDUAL, dtype)
        sq += v * v
    return tl.math.rsqrt(tl.sum(sq, axis=1) / K + eps)


@triton.jit
def _pad_rows(v, BLOCK_M: tl.constexpr):
    # [R] per-row values (R <= BLOCK_M) -> [BLOCK_M], zero past R: the norm passes' rows onto
    # the dot's 16 rows
    src = tl.arange(0, v.shape[0])
    dst = tl.arange(0, BLOCK_M)
    return tl.sum(tl.where(dst[:, None] == src[None, :], v[None, :], 0.0), axis=1)


@triton.jit(do_not_specialize=["M"])  # one compiled kernel for every M (see _launch)
def _norm_linear_kernel(
    x_ptr, res_ptr, post_w_ptr, pre_w_ptr, w_ptr, bias_ptr, y_ptr, r_ptr,
    M, N_OUT, stride_x, stride_res, stride_w, stride_y, stride_r, eps,
    K: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr, NORM_M: tl.constexpr, NORM_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid (cdiv(N_OUT, BLOCK_N), cdiv(M, BLOCK_M)); x, residual [M, K] (row strides),
    # y [M, N_OUT], r [M, K]; w [N, K] with N = N_OUT, or N = 2 N_OUT (gate rows, then up rows)
    # with SILU; bias [N]. Program (n, m) computes rows m * BLOCK_M .. + BLOCK_M - 1.
    # K (the model's hidden size) is a constexpr: the loops over it have fixed trip counts and
    # the K masks are known 16-byte aligned where K allows it (vector loads, cp.async).
    # The norm passes walk [NORM_M, NORM_K] tiles, as few and as wide as the registers allow
    # (one tile per pass at NORM_M <= 2 and K <= 2048). HAS_NORM False: a plain GEMM of x.
    pid = tl.program_id(0)
    first_row = tl.program_id(1) * BLOCK_M
    x_ptr += first_row.to(tl.int64) * stride_x
    res_ptr += first_row.to(tl.int64) * stride_res
    y_ptr += first_row.to(tl.int64) * stride_y
    r_ptr += first_row.to(tl.int64) * stride_r
    M -= first_row  # rows of this program's block (more than BLOCK_M: all BLOCK_M of them)
    dtype = y_ptr.dtype.element_ty

    if HAS_NORM:
        # Pass 1: rstd of x. Pass 2 (with a residual): r = residual + post_norm(x) and its rstd.
        n_rows = tl.arange(0, NORM_M)
        n_row_mask = n_rows < M
        rstd_x = _norm_pass(x_ptr, res_ptr, post_w_ptr, n_rows, n_row_mask, stride_x, stride_res,
                            None, eps, K, NORM_K, False, dtype)
        rstd = rstd_x
        if HAS_RESIDUAL:
            rstd = _norm_pass(x_ptr, res_ptr, post_w_ptr, n_rows, n_row_mask, stride_x,
                              stride_res, rstd_x, eps, K, NORM_K, True, dtype)
        rstd_x = _pad_rows(rstd_x, BLOCK_M)
        rstd = _pad_rows(rstd, BLOCK_M)

    # Main loop: h = pre_w * rms(x or r), rebuilt chunk by chunk, into the dot with the W^T
    # tile. Every load here is a pipeline stage (cp.async, num_stages).
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    ks = tl.arange(0, BLOCK_K)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_OUT
    # [BLOCK_K, BLOCK_N] tiles of W^T: K contiguous, so weight rows copy as 16-byte vectors
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SILU:  # the same columns of the up half, N_OUT rows further
        w_up_ptrs = w_ptr + (cols + N_OUT).to(tl.int64)[None, :] * stride_w + ks[:, None]
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < K
        mask = row_mask[:, None] & k_mask[None, :]
        if HAS_NORM:
            s = _branch_chunk(x_ptr, res_ptr, post_w_ptr + kk, rows, kk, mask, k_mask, stride_x,
                              stride_res, rstd_x, HAS_RESIDUAL, dtype)
            if HAS_RESIDUAL:  # column block 0 writes r here: the loads ahead are in flight
                tl.store(r_ptr + rows[:, None] * stride_r + kk[None, :], s.to(dtype),
                         mask=mask & (pid == 0))
            pre_w = tl.load(pre_w_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
            h = (pre_w[None, :] * (s * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
        else:
            h = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=mask, other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w = tl.load(w_ptrs + k0, mask=w_mask, other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        if SILU:
            w_up = tl.load(w_up_ptrs + k0, mask=w_mask, other=0.0)
            acc_up = tl.dot(h, w_up, acc_up, input_precision=DOT_PRECISION)

    # Epilogue: bias, rounding to the dtype (F.linear's output), then SwiGLU as silu_and_mul.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if SILU:
        if HAS_BIAS:
            up_bias = tl.load(bias_ptr + N_OUT + cols, mask=col_mask, other=0.0)
            acc_up += up_bias.to(tl.float32)[None, :]
        gate = y.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        y = (act * acc_up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y,
             mask=row_mask[:, None] & col_mask[None, :])


def _launch_config(M: int, K: int, N: int, dtype: torch.dtype, silu: bool,
                   batch_invariant: bool = False, interpreter: bool = False) -> dict:
    """Tiles, warps and stages for sm_90 (ptxas numbers: tests/kernels/test_linear.py).

    BLOCK_N 32: GLM-OCR's qkv (N 4096) runs 128 programs and gate_up (I 4608 with SwiGLU) 144 on
    an H100/H200's 132 SMs. BLOCK_K 256 (16-bit): 16 KB of weights per tile (32 KB with SwiGLU),
    and 2 norm-weight elements per thread, the least that cp.async copies: at 128 pre_w / post_w
    stay plain loads that stall every iteration on an L2 round trip. Stages: 3 weight tiles in
    flight per program (2 with SwiGLU), 6-9 MB on the whole GPU, above the ~3 MB that HBM's
    bandwidth-latency product asks for; a program then takes at most 107 KB of shared memory
    and ~200 registers per thread, so two share an SM and gate_up's 144 run in one wave.
    fp32 (tests) takes BLOCK_K 64: its ieee dot runs on the FMA units, from registers.
    The norm tile holds 4096 elements (32 per thread); at K 1536 one tile covers 1-2 rows, 1024
    columns of 4, 512 of 8, 256 of 16.

    Specialised (M <= MAX_FUSED_ROWS): the norm tile's rows are M rounded up to a power of two,
    so a row's rms is summed in a different order at another M. batch_invariant: every M runs
    the M = 16 configuration over blocks of 16 rows, so nothing a row's bits depend on follows M.
    The interpreter (CPU) runs programs one after another, each op a numpy call, so there the
    batch-invariant tiles are as large as it allows: 64 rows, up to 8192 of the N output columns
    (an lm_head of 59,392 takes 8 programs a row block instead of 1,856), K in chunks of 64.
    """
    norm_m = triton.next_power_of_2(M)
    if batch_invariant:
        norm_m = _INTERPRETER_BLOCK_M if interpreter else _BLOCK_M
    block_k = 64 if dtype == torch.float32 or (interpreter and batch_invariant) else 256
    block_n = min(8192, triton.next_power_of_2(N)) if interpreter and batch_invariant else 32
    return dict(NORM_M=norm_m, BLOCK_M=max(norm_m, _BLOCK_M),
                NORM_K=min(triton.next_power_of_2(K), 4096 // norm_m), BLOCK_N=block_n,
                BLOCK_K=block_k, num_warps=4, num_stages=3 if silu else 4)


def _check_vector(name: str, t: torch.Tensor, size: int, x: torch.Tensor) -> None:
    if t.shape != (size,) or t.stride(0) != 1 or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name} must be a contiguous [{size}] {x.dtype} tensor on {x.device}, "
                         f"got {tuple(t.shape)} {t.dtype} {t.device}")


def _check_sandwich(residual: torch.Tensor | None, post_weight: torch.Tensor | None) -> None:
    if residual is None and post_weight is not None:
        raise ValueError("post_weight is the branch norm of the sandwich step: it needs a residual")
    if residual is not None and post_weight is None:
        raise ValueError("post_weight is required with a residual (the sandwich step)")


def _check_args(x, weight, pre_weight, residual, post_weight, bias, silu_and_mul) -> None:
    check_rows("x", x)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be [M, K] with K >= 1, got {tuple(x.shape)}")
    K = x.shape[1]
    if (weight.dim() != 2 or weight.shape[1] != K or weight.shape[0] == 0
            or not weight.is_contiguous() or weight.dtype != x.dtype or weight.device != x.device):
        raise ValueError(f"weight must be a contiguous [N, {K}] {x.dtype} tensor on {x.device} "
                         f"with N >= 1, got {tuple(weight.shape)} {weight.dtype} {weight.device} "
                         f"(contiguous: {weight.is_contiguous()})")
    N = weight.shape[0]
    if silu_and_mul and N % 2:
        raise ValueError(f"weight must have an even number of rows (gate | up) with "
                         f"silu_and_mul, got {N}")
    if pre_weight is not None:
        _check_vector("pre_weight", pre_weight, K, x)
    _check_sandwich(residual, post_weight)
    if residual is not None:
        check_rows("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} {residual.device}"
                             f" must match x {tuple(x.shape)} {x.dtype} {x.device}")
        _check_vector("post_weight", post_weight, K, x)
    if bias is not None:
        _check_vector("bias", bias, N, x)


def norm_linear(x: torch.Tensor, weight: torch.Tensor, pre_weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None, post_weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, silu_and_mul: bool = False,
                batch_invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm feeding a projection, the projection, and optionally SwiGLU, in one launch.

    x [M, K] (rows may be strided, K contiguous); weight [N, K] contiguous (nn.Linear's layout);
    pre_weight, post_weight [K]; bias [N] or None; all in x's dtype (fp32, fp16 or bf16) and on
    its device.
    - residual None: r = x, h = rms_norm(x, pre_weight).
    - residual [M, K] (post_weight required): r = residual + rms_norm(x, post_weight),
      h = rms_norm(r, pre_weight) (sandwich_rms_norm).
    y = h @ weight^T + bias [M, N]; with silu_and_mul, weight is [gate rows; up rows] (N = 2I) and
    y = silu(gate) * up [M, I]. Returns (y, r), r [M, K] (x itself when residual is None).
    Specialised for decode, M <= MAX_FUSED_ROWS; batch_invariant: any M, and each row's
    results are the same bits whatever the other rows and M.
    """
    _check_args(x, weight, pre_weight, residual, post_weight, bias, silu_and_mul)
    M = x.shape[0]
    if M > MAX_FUSED_ROWS and not batch_invariant:
        raise ValueError(f"x has {M} rows, more than MAX_FUSED_ROWS = {MAX_FUSED_ROWS}: run "
                         f"the norm and the GEMM unfused (or batch_invariant)")
    return _launch(x, weight, bias, silu_and_mul, pre_weight, eps, residual, post_weight,
                   batch_invariant)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           silu_and_mul: bool = False) -> torch.Tensor:
    """x [M, K] @ weight^T (+ bias) -> [M, N] (with silu_and_mul, weight [gate; up] -> [M, N/2]),
    batch-invariant: norm_linear's kernel without the norm, the same tiles for every M, so a
    row's output bits never depend on the other rows (cuBLAS picks its tiling, and on some
    shapes a split of K, by M). Arguments as in norm_linear."""
    _check_args(x, weight, None, None, None, bias, silu_and_mul)
    return _launch(x, weight, bias, silu_and_mul, None, 0.0, None, None, True)[0]


def _launch(x, weight, bias, silu_and_mul, pre_weight, eps, residual, post_weight,
            batch_invariant) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    n_out = weight.shape[0] // 2 if silu_and_mul else weight.shape[0]
    y = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    r = x if residual is None else torch.empty((M, K), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, r
    interpreter = x.device.type != "cuda"
    cfg = _launch_config(M, K, n_out, x.dtype, silu_and_mul, batch_invariant, interpreter)
    if batch_invariant:
        # Each multiply and add rounded as written (no FMA contraction), so that kernels compiled
        # for other shapes or alignments, and the interpreter, round a row's values alike.
        cfg["enable_fp_fusion"] = False
    # without a residual, norm or bias the kernel never touches those pointers: x stands in
    res = x if residual is None else residual
    norm_w = x if pre_weight is None else pre_weight
    _norm_linear_kernel[(triton.cdiv(n_out, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))](
        x, res, norm_w if post_weight is None else post_weight, norm_w, weight,
        weight if bias is None else bias, y, r,
        M, n_out, x.stride(0), res.stride(0), weight.stride(0), y.stride(0), r.stride(0),
        float(eps),
        K=K, HAS_NORM=pre_weight is not None, HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None, SILU=silu_and_mul,
        # fp32 inputs (tests, CPU) must not silently drop to tf32 on the GPU
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg,
    )
    return y, r


def norm_linear_ref(x: torch.Tensor, weight: torch.Tensor, pre_weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None, post_weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None,
                    silu_and_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `norm_linear` (any number of rows): exactly the unfused chain
    rms_norm_ref or sandwich_rms_norm_ref, then F.linear, then silu_and_mul_ref."""
    _check_sandwich(residual, post_weight)
    if residual is None:
        r, h = x, rms_norm_ref(x, pre_weight, eps)
    else:
        h, r = sandwich_rms_norm_ref(x, residual, post_weight, pre_weight, eps)
    y = F.linear(h, weight, bias)
    return (silu_and_mul_ref(y) if silu_and_mul else y), r


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               silu_and_mul: bool = False) -> torch.Tensor:
    """Plain-torch twin of `linear`: F.linear, then silu_and_mul_ref."""
    y = F.linear(x, weight, bias)
    return silu_and_mul_ref(y) if silu_and_mul else y
