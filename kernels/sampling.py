"""Greedy token choice, repetition penalty, token bitmask and sampling over a batch of logits rows, on the device.

argmax: one program per row loops over the vocabulary (59,392 for GLM-OCR) in BLOCK-wide tiles,
keeping a per-lane running (max, index); one launch, no partial buffers, so a decode step stays
graph-capturable. Ties go to the lowest index and a NaN wins over any number, as in torch.argmax.

repetition penalty (transformers' RepetitionPenaltyLogitsProcessor): every vocabulary entry that
a row's prompt or output contains is penalised once, however often it occurs. The engine keeps a
per-row presence mask [B, V] on the device (seeded from the prompt at admission, one entry set per
sampled token), so the penalty's cost does not grow with the history and its inputs never change
shape: it is captured in the decode graph. argmax and sample take the mask and apply the penalty
as they read each tile of the row (no pass, no copy of the logits of their own); the elementwise
kernel remains for the speculative verify step, whose positions each see their own mask.

token bitmask (structured outputs): the engine computes, on the host with llguidance, which tokens
each constrained row may take next (bit v % 32 of int32 word v // 32 set = token v allowed) while
the device runs the decoder forward. argmax and sample take the mask [B, >= ceil(V / 32)] and
apply it as they read each tile of the row: every disallowed logit is -inf before the penalty,
temperature and draw, at the cost of reading the row's words (an unconstrained row's are all -1).
The elementwise kernel, which writes -inf over the disallowed entries and never rewrites allowed
ones (masked store), remains for the speculative verify step and the reference.

sample: temperature, top-k, top-p and the seeded draw of a row in one program, without sorting the
vocabulary. The top-k and top-p cuts are values found by searching the order-preserving int32
keys of the fp32 scores (SEARCH_WAYS pivots per pass over the row, so a 32-bit key range takes 8
passes): the k-th largest score is the largest key with at least k scores at or above it, the
top-p cut the largest key whose scores at or above it hold top_p of the probability mass. A row
with top_k off and top_p = 1 skips both searches (two passes: greedy argmax, draw). The draw is
the exponential race in the log domain, argmax over kept v of s_v - log(E_v), E_v = -log(u_v),
which picks v with probability softmax(s)_v over the kept set; u is `hashed_uniform`, a
counter-based hash of (row seed, row counter, vocabulary id), so a row's draw depends on nothing
else in the batch.
"""
import torch
import triton
import triton.language as tl

_ARGMAX_BLOCK = 4096  # logits per loop step: 16 per thread at 8 warps
_PENALTY_BLOCK = 4096  # vocabulary entries per program
_BITMASK_BLOCK = 4096  # vocabulary entries per program (128 mask words)
_SAMPLE_BLOCK = 2048  # logits per loop step of `sample`: 8 per thread at 8 warps, [8, SEARCH_WAYS] in a search
SEARCH_WAYS = 16  # pivots per search pass: 4 bits of the 32-bit key range per pass over the row

# splitmix64's constants as signed int64 (torch has no uint64 arithmetic); products wrap.
# constexpr so that kernels may read them; the torch code takes their .value.
_GOLDEN = tl.constexpr(-7046029254386353131)  # 0x9E3779B97F4A7C15
_MIX1 = tl.constexpr(-4658895280553007687)  # 0xBF58476D1CE4E5B9
_MIX2 = tl.constexpr(-7723592293110705685)  # 0x94D049BB133111EB


