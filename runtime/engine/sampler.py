"""Token selection for rows of the device-resident batch, inside the captured decode step.

Semantics follow transformers' logits processors (and vLLM): a structured-output request's token
bitmask comes first (disallowed tokens -inf), then the repetition penalty covers
prompt + generated tokens (x < 0 -> x * p, else x / p) on fp32 logits, then temperature, top-k,
top-p (the smallest set whose probability reaches top_p, at least one token), then a draw.
Temperature 0 is greedy: argmax after the penalty. Greedy and sampled rows share one step.

Everything reads per-row state from device tensors of static shape (no host sync, no per-step
upload), so the sampler is captured in the decode graph. The draw is the exponential race
argmax(p / E), E = -log(u), which samples exactly from p. u comes from a counter-based hash of
(row seed, tokens generated so far, vocabulary id), so a request's draws depend on its own seed
and position only: a fixed seed reproduces whatever else is in the batch, and a preempted request
recomputed later continues the same stream.
"""
from __future__ import annotations

import random

import torch

from ..model.ops import TorchOps

# splitmix64's constants as signed int64 (torch has no uint64 arithmetic); products wrap.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


_seed_source = random.Random()


def random_seed() -> int:
    """A seed for a request that gave none (int64 range)."""
    return _seed_source.getrandbits(63)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def hashed_uniform(seeds: torch.Tensor, counters: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """seeds, counters [N] int64, vocab_ids [V] int64 -> [N, V] float32 uniform in (0, 1): the
    midpoints (2k + 1) / 2**24 of 2**23 cells, all exact in float32, so u < 1 and -log(u) > 0
    (with 24 bits, k + 0.5 rounds to 2**24 for the top cell: u = 1 would make a filtered-out
    token's 0 / 0 a NaN that wins the race)."""
    key = _mix64(seeds * _GOLDEN + counters)  # [N]: one stream per (request, step)
    return uniform_from_bits(_mix64(key[:, None] + (vocab_ids + 1)[None, :] * _GOLDEN))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 random bit patterns -> float32 in (0, 1) from their top 23 bits."""
    return (_shr(bits, 41) * 2 + 1).float() * (1.0 / (1 << 24))


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32; top_k [B] int64 (<= 0: off); top_p [B] float32 -> filtered logits (-inf)."""
    vocab = logits.shape[-1]
    ascending, order = torch.sort(logits, dim=-1)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ascending.gather(1, (vocab - k)[:, None])  # the k-th largest value
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    cumulative = ascending.softmax(-1).cumsum(-1)
    remove = cumulative <= (1.0 - top_p)[:, None]
    remove[:, -1] = False  # always keep the most likely token
    ascending = ascending.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ascending)


class SamplingState:
    """Per-row sampling state on the device, [R] or [R, V]; rows follow the batch's rows."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.presence = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=device)  # ids seen
        self.penalty = torch.ones(max_rows, dtype=torch.float32, device=device)
        self.temperature = torch.zeros(max_rows, dtype=torch.float32, device=device)  # 0: greedy
        self.top_k = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.top_p = torch.ones(max_rows, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.counters = torch.zeros(max_rows, dtype=torch.int64, device=device)  # tokens drawn so far
        self.vocab_ids = torch.arange(vocab_size, device=device)

    @property
    def row_tensors(self) -> list[torch.Tensor]:
        return [self.presence, self.penalty, self.temperature, self.top_k, self.top_p, self.seeds, self.counters]


class Sampler:
    def __init__(self, ops: TorchOps, state: SamplingState):
        self.ops = ops
        self.state = state

    def __call__(self, logits: torch.Tensor, rows: slice, do_sample: bool,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits [N, V] of the batch rows `rows` -> [N] int64 tokens; records them in the
        presence mask and advances the rows' RNG counters. do_sample=False skips the sampled
        path (every row greedy), which keeps the common greedy step free of a vocabulary sort.
        token_mask [N, ceil(V / 32)] int32: the structured-output bitmask (1 bits = allowed),
        applied first, as in vLLM, so that the penalty, temperature and draw see allowed tokens only."""
        st = self.state
        logits = logits.float()
        if token_mask is not None:
            logits = self.ops.apply_token_bitmask(logits, token_mask)
        logits = self.ops.apply_repetition_penalty(logits, st.presence[rows], st.penalty[rows])
        tokens = self.ops.argmax(logits)
        if do_sample:
            temperature = st.temperature[rows]
            scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
            probs = top_k_top_p_filter(scaled, st.top_k[rows], st.top_p[rows]).softmax(-1)
            race = -torch.log(hashed_uniform(st.seeds[rows], st.counters[rows], st.vocab_ids))
            tokens = torch.where(temperature > 0, (probs / race).argmax(-1), tokens)
        st.presence[rows].scatter_(1, tokens[:, None], True)
        st.counters[rows] += 1
        return tokens
