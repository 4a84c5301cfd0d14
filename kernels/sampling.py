"""Greedy token choice and the repetition penalty over a batch of logits rows, on the device.

argmax: one program per row loops over the vocabulary (59,392 for GLM-OCR) in BLOCK-wide tiles,
keeping a per-lane running (max, index); one launch, no partial buffers, so a decode step stays
graph-capturable. Ties go to the lowest index and a NaN wins over any number, as in torch.argmax.

repetition penalty (transformers' RepetitionPenaltyLogitsProcessor): every vocabulary entry that
a row's prompt or output contains is penalised once, however often it occurs. The engine keeps a
per-row presence mask [B, V] on the device (seeded from the prompt at admission, one entry set per
sampled token), so the penalty is one elementwise pass whose cost does not grow with the history
and whose inputs never change shape: it is captured in the decode graph.

token bitmask (structured outputs): the engine computes, on the host with llguidance, which tokens
each constrained row may take next (bit v % 32 of int32 word v // 32 set = token v allowed) while
the device runs the decoder forward; this kernel then sets every disallowed logit to -inf, before
the penalty, temperature and draw. Allowed entries are never rewritten (masked store).
"""
import torch
import triton
import triton.language as tl

_ARGMAX_BLOCK = 4096  # logits per loop step: 16 per thread at 8 warps
_PENALTY_BLOCK = 4096  # vocabulary entries per program
_BITMASK_BLOCK = 4096  # vocabulary entries per program (128 mask words)


@triton.jit
def _argmax_kernel(logits_ptr, out_ptr, V, stride_row, BLOCK: tl.constexpr):
    # logits [B, V] (row stride stride_row) -> out [B] int64
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = lanes  # an all -inf row (any length) still resolves to index 0 below
    for start in range(0, V, BLOCK):
        cols = start + lanes
        x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < V,
                    other=float("-inf")).to(tl.float32)
        # strictly greater keeps a lane's earliest index among equals; the first NaN sticks
        take = (x > best) | ((x != x) & (best == best))
        best = tl.where(take, x, best)
        best_idx = tl.where(take, cols, best_idx)
    is_nan = best != best
    first_nan = tl.min(tl.where(is_nan, best_idx, V), axis=0)
    top = tl.max(tl.where(is_nan, float("-inf"), best), axis=0)
    first_top = tl.min(tl.where(best == top, best_idx, V), axis=0)
    tl.store(out_ptr + row, tl.where(first_nan < V, first_nan, first_top).to(tl.int64))


@triton.jit
def _penalty_kernel(logits_ptr, presence_ptr, penalty_ptr, V, stride_lrow, stride_prow, BLOCK: tl.constexpr):
    # grid (B, cdiv(V, BLOCK)): logits[b, v] penalised where presence[b, v]; a penalty of 1 is exact
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    seen = tl.load(presence_ptr + row * stride_prow + cols, mask=mask, other=0) != 0
    ptrs = logits_ptr + row * stride_lrow + cols
    score = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    penalty = tl.load(penalty_ptr + row)
    penalised = tl.where(score < 0, score * penalty, tl.math.div_rn(score, penalty))
    tl.store(ptrs, penalised.to(logits_ptr.dtype.element_ty), mask=mask & seen)


