"""Every glmrt.kernels kernel at GLM-OCR's real sizes, against its PyTorch reference and the hardware.

    python benchmarks/kernel_bench.py [--out DIR] [--only NAME ...] [--smoke]

On a CUDA GPU (bf16, real sizes) the run first measures the device's own ceilings, the copy
bandwidth of a 2 GiB device-to-device copy and the throughput of an 8192^3 bf16 matmul, then
prints one row per case: Triton time, reference time and speed-up (for attention also torch SDPA),
achieved GB/s or TFLOP/s, % of the measured ceiling, and PASS/MISS against the target:
  - memory-bound kernels: >= 80% of copy bandwidth for calls moving >= 64 MiB (smaller calls take
    < ~25 us at 3 TB/s, where launch and ramp-up alone cost more than the missing 20%);
  - varlen attention: >= 50% of matmul throughput at >= 4096 tokens;
  - paged decode attention: >= 70% of copy bandwidth at batch >= 32.
The repetition penalty is one pass over a [B, V] presence mask and the logits: memory-bound too.
sample (temperature, top-k, top-p and the seeded draw of the sampled decode path, one program per
row) is timed against its plain-torch twin, sample_ref (a vocabulary sort per row): unfiltered
rows take two passes over the logits, filtered rows ~19 (two 8-pass threshold searches); its
bytes are one read of the logits, so "achieved" is that read over the time, with no target.
norm_linear (a decode GEMM with its sandwich norm and SwiGLU fused) is timed against the unfused
chain it replaces, sandwich_rms_norm + cuBLAS (+ silu_and_mul): the "ref" columns of its rows.
mrope_write_kv (M-RoPE fused with the paged KV-cache write) is timed against the torch backend's
unfused path, TorchOps.mrope_write_kv: mrope_ref, then an in-place scatter into the caches.
The batch-invariant kernels (the engine's default) are timed against the batch-tuned ones they
replace, in the "ref" columns: invariant_linear (qkv with its sandwich step, gate_up with SwiGLU,
lm_head, at batch 1, 8, 32 and a 2048-token prefill) against the specialised norm_linear (<= 16
rows) or sandwich_rms_norm + cuBLAS; invariant_decode_attention (batch 1, 8, 32 at contexts 1k
and 5k) against paged_decode_attention's split-KV tuned per batch; invariant_prefill_attention
against paged_prefill_attention. Their cost is the ratio: `ref / triton` below 1 is a slowdown.

Timing is triton.testing.do_bench's median. do_bench zeroes a 256 MB buffer before every rep
(outside the timed events), so each rep starts with a cold L2: memory-bound numbers are HBM
numbers, and a small case shows its cold-cache latency, as in a real step where the weights
stream through L2 between two kernels. Every case is first checked once against its reference
(allclose with loose bf16 tolerances); a failing row is marked FAIL and the exit status is 1.

`--smoke` runs tiny sizes with one rep, in fp32 and in Triton's interpreter when there is no GPU
(bf16 arithmetic is broken there), only to prove every code path; it prints n/a for % of peak.
Raw numbers go to <out>/kernels-<device>-<timestamp>.json and the table to the same name .md.
"""
import argparse
import itertools
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first import of a kernel module (@triton.jit reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton.testing import do_bench

from common import metadata, output_dir, provenance, write_report
from glmrt.kernels import activation, attention, invariant_attention, linear, paged, rmsnorm, rope, sampling
from glmrt.model.ops import TorchOps

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


# GLM-OCR's real config.
TEXT_HIDDEN, TEXT_HEADS, TEXT_KV_HEADS, TEXT_HEAD_DIM, TEXT_INTER = 1536, 16, 8, 128, 4608
VOCAB, MROPE_SECTION, ROPE_THETA, EPS = 59392, (16, 24, 24), 10000.0, 1e-5
VISION_HIDDEN, VISION_HEADS, VISION_HEAD_DIM, VISION_INTER = 1024, 16, 64, 4096
MERGER_WIDTH, MERGE = 1536, 4  # the merger's LayerNorm+GELU width; 2x2 patches per merged token
BLOCK_SIZE = 16  # KV cache [num_blocks, 16, 8, 128]

# Targets, as fractions of the measured ceilings, and the sizes from which they apply.
MEMORY_TARGET, LARGE_BYTES = 0.80, 64 * 2**20
ATTENTION_TARGET, ATTENTION_MIN_TOKENS = 0.50, 4096
DECODE_TARGET, DECODE_MIN_BATCH = 0.70, 32
# The fp32 attention reference holds ~3 [Hq, L, L] score tensors per sequence; above this size
# for one of them (one 24k-patch image: 38 GB) it is not timed, only checked on one kv group.
REF_SCORE_LIMIT = 4 * 2**30
# allclose atol = rtol by output dtype: loose for bf16 (one rounding is 2^-8 relative); integer
# outputs (argmax's indices) must match exactly
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}


@dataclass(frozen=True)
class Workload:
    vision_patches: int  # patches of one vision pass, all images packed (a full page: 24,576)
    vision_images: tuple[int, ...]  # how many equal images those patches come from
    prefill_packs: tuple[tuple[int, int], ...]  # (new tokens, prompts) of one prefill step
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]  # tokens already in the cache per sequence
    fused_rows: tuple[int, ...]  # decode rows of norm_linear (at most linear.MAX_FUSED_ROWS)
    fused_outputs: tuple[int, int]  # its output features: qkv, gate_up (gate | up)
    prefill_chunks: tuple[tuple[int, int], ...]  # (chunk tokens, cached prefix) of a chunked prefill
    invariant_rows: tuple[int, ...]  # GEMM rows of the batch-invariant comparison (decode batches, a prefill)
    invariant_contexts: tuple[int, ...]  # decode contexts of the batch-invariant attention comparison