@triton.jit
def _logits(row_ptr, seen_ptr, penalty, words_ptr, cols, V, HAS_PENALTY: tl.constexpr, HAS_MASK: tl.constexpr):
    # the fp32 logits of one row's tile at cols (-inf past the row): -inf where the row's token
    # bitmask (words_ptr, int32) has the token's bit clear, as _token_bitmask_kernel writes; then
    # the repetition penalty where the row's presence mask (seen_ptr, uint8) is set: the math of
    # _penalty_kernel (-inf stays -inf)
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    if HAS_MASK:
        words = tl.load(words_ptr + cols // 32, mask=cols < V, other=0)
        allowed = ((words >> (cols % 32)) & 1) != 0  # arithmetic shift: `& 1` keeps the wanted bit
        x = tl.where(allowed, x, float("-inf"))
    if HAS_PENALTY:
        seen = tl.load(seen_ptr + cols, mask=cols < V, other=0) != 0
        x = tl.where(seen, tl.where(x < 0, x * penalty, tl.math.div_rn(x, penalty)), x)
    return x


@triton.jit
def _row_argmax(row_ptr, seen_ptr, penalty, words_ptr, V, BLOCK: tl.constexpr, HAS_PENALTY: tl.constexpr,
                HAS_MASK: tl.constexpr):
    # one row [V] (masked and penalised, see _logits) -> (its argmax as int64: the lowest index
    # among equal maxima, the first NaN if any; its largest non-NaN value; the first NaN's index, or
    # V without one)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = lanes  # an all -inf row (any length) still resolves to index 0 below
    for start in range(0, V, BLOCK):
        cols = start + lanes
        x = _logits(row_ptr, seen_ptr, penalty, words_ptr, cols, V, HAS_PENALTY, HAS_MASK)
        # strictly greater keeps a lane's earliest index among equals; the first NaN sticks
        take = (x > best) | ((x != x) & (best == best))
        best = tl.where(take, x, best)
        best_idx = tl.where(take, cols, best_idx)
    is_nan = best != best
    first_nan = tl.min(tl.where(is_nan, best_idx, V), axis=0)
    top = tl.max(tl.where(is_nan, float("-inf"), best), axis=0)
    first_top = tl.min(tl.where(best == top, best_idx, V), axis=0)
    return tl.where(first_nan < V, first_nan, first_top).to(tl.int64), top, first_nan


@triton.jit
def _argmax_kernel(logits_ptr, out_ptr, presence_ptr, penalty_ptr, mask_ptr, V, stride_row, stride_prow, stride_mrow,
                   BLOCK: tl.constexpr, HAS_PENALTY: tl.constexpr, HAS_MASK: tl.constexpr):
    # logits [B, V] (row stride stride_row), -inf where the token bitmask [B, >= ceil(V / 32)]
    # (int32, row stride stride_mrow) has the bit clear when HAS_MASK, then penalised where
    # presence [B, V] (uint8, row stride stride_prow) is set by penalty [B] when HAS_PENALTY
    # -> out [B] int64
    row = tl.program_id(0).to(tl.int64)
    penalty = tl.load(penalty_ptr + row) if HAS_PENALTY else 1.0
    token, _, _ = _row_argmax(logits_ptr + row * stride_row, presence_ptr + row * stride_prow, penalty,
                              mask_ptr + row * stride_mrow, V, BLOCK, HAS_PENALTY, HAS_MASK)
    tl.store(out_ptr + row, token)


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


@triton.jit
def _shr_t(z, s: tl.constexpr):
    # logical right shift of int64 bit patterns (>> is arithmetic on signed ints)
    return (z >> s) & ((1 << (64 - s)) - 1)


@triton.jit
def _mix64_t(z):
    z = (z ^ _shr_t(z, 30)) * _MIX1
    z = (z ^ _shr_t(z, 27)) * _MIX2
    return z ^ _shr_t(z, 31)


@triton.jit
def _order_key(s):
    # fp32 -> int32 in the same order (-0 and +0 equal, -inf below every number), as int64
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(s == 0, 0, key).to(tl.int64)


@triton.jit
def _key_value(key):
    # the inverse of _order_key: an int64 key of the int32 range -> its fp32 value
    key = key.to(tl.int32)
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _scores(row_ptr, seen_ptr, penalty, words_ptr, cols, V, temperature, HAS_PENALTY: tl.constexpr,
            HAS_MASK: tl.constexpr):
    # the temperature-scaled fp32 scores of the tile at cols (masked and penalised, see _logits);
    # -inf past the row
    return tl.math.div_rn(_logits(row_ptr, seen_ptr, penalty, words_ptr, cols, V, HAS_PENALTY, HAS_MASK),
                          temperature)


@triton.jit
def _largest_reaching_key(row_ptr, seen_ptr, penalty, words_ptr, V, temperature, top, lo, hi, target,
                          MASS: tl.constexpr, BLOCK: tl.constexpr, WAYS: tl.constexpr, HAS_PENALTY: tl.constexpr,
                          HAS_MASK: tl.constexpr):
    # The largest key t in [lo, hi] whose scores >= t weigh at least target, taking lo to reach
    # (the caller's fallback). Weight: 1 per score (MASS False), or exp(s - top). Each pass over
    # the row weighs WAYS pivots spread over (lo, hi], the last one hi, and keeps the range between
    # the last pivot that reaches and the next; the weights fall as t grows, so the pivots that
    # reach are a prefix.
    ways = tl.arange(0, WAYS).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    while lo < hi:
        span = hi - lo
        pivots = lo + ((ways + 1) * span + WAYS - 1) // WAYS  # [WAYS] ascending, ceil
        weight = tl.zeros([WAYS], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + lanes
            s = _scores(row_ptr, seen_ptr, penalty, words_ptr, cols, V, temperature, HAS_PENALTY, HAS_MASK)
            if MASS:
                w = tl.exp(s - top)  # 0 past the row (-inf)
            else:
                w = tl.where(cols < V, 1.0, 0.0)
            above = _order_key(s)[:, None] >= pivots[None, :]  # [BLOCK, WAYS]
            weight += tl.sum(tl.where(above, w[:, None], 0.0), axis=0)
        last = tl.max(tl.where(weight >= target, ways, -1), axis=0)
        new_lo = tl.where(last >= 0, lo + ((last + 1) * span + WAYS - 1) // WAYS, lo)
        hi = tl.where(last + 1 < WAYS, lo + ((last + 2) * span + WAYS - 1) // WAYS - 1, hi)
        lo = new_lo
    return lo


@triton.jit
def _sample_kernel(logits_ptr, out_ptr, presence_ptr, penalty_ptr, mask_ptr, temperature_ptr, top_k_ptr, top_p_ptr,
                   seeds_ptr, counters_ptr, V, stride_row, stride_prow, stride_mrow, BLOCK: tl.constexpr,
                   WAYS: tl.constexpr, HAS_PENALTY: tl.constexpr, HAS_MASK: tl.constexpr):
    # logits [B, V] (row stride stride_row; masked and penalised as in _argmax_kernel), per-row
    # parameters [B] -> out [B] int64
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    seen_ptr = presence_ptr + row * stride_prow
    words_ptr = mask_ptr + row * stride_mrow
    penalty = tl.load(penalty_ptr + row) if HAS_PENALTY else 1.0
    lanes = tl.arange(0, BLOCK)
    # the greedy token
    token, top, first_nan = _row_argmax(row_ptr, seen_ptr, penalty, words_ptr, V, BLOCK, HAS_PENALTY, HAS_MASK)

    temperature = tl.load(temperature_ptr + row)
    top = tl.math.div_rn(top, tl.where(temperature > 0, temperature, 1.0))  # the largest score
    if (temperature > 0) & (first_nan == V) & (tl.abs(top) < float("inf")):
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        floor = tl.full([], float("-inf"), tl.float32)  # the smallest kept score
        if (top_k > 0) & (top_k < V):  # the k-th largest score
            floor = _key_value(_largest_reaching_key(row_ptr, seen_ptr, penalty, words_ptr, V, temperature, top,
                                                     _order_key(floor), _order_key(top), top_k.to(tl.float32),
                                                     False, BLOCK, WAYS, HAS_PENALTY, HAS_MASK))
        if top_p < 1:  # the largest score whose scores at or above it hold top_p of the kept mass
            mass = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                s = _scores(row_ptr, seen_ptr, penalty, words_ptr, start + lanes, V, temperature, HAS_PENALTY,
                            HAS_MASK)
                mass += tl.where(s >= floor, tl.exp(s - top), 0.0)
            target = top_p * tl.sum(mass, axis=0)
            floor = _key_value(_largest_reaching_key(row_ptr, seen_ptr, penalty, words_ptr, V, temperature, top,
                                                     _order_key(floor), _order_key(top), target, True, BLOCK, WAYS,
                                                     HAS_PENALTY, HAS_MASK))
        # the race over the kept scores: argmax of s - log(E), lowest index on ties
        stream = _mix64_t(tl.load(seeds_ptr + row) * _GOLDEN + tl.load(counters_ptr + row))
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = lanes
        for start in range(0, V, BLOCK):
            cols = start + lanes
            s = _scores(row_ptr, seen_ptr, penalty, words_ptr, cols, V, temperature, HAS_PENALTY, HAS_MASK)
            bits = _mix64_t(stream + (cols.to(tl.int64) + 1) * _GOLDEN)
            u = (_shr_t(bits, 41) * 2 + 1).to(tl.float32) * (1.0 / (1 << 24))
            key = tl.where(s >= floor, s - tl.log(-tl.log(u)), float("-inf"))
            take = key > best
            best = tl.where(take, key, best)
            best_idx = tl.where(take, cols, best_idx)
        drawn = tl.max(best, axis=0)
        token = tl.min(tl.where(best == drawn, best_idx, V), axis=0).to(tl.int64)
    tl.store(out_ptr + row, token)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be fp32, fp16 or bf16, got {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous over the vocab, got strides {logits.stride()}")


def _penalty_args(logits: torch.Tensor, presence: torch.Tensor | None, penalty: torch.Tensor | None) -> tuple:
    """A kernel's (presence, penalty, presence row stride, HAS_PENALTY) arguments; without a
    presence mask, logits stands in for the pointers the kernel does not read."""
    if presence is None and penalty is None:
        return logits, logits, 0, False
    if presence is None or penalty is None:
        raise ValueError("presence and penalty go together: give both or neither")
    _check_presence(logits, presence, penalty)
    return presence.view(torch.uint8), penalty, presence.stride(0), True


def _bitmask_args(logits: torch.Tensor, bitmask: torch.Tensor | None) -> tuple:
    """A kernel's (bitmask, bitmask row stride, HAS_MASK) arguments; without a bitmask, logits
    stands in for the pointer the kernel does not read."""
    if bitmask is None:
        return logits, 0, False
    _check_bitmask(logits, bitmask)
    return bitmask, bitmask.stride(0), True


def argmax(logits: torch.Tensor, presence: torch.Tensor | None = None, penalty: torch.Tensor | None = None,
           bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (rows may be strided) -> [B] int64 index of each row's max (lowest on ties).
    With bitmask [B, >= ceil(V / 32)] int32 (llguidance's layout, rows may be strided): every entry
    whose bit is clear is -inf first (apply_token_bitmask_'s rule); a row that allows nothing gives
    index 0. With presence [B, V] bool and penalty [B] fp32: the max of the repetition-penalised
    fp32 logits (apply_repetition_penalty_'s math). Both are applied as the row is read: logits
    are not written."""
    _check_logits(logits)
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits has an empty vocab dim; argmax is undefined")
    presence_arg, penalty_arg, stride_prow, has_penalty = _penalty_args(logits, presence, penalty)
    bitmask_arg, stride_mrow, has_mask = _bitmask_args(logits, bitmask)
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B > 0:
        block = min(triton.next_power_of_2(V), _ARGMAX_BLOCK)
        _argmax_kernel[(B,)](logits, out, presence_arg, penalty_arg, bitmask_arg, V, logits.stride(0), stride_prow,
                             stride_mrow, BLOCK=block, HAS_PENALTY=has_penalty, HAS_MASK=has_mask,
                             num_warps=min(max(block // 512, 1), 8))
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, counters: torch.Tensor, presence: torch.Tensor | None = None,
           penalty: torch.Tensor | None = None, bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] fp32, fp16 or bf16 (rows may be strided; read as fp32); temperature [B] fp32
    (0: greedy); top_k [B] int64 (<= 0 or >= V: off); top_p [B] fp32 (>= 1: off); seeds, counters
    [B] int64; presence [B, V] bool and penalty [B] fp32 (optional: the repetition penalty, as in
    `argmax`); bitmask [B, >= ceil(V / 32)] int32 (optional: the token bitmask, as in `argmax`,
    before everything else; a row that allows nothing gives its greedy token, 0) -> [B] int64
    tokens, those `sample_ref` picks (see there). logits are not written."""
    _check_sample(logits, temperature, top_k, top_p, seeds, counters)
    presence_arg, penalty_arg, stride_prow, has_penalty = _penalty_args(logits, presence, penalty)
    bitmask_arg, stride_mrow, has_mask = _bitmask_args(logits, bitmask)
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B > 0:
        block = min(triton.next_power_of_2(V), _SAMPLE_BLOCK)
        _sample_kernel[(B,)](logits, out, presence_arg, penalty_arg, bitmask_arg, temperature, top_k, top_p, seeds,
                             counters, V, logits.stride(0), stride_prow, stride_mrow, BLOCK=block, WAYS=SEARCH_WAYS,
                             HAS_PENALTY=has_penalty, HAS_MASK=has_mask, num_warps=min(max(block // 256, 1), 8))
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


def _check_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, counters: torch.Tensor) -> None:
    _check_logits(logits)
    B, V = logits.shape
    if not 0 < V < 2**24:  # counts of scores are exact fp32 sums
        raise ValueError(f"logits must have 0 < vocab < 2**24, got {tuple(logits.shape)}")
    for name, t, dtype in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int64),
                           ("top_p", top_p, torch.float32), ("seeds", seeds, torch.int64),
                           ("counters", counters, torch.int64)):
        if t.shape != (B,) or t.dtype != dtype or t.device != logits.device or (B and t.stride(0) != 1):
            raise ValueError(f"{name} must be a contiguous [{B}] {dtype} tensor on {logits.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def argmax_ref(logits: torch.Tensor, presence: torch.Tensor | None = None, penalty: torch.Tensor | None = None,
               bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch twin of `argmax`: the bitmask (when given, apply_token_bitmask_ref) on the fp32
    logits, then the penalty (when given) on the fp32 logits, then torch.argmax."""
    _penalty_args(logits, presence, penalty)  # both or neither, and their shapes
    if bitmask is not None:
        logits = apply_token_bitmask_ref(logits.float(), bitmask)
    if presence is not None:
        logits = apply_repetition_penalty_ref(logits.float(), presence, penalty)
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


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _MIX1.value
    z = (z ^ _shr(z, 27)) * _MIX2.value
    return z ^ _shr(z, 31)


def hashed_uniform(seeds: torch.Tensor, counters: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """seeds, counters [N] int64, vocab_ids [V] int64 -> [N, V] float32 uniform in (0, 1): the
    midpoints (2k + 1) / 2**24 of 2**23 cells, all exact in float32, so u < 1 and -log(u) > 0
    (with 24 bits, k + 0.5 rounds to 2**24 for the top cell: u = 1 would make -log(u) = 0, a
    race no score could lose). `sample`'s kernel computes the same bits."""
    key = _mix64(seeds * _GOLDEN.value + counters)  # [N]: one stream per (request, step)
    return uniform_from_bits(_mix64(key[:, None] + (vocab_ids + 1)[None, :] * _GOLDEN.value))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 random bit patterns -> float32 in (0, 1) from their top 23 bits."""
    return (_shr(bits, 41) * 2 + 1).float() * (1.0 / (1 << 24))


def top_k_top_p_filter_ref(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scores [B, V] fp32 (temperature-scaled logits, no NaN); top_k [B] int64; top_p [B] fp32 ->
    scores with every token outside the row's kept set -inf. The kept set is every score >= a
    floor (ties are never split):
    - top-k (0 < top_k < V): the floor is the k-th largest score, counted with multiplicity;
    - top-p (top_p < 1), within top-k's set: with p = softmax over that set, the floor rises to the
      largest score c whose scores >= c hold at least top_p of p's mass (computed as
      sum(exp(s - max)) >= top_p * sum over the set), so the kept set is the smallest set of the
      largest scores that reaches top_p, ties at the cut kept together, never empty; when rounding
      leaves even the whole set short of top_p, the whole set is kept.
    The plain-torch filtering step of `sample` (which finds the same floors without sorting)."""
    V = scores.shape[-1]
    descending = scores.sort(dim=-1, descending=True).values
    k = torch.where((top_k > 0) & (top_k < V), top_k, V)
    floor = descending.gather(1, (k - 1)[:, None])  # [B, 1]: the k-th largest
    weights = torch.exp(descending - descending[:, :1]).masked_fill(descending < floor, 0.0)
    total = weights.sum(-1, keepdim=True)
    # the mass at or above each sorted score: the cumulative weight at the end of its run of ties
    ascending = -descending  # flips ties' runs too, so searchsorted finds each run's end
    run_end = torch.searchsorted(ascending, ascending, right=True) - 1
    reaches = weights.cumsum(-1).gather(1, run_end) >= top_p[:, None] * total
    first = reaches.int().argmax(-1, keepdim=True)  # the first sorted score that reaches (0 if none)
    cut = torch.where(reaches.any(-1, keepdim=True), descending.gather(1, first), floor)
    floor = torch.where((top_p < 1)[:, None], cut, floor)
    return scores.masked_fill(scores < floor, float("-inf"))


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, counters: torch.Tensor, presence: torch.Tensor | None = None,
               penalty: torch.Tensor | None = None, bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch twin of `sample`: one token per row of logits [B, V], taken as fp32, with a
    bitmask every disallowed entry -inf (apply_token_bitmask_ref), and with presence and penalty
    repetition-penalised (apply_repetition_penalty_ref); then:
    - temperature > 0: the scores s = logits / temperature are filtered by top_k and top_p
      (`top_k_top_p_filter_ref`), and the token is the exponential race over the kept set,
      argmax of s_v - log(-log(u_v)) with u = hashed_uniform(seeds, counters, 0..V-1), lowest index
      on ties: a draw from softmax(s) over the kept set, fixed by (seed, counter) alone;
    - temperature 0, or a row whose largest score is not finite (a NaN or +inf logit, every logit
      -inf, as when the bitmask allows nothing, a temperature so small that x / temperature
      overflows): the greedy token, argmax's (lowest index on ties, the first NaN wins)."""
    _check_sample(logits, temperature, top_k, top_p, seeds, counters)
    _penalty_args(logits, presence, penalty)
    logits = logits.float()
    if bitmask is not None:
        logits = apply_token_bitmask_ref(logits, bitmask)
    if presence is not None:
        logits = apply_repetition_penalty_ref(logits, presence, penalty)
    greedy = argmax_ref(logits)
    scores = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    sampled = (temperature > 0) & scores.max(-1).values.isfinite()  # torch.max propagates NaN
    scores = torch.where(sampled[:, None], scores, 0.0)  # the filter's input has no NaN
    kept = top_k_top_p_filter_ref(scores, top_k, top_p)
    vocab_ids = torch.arange(logits.shape[1], device=logits.device)
    race = -torch.log(hashed_uniform(seeds, counters, vocab_ids))
    return torch.where(sampled, (kept - torch.log(race)).argmax(-1), greedy)
