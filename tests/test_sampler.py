"""The sampler's draw never leaves the allowed set: top-k/top-p filtering and token bitmasks."""
import torch

from glmrt.engine.sampler import Sampler, SamplingState
from glmrt.kernels.sampling import hashed_uniform, uniform_from_bits
from glmrt.model.ops import TorchOps

VOCAB = 59392  # GLM-OCR's: a full row is where a rare u = 1 showed up


def test_uniform_from_bits_is_strictly_inside_zero_one_at_the_extremes():
    extremes = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)])  # -1: all 64 bits set, the top cell
    u = uniform_from_bits(extremes)
    assert 0 < u.min() and u.max() < 1 and (-torch.log(u)).min() > 0


def test_hashed_uniform_is_strictly_inside_zero_one():
    seeds = torch.arange(-16, 16) * 7919
    u = hashed_uniform(seeds, torch.arange(32) * 3, torch.arange(VOCAB))
    assert 0 < u.min() and u.max() < 1
    assert (-torch.log(u)).min() > 0
    assert abs(u.mean().item() - 0.5) < 1e-3


def _state(rows: int, temperature: float, top_k: int) -> SamplingState:
    st = SamplingState(rows, VOCAB, torch.device("cpu"))
    st.temperature.fill_(temperature)
    st.top_k.fill_(top_k)
    st.seeds.copy_(torch.arange(rows) * 1_000_003 + 17)
    return st


def test_sampled_tokens_stay_in_the_top_k_and_the_mask():
    """Before the fix, ~0.35% of draws over a 59,392-token row could pick a filtered-out token
    (0 / 0 = NaN won the race)."""
    rows, steps = 32, 12
    gen = torch.Generator().manual_seed(0)
    st = _state(rows, temperature=1.0, top_k=3)
    sampler = Sampler(TorchOps(), st)
    allowed = torch.zeros(rows, VOCAB, dtype=torch.bool)
    allowed[:, ::97] = True  # a structured-output mask: every 97th token
    words = torch.zeros(rows, (VOCAB + 31) // 32, dtype=torch.int64)
    cols = torch.nonzero(allowed)
    words.index_put_((cols[:, 0], cols[:, 1] // 32), torch.ones(len(cols), dtype=torch.int64) << (cols[:, 1] % 32),
                     accumulate=True)
    mask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # int32 bit patterns
    for _ in range(steps):
        logits = torch.randn(rows, VOCAB, generator=gen) * 3
        free = sampler(logits.clone(), slice(0, rows), do_sample=True)
        top3 = logits.topk(3, dim=-1).indices
        assert (free[:, None] == top3).any(-1).all()
        masked = sampler(logits.clone(), slice(0, rows), do_sample=True, token_mask=mask)
        allowed_top3 = logits.masked_fill(~allowed, float("-inf")).topk(3, dim=-1).indices
        assert (masked[:, None] == allowed_top3).any(-1).all()