REAL = Workload(24576, (1, 2, 4, 8), ((1024, 1), (2048, 1), (4096, 1), (6144, 1), (6144, 6)),
                (1, 8, 32, 128, 256), (1024, 4096, 8192),
                (1, 8, 16), ((TEXT_HEADS + 2 * TEXT_KV_HEADS) * TEXT_HEAD_DIM, 2 * TEXT_INTER),
                ((2048, 0), (2048, 2048), (2048, 6144), (8192, 8192)), (1, 8, 32, 2048), (1024, 5120))
# the interpreter runs a program's loop over K in ~0.5 s: a handful of output tiles only
SMOKE = Workload(64, (1, 2), ((48, 1), (48, 3)), (1, 3), (40,), (1, 3), (64, 96), ((24, 40),), (1, 20), (40,))


@dataclass
class Case:
    kernel: str
    name: str
    triton: Callable[[], object]  # the timed kernel call
    reference: Callable[[], object] | None  # its plain-PyTorch twin; None: too big to run
    # -> (kernel output, reference output), run once before timing; default (triton(), reference()).
    # In-place kernels work on copies here, since the timed calls mutate their inputs.
    check: Callable[[], tuple[object, object]] | None = None
    bytes: int | None = None  # essential HBM traffic of one call (memory-bound kernels)
    flops: int | None = None  # FLOPs of one call (attention)
    target: float | None = None  # fraction of the measured ceiling; None: no target at this size
    sdpa: Callable[[], object] | None = None  # torch SDPA on the same problem (attention only)
    note: str = ""
    args: tuple = ()  # the kernel's tensors, for cases built on another's problem


@dataclass
class Peaks:
    copy_bytes: int
    copy_ms: float
    copy_gbps: float
    matmul_n: int
    matmul_ms: float
    matmul_tflops: float


@dataclass
class Result:
    kernel: str
    case: str
    triton_ms: float | None
    reference_ms: float | None
    sdpa_ms: float | None
    bytes: int | None
    flops: int | None
    achieved: float | None  # GB/s or TFLOP/s, per `unit`
    unit: str
    peak_pct: float | None
    target_pct: float | None
    status: str  # PASS / MISS against the target, "-" without one, n/a on the CPU
    check: str  # ok / FAIL / ERROR
    max_abs_error: float | None
    note: str


# ----------------------------------------------------------------------------- byte / FLOP counts


def rowwise_bytes(rows: int, read: int, written: int, elt: int, extra: int = 0) -> int:
    """A row-wise pass reads `read` and writes `written` elements per row, each once:
    rows * (read + written) * elt, plus `extra` bytes (weights, positions, slot ids)."""
    return rows * (read + written) * elt + extra


def attention_flops(seqlens: list[int], heads: int, head_dim: int, causal: bool) -> int:
    """QK^T and PV are 2 * L * L * D FLOPs each per head and sequence: 4 * sum(L^2) * H * D;
    causal visits half the (query, key) pairs: 2 * 2 * sum(L^2) / 2 * H * D (FlashAttention's count)."""
    flops = 4 * sum(n * n for n in seqlens) * heads * head_dim
    return flops // 2 if causal else flops


