"""Greedy token choice and the repetition penalty over a batch of logits rows, on the device.

argmax: one program per row loops over the vocabulary (59,392 for GLM-OCR) in BLOCK-wide tiles,
keeping a per-lane running (max, index); one launch, no partial buffers, so a decode step stays
graph-capturable. Ties go to the lowest index and a NaN wins over any number, as in torch.argmax.

repetition penalty (transformers' RepetitionPenaltyLogitsProcessor): every vocabulary entry named
in a row's token ids is penalised exactly once, however often it repeats. Done as gather, then
scatter, in two launches: the first reads every named score and writes its penalised value to a
[B, L] buffer, the second writes those values back. Duplicates write the same value and the
launch boundary orders all reads before all writes, so a score is never penalised twice; the
work is O(B * L), independent of the vocabulary.
"""
import torch
import triton
import triton.language as tl

_ARGMAX_BLOCK = 4096  # logits per loop step: 16 per thread at 8 warps
_PENALTY_BLOCK = 1024  # token ids per program


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
def _penalty_gather_kernel(
    logits_ptr, ids_ptr, penalty_ptr, vals_ptr, penalty, V, L, stride_lrow, stride_irow,
    BLOCK: tl.constexpr, PER_ROW: tl.constexpr,
):
    # grid (B, cdiv(L, BLOCK)): vals[b, j] = penalise(logits[b, ids[b, j]]); ids outside [0, V) skipped
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + row * stride_irow + offs, mask=offs < L, other=-1).to(tl.int64)
    valid = (ids >= 0) & (ids < V)
    score = tl.load(logits_ptr + row * stride_lrow + ids, mask=valid, other=0.0).to(tl.float32)
    if PER_ROW:
        penalty = tl.load(penalty_ptr + row)
    penalised = tl.where(score < 0, score * penalty, tl.math.div_rn(score, penalty))
    tl.store(vals_ptr + row * L + offs, penalised.to(vals_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _penalty_scatter_kernel(
    logits_ptr, ids_ptr, vals_ptr, V, L, stride_lrow, stride_irow,
    BLOCK: tl.constexpr,
):
    # grid (B, cdiv(L, BLOCK)): logits[b, ids[b, j]] = vals[b, j] (duplicates carry equal values)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + row * stride_irow + offs, mask=offs < L, other=-1).to(tl.int64)
    valid = (ids >= 0) & (ids < V)
    vals = tl.load(vals_ptr + row * L + offs, mask=valid)
    tl.store(logits_ptr + row * stride_lrow + ids, vals, mask=valid)


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


def apply_repetition_penalty_(logits: torch.Tensor, token_ids: torch.Tensor,
                              penalty: float | torch.Tensor) -> torch.Tensor:
    """In place on logits [B, V]: for every distinct id v >= 0 in token_ids[b] (a [B, L] int32/int64
    tensor, -1 = padding), logits[b, v] becomes logits[b, v] * p if negative, else logits[b, v] / p.
    penalty: one float for every row, or a [B] tensor of per-row penalties. Returns logits."""
    _check_logits(logits)
    B, V = logits.shape
    if token_ids.dim() != 2 or token_ids.shape[0] != B:
        raise ValueError(f"token_ids must be [{B}, L], got shape {tuple(token_ids.shape)}")
    if token_ids.dtype not in (torch.int32, torch.int64) or token_ids.device != logits.device:
        raise ValueError(f"token_ids must be int32/int64 on {logits.device}, "
                         f"got {token_ids.dtype} on {token_ids.device}")
    if token_ids.stride(1) != 1:
        raise ValueError(f"token_ids must be contiguous along L, got strides {token_ids.stride()}")
    per_row = isinstance(penalty, torch.Tensor)
    if per_row and (penalty.shape != (B,) or penalty.dtype != torch.float32
                    or penalty.device != logits.device or penalty.stride(0) != 1):
        raise ValueError(f"penalty tensor must be a contiguous [{B}] fp32 tensor on "
                         f"{logits.device}, got {tuple(penalty.shape)} {penalty.dtype} "
                         f"{penalty.device}")
    L = token_ids.shape[1]
    if B == 0 or L == 0:
        return logits
    vals = torch.empty((B, L), dtype=logits.dtype, device=logits.device)
    block = min(triton.next_power_of_2(L), _PENALTY_BLOCK)
    grid = (B, triton.cdiv(L, block))
    _penalty_gather_kernel[grid](
        logits, token_ids, penalty if per_row else vals, vals, 1.0 if per_row else float(penalty),
        V, L, logits.stride(0), token_ids.stride(0), BLOCK=block, PER_ROW=per_row, num_warps=4,
    )
    _penalty_scatter_kernel[grid](
        logits, token_ids, vals, V, L, logits.stride(0), token_ids.stride(0),
        BLOCK=block, num_warps=4,
    )
    return logits


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of `argmax`."""
    return torch.argmax(logits, dim=-1)


def apply_repetition_penalty_ref(logits: torch.Tensor, token_ids: torch.Tensor,
                                 penalty: float | torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of `apply_repetition_penalty_`, out of place: the math of transformers'
    RepetitionPenaltyLogitsProcessor (gather, where(score < 0, score * p, score / p), scatter),
    with -1 padding ids pointed at an extra column that is dropped afterwards."""
    V = logits.shape[1]
    ids = torch.where(token_ids < 0, V, token_ids.clamp(max=V)).long()
    scores = torch.nn.functional.pad(logits, (0, 1))
    score = torch.gather(scores, 1, ids)
    if isinstance(penalty, torch.Tensor):
        p = penalty[:, None]
        score = torch.where(score < 0, score.float() * p, score.float() / p).to(logits.dtype)
    else:
        score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, ids, score)[:, :V]