@triton.jit
def _token_bitmask_kernel(logits_ptr, mask_ptr, V, stride_lrow, stride_mrow, BLOCK: tl.constexpr):
    # grid (B, cdiv(V, BLOCK)): logits[b, v] = -inf where bit v % 32 of mask[b, v // 32] is 0
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < V
    words = tl.load(mask_ptr + row * stride_mrow + cols // 32, mask=inside, other=-1)
    allowed = ((words >> (cols % 32)) & 1) != 0  # arithmetic shift: `& 1` keeps the wanted bit
    ptrs = logits_ptr + row * stride_lrow + cols
    minus_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(ptrs, minus_inf, mask=inside & ~allowed)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be fp32, fp16 or bf16, got {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous over the vocab, got strides {logits.stride()}")


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (rows may be strided) -> [B] int64 index of each row's max (lowest on ties)."""
    _check_logits(logits)
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits has an empty vocab dim; argmax is undefined")
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B > 0:
        block = min(triton.next_power_of_2(V), _ARGMAX_BLOCK)
        _argmax_kernel[(B,)](logits, out, V, logits.stride(0), BLOCK=block,
                             num_warps=min(max(block // 512, 1), 8))
    return out


def apply_repetition_penalty_(logits: torch.Tensor, presence: torch.Tensor,
                              penalty: torch.Tensor) -> torch.Tensor:
    """In place on logits [B, V]: where presence[b, v] (a [B, V] bool mask), logits[b, v] becomes
    logits[b, v] * penalty[b] if negative, else logits[b, v] / penalty[b]. Returns logits."""
    _check_presence(logits, presence, penalty)
    B, V = logits.shape
    if B > 0 and V > 0:
        block = min(triton.next_power_of_2(V), _PENALTY_BLOCK)
        _penalty_kernel[(B, triton.cdiv(V, block))](
            logits, presence.view(torch.uint8), penalty, V, logits.stride(0), presence.stride(0),
            BLOCK=block, num_warps=4,
        )
    return logits


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """In place on logits [B, V]: entry v of row b becomes -inf unless bit v % 32 of
    bitmask[b, v // 32] (an int32 [B, >= ceil(V / 32)] mask, llguidance's layout) is set. Returns logits."""
    _check_bitmask(logits, bitmask)
    B, V = logits.shape
    if B > 0 and V > 0:
        block = min(triton.next_power_of_2(V), _BITMASK_BLOCK)
        _token_bitmask_kernel[(B, triton.cdiv(V, block))](logits, bitmask, V, logits.stride(0), bitmask.stride(0),
                                                          BLOCK=block, num_warps=4)
    return logits


def _check_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    _check_logits(logits)
    B, V = logits.shape
    words = (V + 31) // 32
    if (bitmask.dim() != 2 or bitmask.shape[0] != B or bitmask.shape[1] < words or bitmask.dtype != torch.int32
            or bitmask.device != logits.device or (bitmask.numel() and bitmask.stride(1) != 1)):
        raise ValueError(f"bitmask must be a [{B}, >= {words}] int32 tensor on {logits.device}, contiguous over "
                         f"its words, got {tuple(bitmask.shape)} {bitmask.dtype} on {bitmask.device}")


def _check_presence(logits: torch.Tensor, presence: torch.Tensor, penalty: torch.Tensor) -> None:
    _check_logits(logits)
    B, V = logits.shape
    if presence.shape != (B, V) or presence.dtype != torch.bool or presence.device != logits.device:
        raise ValueError(f"presence must be a [{B}, {V}] bool tensor on {logits.device}, "
                         f"got {tuple(presence.shape)} {presence.dtype} on {presence.device}")
    if presence.stride(1) != 1:
        raise ValueError(f"presence must be contiguous over the vocab, got strides {presence.stride()}")
    if penalty.shape != (B,) or penalty.dtype != torch.float32 or penalty.device != logits.device:
        raise ValueError(f"penalty must be a [{B}] fp32 tensor on {logits.device}, "
                         f"got {tuple(penalty.shape)} {penalty.dtype} on {penalty.device}")


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of `argmax`."""
    return torch.argmax(logits, dim=-1)


def apply_repetition_penalty_ref(logits: torch.Tensor, presence: torch.Tensor,
                                 penalty: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of `apply_repetition_penalty_`, out of place: transformers' math
    (where(score < 0, score * p, score / p)) on the entries the presence mask names."""
    _check_presence(logits, presence, penalty)
    p = penalty[:, None]
    score = logits.float()
    penalised = torch.where(score < 0, score * p, score / p).to(logits.dtype)
    return torch.where(presence, penalised, logits)


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of `apply_token_bitmask_`, out of place."""
    _check_bitmask(logits, bitmask)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, : logits.shape[1]]  # [B, 32 W] -> [B, V]
    return logits.masked_fill(~allowed, float("-inf"))