def decode_attention_bytes(context_lens: list[int], q_heads: int, kv_heads: int, head_dim: int,
                           elt: int, queries: int = 1) -> int:
    """K + V actually read over the contexts (2 * sum(ctx) * Hkv * D; once for all `queries` of a
    sequence), q and out (2 * B * Q * Hq * D), all times elt; plus the int32 block-table entries
    read (cdiv(ctx, 16) each) and context lens."""
    kv = 2 * sum(context_lens) * kv_heads * head_dim * elt
    q_out = 2 * len(context_lens) * queries * q_heads * head_dim * elt
    tables = 4 * sum(-(-n // BLOCK_SIZE) for n in context_lens) + 4 * len(context_lens)
    return kv + q_out + tables


def penalty_bytes(batch: int, present: int, logit_elt: int) -> int:
    """The bool presence mask and the logits read once (B * V * (1 + logit)), the `present`
    penalised logits written back, and the fp32 per-row penalties."""
    return batch * VOCAB * (1 + logit_elt) + present * logit_elt + 4 * batch


def memory_target(nbytes: int) -> float | None:
    return MEMORY_TARGET if nbytes >= LARGE_BYTES else None


# ----------------------------------------------------------------------------- cases


def _randn(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(shape, device=DEVICE, dtype=dtype)


def _weight(width: int) -> torch.Tensor:
    return 1.0 + 0.1 * _randn(width)  # a norm weight near 1, as trained ones are


def rms_norm_case(label: str, rows: int, width: int, residual: bool) -> Case:
    x, w = _randn(rows, width), _weight(width)  # [rows, D], [D]
    res = _randn(rows, width) if residual else None
    io = 2 if residual else 1  # x (+ residual) in, out (+ sum) out
    n = rowwise_bytes(rows, io * width, io * width, x.element_size(), width * x.element_size())
    return Case("rms_norm", f"{label} {rows}x{width}" + (" +residual" if residual else ""),
                triton=lambda: rmsnorm.rms_norm(x, w, EPS, res),
                reference=lambda: rmsnorm.rms_norm_ref(x, w, EPS, res),
                bytes=n, target=memory_target(n))


def sandwich_rms_norm_case(label: str, rows: int) -> Case:
    branch, res = _randn(rows, TEXT_HIDDEN), _randn(rows, TEXT_HIDDEN)  # [T, 1536] each
    post, pre = _weight(TEXT_HIDDEN), _weight(TEXT_HIDDEN)
    args = (branch, res, post, pre, EPS)
    n = rowwise_bytes(rows, 2 * TEXT_HIDDEN, 2 * TEXT_HIDDEN, branch.element_size(),
                      2 * TEXT_HIDDEN * branch.element_size())
    return Case("sandwich_rms_norm", f"{label} {rows}x{TEXT_HIDDEN}",
                triton=lambda: rmsnorm.sandwich_rms_norm(*args),
                reference=lambda: rmsnorm.sandwich_rms_norm_ref(*args),
                bytes=n, target=memory_target(n))


def silu_and_mul_case(label: str, rows: int, inter: int) -> Case:
    x = _randn(rows, 2 * inter)  # the gate_up projection output [rows, gate | up]
    n = rowwise_bytes(rows, 2 * inter, inter, x.element_size())
    return Case("silu_and_mul", f"{label} {rows}x{2 * inter}",
                triton=lambda: activation.silu_and_mul(x),
                reference=lambda: activation.silu_and_mul_ref(x),
                bytes=n, target=memory_target(n))


def norm_linear_case(label: str, rows: int, out_features: int, silu: bool) -> Case:
    """A decode GEMM of the text decoder behind its sandwich step, in one launch: the weight is
    [out_features, TEXT_HIDDEN] (qkv 4096, gate_up 9216 with SwiGLU). The reference column is the
    unfused chain the Triton backend runs otherwise: sandwich_rms_norm, cuBLAS F.linear
    (, silu_and_mul)."""
    branch, res = _randn(rows, TEXT_HIDDEN), _randn(rows, TEXT_HIDDEN)  # o / down output, residual
    post, pre = _weight(TEXT_HIDDEN), _weight(TEXT_HIDDEN)
    weight = _randn(out_features, TEXT_HIDDEN) * TEXT_HIDDEN**-0.5  # [N, K]: y ~ N(0, 1)
    args = (branch, weight, pre, EPS, res, post)

    def unfused() -> tuple[torch.Tensor, torch.Tensor]:
        h, total = rmsnorm.sandwich_rms_norm(branch, res, post, pre, EPS)
        y = F.linear(h, weight)
        return (activation.silu_and_mul(y) if silu else y), total

    elt, n_out = branch.element_size(), out_features // 2 if silu else out_features
    # the weight and both norm weights once; branch and residual in, y and the new residual out
    n = rowwise_bytes(rows, 2 * TEXT_HIDDEN, n_out + TEXT_HIDDEN, elt,
                      (out_features + 2) * TEXT_HIDDEN * elt)
    return Case("norm_linear", f"{label} M={rows} {out_features}x{TEXT_HIDDEN}"
                + (" +silu" if silu else ""),
                triton=lambda: linear.norm_linear(*args, silu_and_mul=silu),
                reference=unfused,
                check=lambda: (linear.norm_linear(*args, silu_and_mul=silu),
                               linear.norm_linear_ref(*args, silu_and_mul=silu)),
                bytes=n, target=memory_target(n),
                note="ref: unfused sandwich_rms_norm + F.linear"
                     + (" + silu_and_mul" if silu else ""))


def invariant_linear_case(label: str, rows: int, out_features: int, silu: bool, norm: bool) -> Case:
    """A text-decoder GEMM on the batch-invariant kernel (one tiling for every M), against the path
    the batch-tuned backend runs: the fused norm_linear up to linear.MAX_FUSED_ROWS rows, else
    sandwich_rms_norm + cuBLAS (+ silu_and_mul); without a norm (lm_head) cuBLAS."""
    x, res = _randn(rows, TEXT_HIDDEN), _randn(rows, TEXT_HIDDEN)
    post, pre = _weight(TEXT_HIDDEN), _weight(TEXT_HIDDEN)
    weight = _randn(out_features, TEXT_HIDDEN) * TEXT_HIDDEN**-0.5
    if norm:
        args = (x, weight, pre, EPS, res, post)
        invariant = lambda: linear.norm_linear(*args, silu_and_mul=silu, batch_invariant=True)[0]  # noqa: E731

        def tuned() -> torch.Tensor:
            if rows <= linear.MAX_FUSED_ROWS:
                return linear.norm_linear(*args, silu_and_mul=silu)[0]
            h, _ = rmsnorm.sandwich_rms_norm(x, res, post, pre, EPS)
            y = F.linear(h, weight)
            return activation.silu_and_mul(y) if silu else y
    else:
        invariant, tuned = (lambda: linear.linear(x, weight)), (lambda: F.linear(x, weight))
    elt, n_out = x.element_size(), out_features // 2 if silu else out_features
    n = rowwise_bytes(rows, (2 if norm else 1) * TEXT_HIDDEN, n_out, elt, out_features * TEXT_HIDDEN * elt)
    return Case("invariant_linear", f"{label} M={rows} {out_features}x{TEXT_HIDDEN}" + (" +silu" if silu else ""),
                triton=invariant, reference=tuned, bytes=n, target=None,
                note="ref: the batch-tuned path (fused norm_linear <= 16 rows, else norm + cuBLAS)")


def invariant_decode_case(batch: int, context: int) -> Case:
    """Batch-invariant decode attention (fixed 256-key splits) against paged_decode_attention,
    whose split count is tuned to the batch, on the same cache; both through block tables as
    wide as the engine's (max_model_len 16384: 1025 blocks), which set the grids' split counts."""
    case = paged_decode_case(batch, context)
    q, k_cache, v_cache, tables, lens = case.args
    wide = torch.zeros(batch, 16384 // BLOCK_SIZE + 1, dtype=torch.int32, device=DEVICE)
    wide[:, : tables.shape[1]] = tables
    return Case("invariant_decode_attention", case.name,
                triton=lambda: invariant_attention.decode_attention(q, k_cache, v_cache, wide, lens),
                reference=lambda: paged.paged_decode_attention(q, k_cache, v_cache, wide, lens),
                bytes=case.bytes, target=None, note="ref: paged_decode_attention (split-KV tuned per batch)")


def invariant_prefill_case(chunk: int, prefix: int) -> Case:
    """Batch-invariant prefill attention (in-program 256-key splits) against what the batch-tuned
    engine runs: paged_prefill_attention after a prefix, the varlen kernel on a whole prompt."""
    case = paged_prefill_case(chunk, prefix)
    q, k_cache, v_cache, cu, tables, lens = case.args
    return Case("invariant_prefill_attention", case.name,
                triton=lambda: invariant_attention.prefill_attention(q, k_cache, v_cache, cu, tables, lens, chunk),
                reference=case.sdpa if not prefix else case.triton, flops=case.flops, target=None,
                note="ref: the varlen kernel" if not prefix else "ref: paged_prefill_attention")


def layer_norm_gelu_case(rows: int) -> Case:
    x, w, b = _randn(rows, MERGER_WIDTH), _weight(MERGER_WIDTH), 0.1 * _randn(MERGER_WIDTH)
    n = rowwise_bytes(rows, MERGER_WIDTH, MERGER_WIDTH, x.element_size(),
                      2 * MERGER_WIDTH * x.element_size())
    return Case("layer_norm_gelu", f"merger {rows}x{MERGER_WIDTH}",
                triton=lambda: activation.layer_norm_gelu(x, w, b, EPS),
                reference=lambda: activation.layer_norm_gelu_ref(x, w, b, EPS),
                bytes=n, target=memory_target(n))


def vision_rope_case(patches: int) -> Case:
    H, D = VISION_HEADS, VISION_HEAD_DIM
    qkv = _randn(patches, 3, H, D)  # the qkv projection output; q, k rotated in place as views
    qw, kw = _weight(D), _weight(D)
    # (row, col) of each patch; the values only set angles, the cost does not depend on them
    pos = torch.randint(0, 160, (patches, 2), device=DEVICE)

    def check() -> tuple[object, object]:
        work = qkv.clone()
        rope.vision_qk_norm_rope_(work[:, 0], work[:, 1], qw, kw, pos, ROPE_THETA, EPS)
        ref = rope.vision_qk_norm_rope_ref(qkv[:, 0], qkv[:, 1], qw, kw, pos, ROPE_THETA, EPS)
        return (work[:, 0], work[:, 1]), ref

    elt = qkv.element_size()
    n = rowwise_bytes(patches, 2 * H * D, 2 * H * D, elt,
                      2 * D * elt + pos.numel() * pos.element_size())
    return Case("vision_qk_norm_rope", f"vision S={patches} H{H} D{D}",
                triton=lambda: rope.vision_qk_norm_rope_(qkv[:, 0], qkv[:, 1], qw, kw, pos,
                                                         ROPE_THETA, EPS),
                reference=lambda: rope.vision_qk_norm_rope_ref(qkv[:, 0], qkv[:, 1], qw, kw, pos,
                                                               ROPE_THETA, EPS),
                check=check, bytes=n, target=memory_target(n))


def _text_qkv(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text qkv projection output [T, Hq + 2 Hkv, D] and its q, k, v views (read in place)."""
    qkv = _randn(tokens, TEXT_HEADS + 2 * TEXT_KV_HEADS, TEXT_HEAD_DIM)
    return qkv, *qkv.split([TEXT_HEADS, TEXT_KV_HEADS, TEXT_KV_HEADS], dim=1)


def mrope_write_kv_case(label: str, tokens: int, prefill: bool) -> Case:
    """The decoder's op: M-RoPE on q/k and the KV-cache write in one launch, vs the torch backend's
    unfused path (mrope_ref, then an in-place scatter into the caches)."""
    qkv, q, k, v = _text_qkv(tokens)
    pos = torch.randint(0, 8192, (3, tokens), device=DEVICE)  # (t, h, w) rows
    num_blocks = -(-tokens // BLOCK_SIZE) if prefill else tokens
    shape = (num_blocks, BLOCK_SIZE, TEXT_KV_HEADS, TEXT_HEAD_DIM)
    k_cache = torch.zeros(shape, device=DEVICE, dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    blocks = torch.randperm(num_blocks, device=DEVICE)  # pool order after many admissions
    offsets = torch.arange(BLOCK_SIZE, device=DEVICE)
    if prefill:  # a prompt fills whole blocks, in order
        slots = (blocks[:, None] * BLOCK_SIZE + offsets).flatten()[:tokens]
    else:  # one new token per sequence, at some offset of that sequence's last block
        slots = blocks * BLOCK_SIZE + torch.randint(0, BLOCK_SIZE, (tokens,), device=DEVICE)

    def fused(q_, k_, v_, kc, vc) -> None:
        rope.mrope_write_kv_(q_, k_, v_, pos, MROPE_SECTION, ROPE_THETA, kc, vc, slots)

    def check() -> tuple[object, object]:
        wq, wk, wv = qkv.clone().split([TEXT_HEADS, TEXT_KV_HEADS, TEXT_KV_HEADS], dim=1)
        kc, vc = k_cache.clone(), v_cache.clone()
        fused(wq, wk, wv, kc, vc)
        return (wq, wk, kc, vc), rope.mrope_write_kv_ref(q, k, v, pos, MROPE_SECTION, ROPE_THETA, k_cache, v_cache,
                                                          slots)

    elt, heads = qkv.element_size(), TEXT_HEADS + TEXT_KV_HEADS
    n = rowwise_bytes(tokens, (heads + TEXT_KV_HEADS) * TEXT_HEAD_DIM, (heads + 2 * TEXT_KV_HEADS) * TEXT_HEAD_DIM,
                      elt, pos.numel() * pos.element_size() + slots.numel() * slots.element_size())
    return Case("mrope_write_kv", f"{label} T={tokens}",
                triton=lambda: fused(q, k, v, k_cache, v_cache),
                reference=lambda: TorchOps().mrope_write_kv(q, k, v, pos, MROPE_SECTION, ROPE_THETA, k_cache,
                                                            v_cache, slots),
                check=check, bytes=n, target=memory_target(n))


def _sdpa_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int],
                       causal: bool) -> list[torch.Tensor]:
    """torch SDPA called once per sequence, as transformers' GLM vision attention does for sdpa.
    A block-diagonal mask would push SDPA off its flash kernel and spend FLOPs on all T^2 pairs
    (8x the work for 8 images); nested tensors reach the same flash kernel, but need an NJT built
    per step. Per-sequence [1, H, L, D] views keep flash at full speed. The outputs are left as a
    list: concatenating back to [T, H, D] is not timed, in SDPA's favour."""
    gqa = q.shape[1] != k.shape[1]
    return [F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                           v[s:e].transpose(0, 1)[None], is_causal=causal,
                                           enable_gqa=gqa)
            for s, e in zip(bounds[:-1], bounds[1:])]


def varlen_attention_case(label: str, seqlens: list[int], q_heads: int, kv_heads: int,
                          head_dim: int, causal: bool) -> Case:
    tokens, group = sum(seqlens), q_heads // kv_heads
    qkv = _randn(tokens, q_heads + 2 * kv_heads, head_dim)  # packed projection output
    q, k, v = qkv.split([q_heads, kv_heads, kv_heads], dim=1)  # strided views, read in place
    bounds = [0, *itertools.accumulate(seqlens)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    max_len = max(seqlens)

    def run() -> torch.Tensor:
        return attention.varlen_attention(q, k, v, cu, max_len, causal)

    def check() -> tuple[object, object]:
        # one kv head and its q heads: the fp32 reference of all heads would not fit at 24k patches
        expected = attention.varlen_attention_ref(q[:, :group], k[:, :1], v[:, :1], cu, causal)
        return run()[:, :group], expected

    fits = q_heads * max_len**2 * 4 <= REF_SCORE_LIMIT

    def reference() -> torch.Tensor:
        return attention.varlen_attention_ref(q, k, v, cu, causal)

    flops = attention_flops(seqlens, q_heads, head_dim, causal)
    shape = f"{len(seqlens)} x {max_len}" if len(set(seqlens)) == 1 else f"{len(seqlens)} seqs"
    return Case("varlen_attention",
                f"{label} T={tokens} ({shape}) {q_heads}q/{kv_heads}k D{head_dim}",
                triton=run,
                reference=reference if fits else None,
                check=check, flops=flops,
                target=ATTENTION_TARGET if tokens >= ATTENTION_MIN_TOKENS else None,
                sdpa=lambda: _sdpa_per_sequence(q, k, v, bounds, causal),
                note="" if fits else "fp32 reference too large to time; checked on one kv group")


def paged_decode_case(batch: int, context: int, queries: int = 1) -> Case:
    """`queries` > 1: speculative verification, that many causal queries per sequence."""
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq
    shape = (num_blocks, BLOCK_SIZE, TEXT_KV_HEADS, TEXT_HEAD_DIM)
    k_cache, v_cache = _randn(*shape), _randn(*shape)
    # every sequence owns its blocks, scattered over the pool as after many admissions
    tables = torch.randperm(num_blocks, device=DEVICE).view(batch, per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q = _randn(batch * queries, TEXT_HEADS, TEXT_HEAD_DIM)  # [B * Q, Hq, D]

    def dense(cache: torch.Tensor) -> torch.Tensor:  # -> [B, Hkv, ctx, D], transformers' layout
        return cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()

    # SDPA over a dense, already gathered cache (transformers' static cache): the gather is not
    # timed and all contexts are equal, so no mask; it reads the same K/V bytes as the kernel.
    k_dense, v_dense = dense(k_cache), dense(v_cache)
    q_dense = q.view(batch, queries, TEXT_HEADS, TEXT_HEAD_DIM).transpose(1, 2)  # [B, Hq, Q, D]
    # query j sees the first context - (Q-1-j) keys
    mask = torch.arange(context, device=DEVICE) < context - (queries - 1) + torch.arange(queries, device=DEVICE)[:, None]
    kwargs = dict(num_queries=queries)
    return Case("paged_decode_attention", f"B={batch} ctx={context}" + (f" Q={queries}" if queries > 1 else ""),
                triton=lambda: paged.paged_decode_attention(q, k_cache, v_cache, tables, lens, **kwargs),
                reference=lambda: paged.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, **kwargs),
                bytes=decode_attention_bytes([context] * batch, TEXT_HEADS, TEXT_KV_HEADS,
                                             TEXT_HEAD_DIM, q.element_size(), queries),
                args=(q, k_cache, v_cache, tables, lens),
                target=DECODE_TARGET if batch >= DECODE_MIN_BATCH else None,
                sdpa=lambda: F.scaled_dot_product_attention(q_dense, k_dense, v_dense,
                                                            attn_mask=None if queries == 1 else mask, enable_gqa=True))


def paged_prefill_case(chunk: int, prefix: int) -> Case:
    """One prompt's chunk of `chunk` tokens after `prefix` cached ones, K/V read through a
    shuffled block table. SDPA runs the same problem on the gathered (untimed) dense K/V with the
    bottom-right causal mask, which keeps it off its flash kernel: read it as a bound, not a peer.
    Without a prefix the varlen kernel on packed K/V is the peer (the engine's path there)."""
    context = prefix + chunk
    blocks = -(-context // BLOCK_SIZE)
    shape = (blocks, BLOCK_SIZE, TEXT_KV_HEADS, TEXT_HEAD_DIM)
    k_cache, v_cache = _randn(*shape), _randn(*shape)
    tables = torch.randperm(blocks, device=DEVICE).view(1, blocks).to(torch.int32)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([context], dtype=torch.int32, device=DEVICE)
    q = _randn(chunk, TEXT_HEADS, TEXT_HEAD_DIM)
    k, v = (c[tables[0].long()].flatten(0, 1)[:context] for c in (k_cache, v_cache))  # [ctx, Hkv, D]
    mask = torch.arange(context, device=DEVICE) <= prefix + torch.arange(chunk, device=DEVICE)[:, None]
    # QK^T and PV over the visible (query, key) pairs: chunk * prefix + chunk^2 / 2 of them
    flops = 4 * (chunk * prefix + chunk * chunk // 2) * TEXT_HEADS * TEXT_HEAD_DIM
    sdpa = (lambda: attention.varlen_attention(q, k, v, cu, chunk, True)) if not prefix else (
        lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True))
    return Case("paged_prefill_attention", f"chunk={chunk} prefix={prefix} {TEXT_HEADS}q/{TEXT_KV_HEADS}k D{TEXT_HEAD_DIM}",
                triton=lambda: paged.paged_prefill_attention(q, k_cache, v_cache, cu, tables, lens, chunk),
                reference=lambda: paged.paged_prefill_attention_ref(q, k_cache, v_cache, cu, tables, lens),
                flops=flops, target=ATTENTION_TARGET if context >= ATTENTION_MIN_TOKENS else None, sdpa=sdpa,
                args=(q, k_cache, v_cache, cu, tables, lens),
                note="sdpa column: the varlen kernel" if not prefix else "sdpa column: masked SDPA on dense K/V")


def argmax_case(batch: int) -> Case:
    logits = _randn(batch, VOCAB, dtype=torch.float32)  # the sampler works on fp32 logits
    n = rowwise_bytes(batch, VOCAB, 0, logits.element_size(), batch * 8)  # + the int64 indices
    return Case("argmax", f"B={batch} V={VOCAB} fp32",
                triton=lambda: sampling.argmax(logits),
                reference=lambda: sampling.argmax_ref(logits),
                bytes=n, target=memory_target(n))


def repetition_penalty_case(batch: int, history: int) -> Case:
    logits = _randn(batch, VOCAB, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (batch, history), device=DEVICE)  # prompt + output ids, [B, L]
    presence = torch.zeros(batch, VOCAB, dtype=torch.bool, device=DEVICE)  # the sampler's [B, V] mask
    presence.scatter_(1, ids, True)
    penalty = torch.full((batch,), 1.1, device=DEVICE)  # per-row, as the sampler passes it

    def check() -> tuple[object, object]:
        expected = sampling.apply_repetition_penalty_ref(logits, presence, penalty)
        return sampling.apply_repetition_penalty_(logits.clone(), presence, penalty), expected

    n = penalty_bytes(batch, int(presence.sum()), logits.element_size())
    return Case("repetition_penalty", f"B={batch} L={history}",
                triton=lambda: sampling.apply_repetition_penalty_(logits, presence, penalty),
                reference=lambda: sampling.apply_repetition_penalty_ref(logits, presence, penalty),
                check=check, bytes=n, target=memory_target(n))


def token_bitmask_case(batch: int) -> Case:
    """A structured-output mask over fp32 logits; half the words allow nothing (the worst case:
    many -inf stores). Reads the logits and the mask, writes the disallowed entries."""
    logits = _randn(batch, VOCAB, dtype=torch.float32)
    words = (VOCAB + 31) // 32
    mask = torch.where(torch.arange(words, device=DEVICE) % 2 == 0, -1, 0).to(torch.int32).expand(batch, words).contiguous()

    def check() -> tuple[object, object]:
        return sampling.apply_token_bitmask_(logits.clone(), mask), sampling.apply_token_bitmask_ref(logits, mask)

    n = batch * VOCAB * logits.element_size() * 3 // 2 + mask.numel() * 4
    return Case("token_bitmask", f"B={batch} V={VOCAB} fp32",
                triton=lambda: sampling.apply_token_bitmask_(logits, mask),
                reference=lambda: sampling.apply_token_bitmask_ref(logits, mask),
                check=check, bytes=n, target=memory_target(n))


def sample_case(batch: int, top_k: int, top_p: float) -> Case:
    """The sampled decode path's token choice over fp32 logits, every row sampled alike."""
    logits = _randn(batch, VOCAB, dtype=torch.float32) * 3
    params = (torch.full((batch,), 0.8, device=DEVICE), torch.full((batch,), top_k, device=DEVICE),
              torch.full((batch,), top_p, device=DEVICE), torch.arange(batch, device=DEVICE) * 7919,
              torch.zeros(batch, dtype=torch.int64, device=DEVICE))
    return Case("sample", f"B={batch} top_k={top_k} top_p={top_p}",
                triton=lambda: sampling.sample(logits, *params),
                reference=lambda: sampling.sample_ref(logits, *params),
                bytes=batch * VOCAB * logits.element_size(), note="ref: the sort-based sample_ref")


def _split(tokens: int, parts: int) -> list[int]:
    """tokens cut into `parts` near-equal sequence lengths (the remainder goes to the last)."""
    return [tokens // parts] * (parts - 1) + [tokens - tokens // parts * (parts - 1)]


def plan(w: Workload) -> dict[str, list[Callable[[], Case]]]:
    """Kernel name -> its cases at workload w, built lazily so only one case's tensors are alive."""
    decode_b, prefill_t = max(w.decode_batches), max(t for t, _ in w.prefill_packs)
    merged = w.vision_patches // MERGE
    return {
        "rms_norm": [partial(rms_norm_case, "text decode", decode_b, TEXT_HIDDEN, False),
                     partial(rms_norm_case, "text prefill", prefill_t, TEXT_HIDDEN, False),
                     partial(rms_norm_case, "vision", w.vision_patches, VISION_HIDDEN, True)],
        "sandwich_rms_norm": [partial(sandwich_rms_norm_case, "decode", decode_b),
                              partial(sandwich_rms_norm_case, "prefill", prefill_t)],
        "silu_and_mul": [partial(silu_and_mul_case, "text decode", decode_b, TEXT_INTER),
                         partial(silu_and_mul_case, "text prefill / merger", prefill_t, TEXT_INTER),
                         partial(silu_and_mul_case, "vision", w.vision_patches, VISION_INTER)],
        "layer_norm_gelu": [partial(layer_norm_gelu_case, merged)],
        "norm_linear": [partial(norm_linear_case, label, m, n, silu) for label, n, silu
                        in zip(("qkv", "gate_up"), w.fused_outputs, (False, True))
                        for m in w.fused_rows],
        "vision_qk_norm_rope": [partial(vision_rope_case, w.vision_patches)],
        "mrope_write_kv": [partial(mrope_write_kv_case, "decode", decode_b, False),
                           partial(mrope_write_kv_case, "prefill", prefill_t, True)],
        "varlen_attention": [
            *(partial(varlen_attention_case, "vision", [w.vision_patches // n] * n,
                      VISION_HEADS, VISION_HEADS, VISION_HEAD_DIM, False) for n in w.vision_images),
            *(partial(varlen_attention_case, "prefill causal", _split(t, s),
                      TEXT_HEADS, TEXT_KV_HEADS, TEXT_HEAD_DIM, True) for t, s in w.prefill_packs)],
        "paged_decode_attention": [partial(paged_decode_case, b, c)
                                   for b, c in itertools.product(w.decode_batches, w.decode_contexts)]
                                  + [partial(paged_decode_case, b, max(w.decode_contexts), 4) for b in w.decode_batches],
        "paged_prefill_attention": [partial(paged_prefill_case, c, p) for c, p in w.prefill_chunks],
        "invariant_linear": [partial(invariant_linear_case, label, m, n, silu, norm)
                             for label, n, silu, norm in (("qkv", w.fused_outputs[0], False, True),
                                                          ("gate_up", w.fused_outputs[1], True, True),
                                                          ("lm_head", VOCAB, False, False))
                             for m in w.invariant_rows],
        "invariant_decode_attention": [partial(invariant_decode_case, b, c) for c in w.invariant_contexts
                                       for b in w.invariant_rows if b <= max(w.decode_batches)],
        "invariant_prefill_attention": [partial(invariant_prefill_case, c, p) for c, p in w.prefill_chunks[:2]],
        "argmax": [partial(argmax_case, b) for b in w.decode_batches],
        "sample": [partial(sample_case, b, k, p) for k, p in ((0, 1.0), (50, 0.9)) for b in w.decode_batches],
        "token_bitmask": [partial(token_bitmask_case, b) for b in w.decode_batches],
        "repetition_penalty": [partial(repetition_penalty_case, b, max(w.decode_contexts))
                               for b in (min(w.decode_batches), decode_b)],
    }


# ----------------------------------------------------------------------------- measuring


def time_ms(fn: Callable[[], object], smoke: bool) -> float:
    """Median ms of fn over do_bench's reps (cold L2 each), or one synchronized call in smoke runs."""
    if not smoke:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    if HAS_CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if HAS_CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _copy_ms(copy_bytes: int, smoke: bool) -> float:
    """Milliseconds of one device-to-device copy of copy_bytes."""
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), smoke)


def measure_peaks(smoke: bool) -> Peaks:
    """The device's own ceilings: a large device-to-device copy (read + write bytes) and a square
    matmul in the benchmark dtype (2 n^3 FLOPs)."""
    copy_bytes = 64 * 2**20 if smoke else 2 * 2**30
    copy_ms = _copy_ms(copy_bytes, smoke)  # its 4 GiB of buffers are freed before the matmul's
    n = 512 if smoke else 8192
    a, b, c = _randn(n, n), _randn(n, n), _randn(n, n)
    matmul_ms = time_ms(lambda: torch.mm(a, b, out=c), smoke)
    return Peaks(copy_bytes, copy_ms, 2 * copy_bytes / copy_ms / 1e6,
                 n, matmul_ms, 2 * n**3 / matmul_ms / 1e9)


def _pairs(actual: object, expected: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(actual, torch.Tensor):
        return [(actual, expected)]
    return list(zip(actual, expected, strict=True))


def compare(actual: object, expected: object) -> tuple[bool, float]:
    """(all allclose at the output dtype's tolerance, max abs error) over tensors or tuples of them."""
    ok, err = True, 0.0
    for a, e in _pairs(actual, expected):
        tol = TOLERANCE.get(e.dtype, 0.0)
        a, e = a.float(), e.float()
        ok &= a.shape == e.shape and torch.allclose(a, e, atol=tol, rtol=tol)
        err = max(err, (a - e).abs().max().item() if a.numel() else 0.0)
    return ok, err


def run_case(case: Case, peaks: Peaks, smoke: bool) -> Result:
    ok, err = compare(*(case.check() if case.check else (case.triton(), case.reference())))
    triton_ms = time_ms(case.triton, smoke)
    ref_ms = time_ms(case.reference, smoke) if case.reference else None
    sdpa_ms = time_ms(case.sdpa, smoke) if case.sdpa else None
    if case.flops is not None:
        achieved, unit, peak = case.flops / triton_ms / 1e9, "TFLOP/s", peaks.matmul_tflops
    else:
        achieved, unit, peak = case.bytes / triton_ms / 1e6, "GB/s", peaks.copy_gbps
    pct = 100 * achieved / peak if HAS_CUDA else None
    if pct is None:
        status = "n/a"
    elif case.target is None:
        status = "-"
    else:
        status = "PASS" if pct >= 100 * case.target else "MISS"
    return Result(case.kernel, case.name, triton_ms, ref_ms, sdpa_ms, case.bytes, case.flops,
                  achieved, unit, pct, None if case.target is None else 100 * case.target,
                  status, "ok" if ok else "FAIL", err,
                  "; ".join(filter(None, [case.note, None if ok else f"max abs error {err:.3g}"])))


# ----------------------------------------------------------------------------- reporting

COLUMNS = ("kernel", "case", "triton ms", "ref ms", "x ref", "sdpa ms", "x sdpa", "achieved",
           "% peak", "target", "result", "check")
WIDTHS = (22, 52, 9, 9, 7, 9, 7, 15, 6, 6, 6, 5)


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def _speedup(other_ms: float | None, triton_ms: float | None) -> float | None:
    return None if other_ms is None or triton_ms is None else other_ms / triton_ms


def cells(r: Result) -> list[str]:
    return [r.kernel, r.case, _num(r.triton_ms),
            _num(r.reference_ms), _num(_speedup(r.reference_ms, r.triton_ms), ".3g"),
            _num(r.sdpa_ms), _num(_speedup(r.sdpa_ms, r.triton_ms), ".3g"),
            "-" if r.achieved is None else f"{r.achieved:.4g} {r.unit}",
            _num(r.peak_pct, ".1f") if HAS_CUDA else "n/a",
            "-" if r.target_pct is None else f">={r.target_pct:.0f}%", r.status, r.check]


def console_row(values: list[str]) -> str:
    return " ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, WIDTHS)))


def write_reports(out: Path, meta: dict, peaks: Peaks, results: list[Result]) -> tuple[Path, Path]:
    lines = [f"# glmrt kernels on {meta['device']['name']}", "", provenance(meta),
             f"- {meta['dtype']}, {meta['timing']}",
             f"- measured peaks: copy {peaks.copy_gbps:.0f} GB/s ({peaks.copy_bytes / 2**20:.0f} MiB "
             f"device-to-device), matmul {peaks.matmul_tflops:.4g} TFLOP/s ({peaks.matmul_n}^3)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in results]
    notes = [f"- {r.kernel} {r.case}: {r.note}" for r in results if r.note]
    return write_report(out, "kernels", meta, dict(peaks=asdict(peaks), cases=[asdict(r) for r in results]),
                        lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kernels = list(plan(REAL))
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; "
                        "a temp folder with --smoke)")
    parser.add_argument("--only", nargs="+", choices=kernels, metavar="NAME",
                        help=f"run only these kernels: {', '.join(kernels)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one rep (CPU-capable)")
    args = parser.parse_args(argv)
    if not HAS_CUDA and not args.smoke:
        parser.error("no CUDA device: only --smoke runs here (in Triton's interpreter)")
    out = output_dir(args.out, args.smoke)
    torch.manual_seed(0)

    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=args.smoke,
                    timing="one synchronized call" if args.smoke
                    else "triton.testing.do_bench median, L2 flushed before every rep")
    print(f"device: {meta['device']['name']}; torch {meta['torch']}, triton {meta['triton']}, "
          f"commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}, {meta['dtype']}")
    peaks = measure_peaks(args.smoke)
    print(f"measured peaks: copy {peaks.copy_gbps:.0f} GB/s, matmul {peaks.matmul_tflops:.4g} TFLOP/s"
          + ("" if HAS_CUDA else " (CPU: no % of peak)"))
    print(console_row(list(COLUMNS)))

    results = []
    for kernel, builders in plan(SMOKE if args.smoke else REAL).items():
        if args.only and kernel not in args.only:
            continue
        for build in builders:
            try:
                case = build()
                result = run_case(case, peaks, args.smoke)
            except Exception as exc:  # a crash or OOM costs one row, not the whole run
                traceback.print_exc()
                result = Result(kernel, " ".join(map(str, build.args)), None, None, None, None,
                                None, None, "", None, None, "-", "ERROR", None,
                                f"{type(exc).__name__}: {exc}")
            finally:
                case = None  # drop this case's tensors before the next one is built
                if HAS_CUDA:
                    torch.cuda.empty_cache()
            results.append(result)
            print(console_row(cells(result)), flush=True)

    write_reports(out, meta, peaks, results)
    bad = [r for r in results if r.check != "ok"]
    if bad:
        print(f"{len(bad)} case(s) failed their correctness check or raised: "
              + ", ".join(f"{r.kernel} {r.case}" for r in bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
