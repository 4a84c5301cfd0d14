"""Device argmax, repetition penalty, token bitmask and fused sampler against torch.argmax,
transformers' penalty math, a plain-torch unpacking of llguidance's bitmask layout and the
sort-based plain-torch sampler."""
import pytest
import torch

from glmrt.kernels.sampling import (
    apply_repetition_penalty_,
    apply_repetition_penalty_ref,
    apply_token_bitmask_,
    apply_token_bitmask_ref,
    argmax,
    argmax_ref,
    hashed_uniform,
    sample,
    sample_ref,
    top_k_top_p_filter_ref,
)
from glmrt_testing.hopper import compile_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 59392


def _strided_logits(batch: int, vocab: int, dtype: torch.dtype, gen: torch.Generator,
                    integer_valued: bool = False) -> torch.Tensor:
    """[batch, vocab] rows of a wider [batch, vocab + 13] buffer (row stride != vocab)."""
    if integer_valued:  # few distinct values: many ties, inside and across loop tiles
        wide = torch.randint(-20, 20, (batch, vocab + 13), generator=gen, device=gen.device)
    else:
        wide = torch.randn(batch, vocab + 13, generator=gen, device=gen.device) * 4
    return wide.to(dtype).to(DEVICE)[:, :vocab]


# ----------------------------------------------------------------------------- argmax


# bf16 only loads and upcasts here, which the interpreter does correctly
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,vocab", [(1, 1), (3, 7), (5, 10007), (2, VOCAB)])
@pytest.mark.parametrize("integer_valued", [False, True])
def test_argmax_matches_torch(dtype, batch, vocab, integer_valued):
    gen = torch.Generator().manual_seed(batch * vocab)
    logits = _strided_logits(batch, vocab, dtype, gen, integer_valued)
    out = argmax(logits)
    assert out.dtype == torch.int64 and out.shape == (batch,)
    assert torch.equal(out, argmax_ref(logits))


def test_argmax_ties_infinities_and_nan():
    vocab = 9000  # three loop tiles of 4096
    logits = torch.zeros(7, vocab)
    logits[0, [4100, 5, 8999]] = 3.0  # equal maxima in different tiles and lanes: lowest wins
    logits[1, [4096 + 5, 5]] = 3.0  # equal maxima in the same lane of two tiles
    logits[2] = float("-inf")  # all -inf: index 0
    logits[3, [100, 6000]] = float("inf")
    logits[4, [7000, 4200]] = float("nan")  # the first NaN wins over everything
    logits[4, 10] = float("inf")
    logits[5, 8999] = 1.0  # the very last entry
    logits[6] = -1.0  # constant row: index 0
    logits = logits.to(DEVICE)
    out = argmax(logits)
    assert out.tolist() == [5, 5, 0, 100, 4200, 8999, 0]
    assert torch.equal(out, argmax_ref(logits))


def test_argmax_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch, vocab"):
        argmax(torch.randn(VOCAB, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        argmax(torch.randn(8, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match="empty"):
        argmax(torch.randn(2, 0, device=DEVICE))
    assert argmax(torch.randn(0, 5, device=DEVICE)).shape == (0,)


# ----------------------------------------------------------------------------- repetition penalty


def _presence(batch: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """A [batch, vocab] mask with a different density per row (row 0 empty)."""
    density = torch.linspace(0.0, 0.9, batch)[:, None]
    return (torch.rand(batch, vocab, generator=gen) < density).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,vocab", [(1, 50), (3, 1000), (4, 5003), (2, VOCAB)])
def test_repetition_penalty_matches_reference(dtype, batch, vocab):
    gen = torch.Generator().manual_seed(batch * vocab)
    logits = _strided_logits(batch, vocab, dtype, gen)
    presence = _presence(batch, vocab, gen)
    penalty = (1.0 + torch.rand(batch, generator=gen)).to(DEVICE)
    penalty[0] = 1.0
    ref = apply_repetition_penalty_ref(logits, presence, penalty)
    out = apply_repetition_penalty_(logits, presence, penalty)
    assert out is logits
    assert torch.equal(logits, ref)  # one fp32 multiply/divide, one rounding: bit-exact


def test_repetition_penalty_values():
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0]] * 3, device=DEVICE)
    presence = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    penalty = torch.tensor([2.0, 3.0, 4.0], device=DEVICE)
    apply_repetition_penalty_(logits, presence, penalty)
    assert logits.tolist() == [[1.0, -4.0, 1.0, 4.0], [2.0, -2.0, 1.0, 4.0], [0.5, -8.0, 0.25, 1.0]]


def test_repetition_penalty_rejects_bad_arguments():
    logits = torch.randn(2, 10, device=DEVICE)
    ones = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="presence"):
        apply_repetition_penalty_(logits, torch.zeros(3, 10, dtype=torch.bool, device=DEVICE), ones)
    with pytest.raises(ValueError, match="presence"):
        apply_repetition_penalty_(logits, torch.zeros(2, 10, device=DEVICE), ones)
    with pytest.raises(ValueError, match="penalty"):
        apply_repetition_penalty_(logits, torch.zeros(2, 10, dtype=torch.bool, device=DEVICE),
                                  torch.ones(3, device=DEVICE))


# ----------------------------------------------------------------------------- token bitmask


def _bitmask(batch: int, words: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":  # every bit pattern, sign bit included
        return torch.randint(-2**31, 2**31 - 1, (batch, words), generator=gen, dtype=torch.int32).to(DEVICE)
    if kind == "sparse":  # a handful of allowed tokens per row, as inside a JSON structure
        words_ = torch.zeros(batch, words, dtype=torch.int32)
        words_[:, torch.randint(0, words, (3,), generator=gen)] = torch.tensor(1 << 31, dtype=torch.int64).to(torch.int32)
        return words_.to(DEVICE)
    return torch.full((batch, words), {"none": 0, "all": -1}[kind], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,vocab", [(1, 1), (3, 31), (5, 32), (3, 33), (2, 10007), (1, VOCAB)])
@pytest.mark.parametrize("kind", ["random", "sparse", "none", "all"])
def test_token_bitmask_matches_reference(dtype, batch, vocab, kind):
    gen = torch.Generator().manual_seed(batch * vocab)
    logits = _strided_logits(batch, vocab, dtype, gen)
    logits[0, :: max(vocab // 5, 1)] = float("nan")  # allowed NaN and inf stay as they are
    logits[-1, 0] = float("inf")
    extra = 2 if kind == "random" else 0  # extra trailing words are ignored
    mask = _bitmask(batch, (vocab + 31) // 32 + extra, kind, gen)
    expected = apply_token_bitmask_ref(logits, mask)
    out = apply_token_bitmask_(logits, mask)
    assert out is logits
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(0.0), expected.nan_to_num(0.0))
    if kind == "all":
        assert not (out == float("-inf")).any()
    if kind == "none":
        assert (out == float("-inf")).all()


def test_token_bitmask_bits_are_little_endian_within_words():
    logits = torch.zeros(1, 70, device=DEVICE)
    mask = torch.zeros(1, 3, dtype=torch.int32, device=DEVICE)
    mask[0, 0], mask[0, 1], mask[0, 2] = 1 << 3, torch.tensor(1 << 31).to(torch.int32), 1 << 5  # tokens 3, 63, 69
    out = apply_token_bitmask_(logits, mask)
    assert torch.nonzero(out[0] == 0).flatten().tolist() == [3, 63, 69]


def test_token_bitmask_rejects_bad_masks():
    logits = torch.zeros(2, 40, device=DEVICE)
    for bad in (torch.zeros(2, 1, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int32),
                torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int32)[:, ::2]):
        with pytest.raises(ValueError, match="bitmask must be"):
            apply_token_bitmask_(logits, bad.to(DEVICE))


# ----------------------------------------------------------------------------- fused sampler


def _params(batch: int, vocab: int, gen: torch.Generator, top_ks=(0, 1, 5, None, -1), top_ps=(1.0, 0.9, 0.5, 1e-6),
            greedy_every: int = 4) -> tuple[torch.Tensor, ...]:
    """(temperature, top_k, top_p, seeds, counters) [batch] cycling through the given top_k (None:
    V, -1: past V) and top_p, every greedy_every-th row greedy."""
    rows = torch.arange(batch)
    temperature = 0.5 + torch.rand(batch, generator=gen) * 1.5
    temperature[rows % greedy_every == greedy_every - 1] = 0.0
    ks = [vocab if k is None else vocab + 7 if k == -1 else k for k in top_ks]
    top_k = torch.tensor([ks[i % len(ks)] for i in range(batch)])
    top_p = torch.tensor([top_ps[(i // len(ks)) % len(top_ps) if batch > len(ks) else i % len(top_ps)]
                          for i in range(batch)], dtype=torch.float32)
    seeds = torch.randint(-2**62, 2**62, (batch,), generator=gen)
    counters = torch.randint(0, 4000, (batch,), generator=gen)
    return tuple(t.to(DEVICE) for t in (temperature, top_k, top_p, seeds, counters))


def _kept(logits, temperature, top_k, top_p) -> torch.Tensor:
    """[B, V] bool: the ref's kept set of each row."""
    scores = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    return top_k_top_p_filter_ref(scores, top_k, top_p) > float("-inf")


@pytest.mark.parametrize("batch,vocab", [(1, 1), (3, 7), (20, 1000), (7, 4097), (3, VOCAB)])
@pytest.mark.parametrize("integer_valued", [False, True])
def test_sample_matches_reference(batch, vocab, integer_valued):
    gen = torch.Generator().manual_seed(batch * vocab + integer_valued)
    logits = _strided_logits(batch, vocab, torch.float32, gen, integer_valued)  # ties, with integer values
    logits[0, :: max(vocab // 7, 2)] = float("-inf")  # masked entries
    params = _params(batch, vocab, gen)
    out = sample(logits, *params)
    assert out.dtype == torch.int64 and out.shape == (batch,)
    assert torch.equal(out, sample_ref(logits, *params))
    temperature, top_k, top_p = params[:3]
    greedy = (temperature == 0) | (logits.max(-1).values == float("-inf"))
    assert torch.equal(out[greedy], argmax_ref(logits)[greedy])
    assert _kept(logits, temperature, top_k, top_p)[torch.arange(batch), out][~greedy].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,vocab", [(1, 1), (4, 7), (6, 4097), (2, VOCAB)])
def test_penalty_read_with_the_row_is_the_penalty_pass_then_the_op(dtype, batch, vocab, monkeypatch):
    """argmax and sample with presence and penalty give the tokens of the old two-op path (the
    penalty kernel on an fp32 copy, then the op), bit for bit, leave their logits alone, and
    overwrite a poisoned output; rows whose penalty is 1 or whose mask is empty are unpenalised."""
    gen = torch.Generator().manual_seed(batch * vocab + (dtype == torch.float16))
    logits = _strided_logits(batch, vocab, dtype, gen, integer_valued=vocab < 100)
    logits[-1, ::3] = -logits[-1, ::3]  # negative scores, scaled up by the penalty
    raw = logits.clone()
    presence = _presence(batch, vocab, gen)
    penalty = (1.0 + 3 * torch.rand(batch, generator=gen)).to(DEVICE)
    penalty[batch // 2] = 1.0
    penalised = apply_repetition_penalty_(logits.to(torch.float32, copy=True), presence, penalty)
    params = _params(batch, vocab, gen, greedy_every=3)
    for op, ref, args in ((argmax, argmax_ref, ()), (sample, sample_ref, params)):
        expected = op(penalised, *args)
        out = op(logits, *args, presence, penalty)
        assert torch.equal(out, expected) and torch.equal(out, ref(logits, *args, presence, penalty)), op.__name__
        assert torch.equal(logits, raw)
    assert torch.equal(argmax(logits, presence, torch.ones_like(penalty)), argmax(logits))
    assert torch.equal(sample(logits, *params, torch.zeros_like(presence), penalty), sample(logits.float(), *params))
    expected = argmax_ref(logits, presence, penalty)
    poison = torch.full((batch,), -12345, dtype=torch.int64, device=DEVICE)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison)
    out = argmax(logits, presence, penalty)
    assert out is poison and torch.equal(out, expected)


def _row_masks(batch: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A bitmask [batch, ceil(vocab / 32) + 1] whose rows are, by row % 4, random bits (sign bit and
    the bits past the vocab included: rows 0 and 1), all allowed (-1 words: row 2), and a single
    allowed token or none (row 3, alternately); its rows are a strided, offset slice of a wider
    tensor. -> (bitmask, [batch] the single allowed token of each such row, else -1)."""
    words = (vocab + 31) // 32
    wide = torch.randint(-2**31, 2**31 - 1, (batch, words + 5), generator=gen, dtype=torch.int32)
    bitmask = wide[:, 1: words + 2]  # one extra trailing word, ignored
    single = torch.full((batch,), -1)
    for row in range(2, batch, 4):
        bitmask[row] = -1
    for row in range(3, batch, 4):
        bitmask[row] = 0
        if row % 8 == 3:
            token = int(torch.randint(0, vocab, (1,), generator=gen))
            bit = 1 << (token % 32)
            bitmask[row, token // 32] = bit - 2**32 if bit >= 2**31 else bit
            single[row] = token
    return bitmask.to(DEVICE), single.to(DEVICE)


# the full vocabulary once, one row: the interpreter is slow
@pytest.mark.parametrize("dtype,batch,vocab", [(dtype, batch, vocab) for dtype in (torch.float32, torch.float16)
                                               for batch, vocab in ((1, 1), (4, 7), (8, 33), (8, 4097))]
                         + [(torch.float16, 1, VOCAB)])
def test_bitmask_read_with_the_row_is_the_mask_pass_then_the_op(dtype, batch, vocab, monkeypatch):
    """argmax and sample with a token bitmask, with and without presence and penalty, give the
    tokens of the old two-op path (the bitmask kernel on an fp32 copy, then the op) bit for bit,
    and the refs' tokens; they leave their logits alone and overwrite a poisoned output. A row
    that allows one token takes it; a row that allows nothing takes token 0, greedy or sampled.
    The random-mask rows sample with no filter, top-k, top-p and both (rows 0, 1, 4, 5)."""
    gen = torch.Generator().manual_seed(batch * vocab + (dtype == torch.float16))
    logits = _strided_logits(batch, vocab, dtype, gen, integer_valued=vocab < 100)
    logits[-1, ::3] = -logits[-1, ::3]  # negative scores, scaled up by the penalty
    bitmask, single = _row_masks(batch, vocab, gen)
    allowed = apply_token_bitmask_ref(torch.zeros(batch, vocab, device=DEVICE), bitmask) == 0
    logits[0][~allowed[0]] = float("nan")  # disallowed NaNs are -inf: row 0 (random bits) still samples
    # the filtered random-mask rows: flatter, so that their cuts keep several tokens, and their largest
    # logits disallowed, so that a pass that missed the mask would move the cuts
    filtered = [row for row in (1, 4, 5) if row < batch]
    logits[filtered] = torch.where(allowed[filtered], logits[filtered] / 4, logits[filtered] / 4 + 40)
    logits[6:7, 1:][allowed[6:7, 1:]] = float("nan")  # an allowed NaN wins: row 6 (all allowed) is greedy
    raw = logits.clone()
    masked = apply_token_bitmask_(logits.to(torch.float32, copy=True), bitmask)
    presence = _presence(batch, vocab, gen)
    penalty = (1.0 + 3 * torch.rand(batch, generator=gen)).to(DEVICE)
    temperature, _, _, seeds, counters = _params(batch, vocab, gen, greedy_every=batch + 1)
    temperature[2:3] = 0.0  # row 2 (all allowed) greedy; row 7 (none allowed) samples
    top_k = torch.tensor([0, 5, 0, 0, 0, 5, 0, 0], device=DEVICE)[:batch]  # searches cost the interpreter
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0], device=DEVICE)[:batch]  # dearly: rows 1, 4, 5
    params = (temperature, top_k, top_p, seeds, counters)
    two_op = {}
    for op, ref, args in ((argmax, argmax_ref, ()), (sample, sample_ref, params)):
        for penalised in ((), (presence, penalty)):
            expected = two_op[op, penalised != ()] = op(masked, *args, *penalised)
            out = op(logits, *args, *penalised, bitmask=bitmask)
            assert torch.equal(out, expected), (op.__name__, penalised != ())
            assert torch.equal(out, ref(logits, *args, *penalised, bitmask=bitmask)), (op.__name__, penalised != ())
            assert torch.equal(logits.isnan(), raw.isnan()) and torch.equal(logits.nan_to_num(), raw.nan_to_num())
            assert torch.equal(out[single >= 0], single[single >= 0])
            assert (out[~allowed.any(1)] == 0).all()
    everything = torch.full_like(bitmask, -1)  # a mask that allows everything is no mask
    assert torch.equal(argmax(logits, presence, penalty, everything), argmax(logits, presence, penalty))
    poison = torch.full((batch,), -12345, dtype=torch.int64, device=DEVICE)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison)
    for op, args in ((argmax, ()), (sample, params)):
        poison.fill_(-12345)
        out = op(logits, *args, bitmask=bitmask)
        assert out is poison and torch.equal(out, two_op[op, False])


def test_sample_edge_rows():
    vocab = 4500  # three loop tiles
    logits = torch.randn(10, vocab, generator=torch.Generator().manual_seed(0))
    logits[0] = float("-inf")  # all -inf: token 0, as argmax
    logits[1] = float("-inf")
    logits[1, 4321] = 2.0  # all -inf but one, whatever top_k and top_p
    logits[2, [7, 3000]] = float("nan")  # a NaN: the first NaN, as argmax
    logits[3, [10, 4400]] = float("inf")  # +inf: the first +inf
    logits[4] = 1.0  # constant: every token ties at both cuts, all kept
    logits[5, :] = float("-inf")
    logits[5, [5, 2500, 4499]] = 3.0  # three tied maxima; top_k 1 keeps all three
    logits[6, :] = -1.0
    logits[6, [1, 2]] = torch.tensor([0.0, -0.0])  # +0 and -0 tie; top_k 1 keeps both
    logits[7, 9] = 1e30  # x / temperature overflows: greedy
    logits[8, 4100:] = float("-inf")  # top_k past the finite entries keeps them all
    logits[9, 100:] = float("-inf")
    temperature = torch.tensor([1.0, 0.7, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-10, 1.0, 1.0])
    top_k = torch.tensor([5, 1, 0, 0, 2, 1, 1, 0, 4200, 0])
    top_p = torch.tensor([0.5, 1e-6, 1.0, 0.9, 0.3, 0.9, 1.0, 1.0, 0.99, 1e-6])
    seeds, counters = torch.arange(10) * 31 + 1, torch.arange(10)
    args = [t.to(DEVICE) for t in (logits, temperature, top_k, top_p, seeds, counters)]
    out = sample(*args)
    assert torch.equal(out, sample_ref(*args))
    assert out[:4].tolist() == [0, 4321, 7, 10] and out[7] == 9
    assert out[5] in (5, 2500, 4499) and out[6] in (1, 2) and out[8] < 4100 and out[9] < 100
    # ties kept together at both cuts: over many seeds every tied maximum is drawn
    row = torch.full((50,), -1.0)
    row[[5, 20, 49]] = 3.0
    assert set(sample(*_many_seeds(row, 40, 1.0, 1, 0.2)).tolist()) == {5, 20, 49}


def test_sample_overwrites_a_poisoned_output(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    logits = _strided_logits(5, 300, torch.float32, gen)
    params = _params(5, 300, gen)
    poison = torch.full((5,), -12345, dtype=torch.int64, device=DEVICE)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison)
    out = sample(logits, *params)
    assert out is poison and torch.equal(out, sample_ref(logits, *params))


def test_top_p_keeps_ties_at_the_cut_and_the_smallest_reaching_set():
    # p = [0.4, 0.2, 0.2, 0.1, 0.1] up to rounding: 0.5 is reached at the 0.2s, both kept
    scores = torch.tensor([[0.4, 0.2, 0.1, 0.2, 0.1]]).log()
    kept = lambda p, k=0: (top_k_top_p_filter_ref(scores, torch.tensor([k]), torch.tensor([p])) > float("-inf"))[0].tolist()
    assert kept(0.5) == [True, True, False, True, False]
    assert kept(0.3) == [True, False, False, False, False]
    assert kept(1e-9) == [True, False, False, False, False]
    assert kept(0.85) == [True, True, True, True, True]
    assert kept(1.0, k=2) == [True, True, False, True, False]  # the 2nd largest is 0.2: both kept
    assert kept(0.5, k=1) == [True, False, False, False, False]  # top_p within top-k's set


def _chi_square_passes(tokens: torch.Tensor, scores: torch.Tensor) -> bool:
    """tokens [n] drawn from softmax(scores) [V] (-inf: never): nothing outside the support, and a
    chi-square statistic below its mean + ~5 standard deviations."""
    expected = scores.softmax(-1) * len(tokens)
    counts = torch.bincount(tokens.cpu(), minlength=len(scores)).float()
    kept = expected > 0
    dof = max(int(kept.sum()) - 1, 1)
    chi2 = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
    return bool((counts[~kept] == 0).all()) and chi2 < dof + 5 * (2 * dof) ** 0.5 + 5


def _many_seeds(row: torch.Tensor, n: int, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, ...]:
    """One row's logits and parameters repeated n times, each copy with its own seed."""
    full = lambda value: torch.full((n,), value, device=DEVICE)
    return (row.to(DEVICE).expand(n, -1), full(temperature), full(top_k), full(top_p),
            torch.arange(n, device=DEVICE) * 1_000_003 + 17, full(5))


def test_sample_draws_the_filtered_softmax():
    """Over many seeds (one row each) the draw's frequencies match softmax of the kept scores. The
    interpreter runs the kernel slowly (~0.15 s a row with a threshold search, ~0.01 s without),
    so each configuration counts the reference's draws over 20,000 seeds, and the kernel is held
    to the reference's tokens on a slice of them: 40 seeds filtered, 300 unfiltered. A kernel that
    draws another token for 1% of the seeds fails the unfiltered slice with probability
    1 - 0.99^300 = 95%; a chi-square test of 1,200 of the kernel's own draws would need a shift
    of several % of the mass to fail."""
    vocab = 12
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 1.5
    row[3] = float("-inf")
    for top_k, top_p, temperature, checked in ((0, 1.0, 1.0, 300), (6, 1.0, 0.7, 40), (0, 0.8, 1.3, 40),
                                               (8, 0.9, 1.0, 40)):
        args = _many_seeds(row, 20000, temperature, top_k, top_p)
        drawn = sample_ref(*args)
        scores = top_k_top_p_filter_ref(row[None] / temperature, torch.tensor([top_k]), torch.tensor([top_p]))[0]
        assert _chi_square_passes(drawn, scores), (top_k, top_p, temperature)
        assert torch.equal(sample(*(t[:checked] for t in args)), drawn[:checked])


def test_sample_is_reproducible_and_independent_of_the_batch():
    gen = torch.Generator().manual_seed(11)
    batch, vocab = 7, 300
    logits = _strided_logits(batch, vocab, torch.float32, gen)
    params = _params(batch, vocab, gen, greedy_every=100)
    out = sample(logits, *params)
    assert torch.equal(out, sample(logits, *params))
    # each row alone, and rows in another order, draw the same tokens
    for i in range(batch):
        assert sample(logits[i: i + 1], *(t[i: i + 1] for t in params)) == out[i]
    order = torch.randperm(batch, generator=gen).to(DEVICE)
    assert torch.equal(sample(logits[order], *(t[order] for t in params)), out[order])
    # the counter (the step) and the seed pick the stream
    temperature, top_k, top_p, seeds, counters = params
    moved = sample(logits, temperature, top_k, top_p, seeds, counters + 1)
    reseeded = sample(logits, temperature, top_k, top_p, seeds + 1, counters)
    assert (moved != out).any() and (reseeded != out).any()


def test_kernel_hash_is_hashed_uniform():
    """With a flat row and no filter the race is argmax(-log(-log u)) = argmax(u): the kernel's hash
    picks hashed_uniform's largest u, for seeds and counters across the int64 range."""
    vocab = 3000
    seeds = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345, -98765], device=DEVICE)
    counters = torch.tensor([0, 5, 2**40, 7, 1, 0, 3], device=DEVICE)
    n = len(seeds)
    out = sample(torch.zeros(n, vocab, device=DEVICE), torch.ones(n, device=DEVICE),
                 torch.zeros(n, dtype=torch.int64, device=DEVICE), torch.ones(n, device=DEVICE), seeds, counters)
    assert torch.equal(out, hashed_uniform(seeds, counters, torch.arange(vocab, device=DEVICE)).argmax(-1))


def test_sample_rejects_bad_arguments():
    logits = torch.randn(2, 10, device=DEVICE)
    good = [torch.ones(2, device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE),
            torch.ones(2, device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE),
            torch.zeros(2, dtype=torch.int64, device=DEVICE)]
    with pytest.raises(ValueError, match="vocab < 2"):
        sample(torch.randn(2, 2**24, device=DEVICE).as_strided((2, 2**24), (0, 1)), *good)
    with pytest.raises(ValueError, match="both or neither"):
        sample(logits, *good, torch.zeros(2, 10, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="presence"):
        sample(logits, *good, torch.zeros(2, 9, dtype=torch.bool, device=DEVICE), torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="penalty"):
        argmax(logits, torch.zeros(2, 10, dtype=torch.bool, device=DEVICE), torch.ones(3, device=DEVICE))
    for bad in (torch.zeros(2, 0, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int32),
                torch.zeros(2, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int64),
                torch.zeros(2, 1, dtype=torch.uint8), torch.zeros(2, 1), torch.zeros(2, 2, dtype=torch.int32)[:, 1:]
                .as_strided((2, 1), (2, 2))):
        bad = bad.to(DEVICE)
        for op, args in ((argmax, ()), (argmax_ref, ()), (sample, good), (sample_ref, good)):
            with pytest.raises(ValueError, match="bitmask must be"):
                op(logits, *args, bitmask=bad)
    for i, name in enumerate(("temperature", "top_k", "top_p", "seeds", "counters")):
        bad = list(good)
        bad[i] = bad[i][:1]
        with pytest.raises(ValueError, match=name):
            sample(logits, *bad)
    assert sample(torch.randn(0, 5, device=DEVICE), *(t[:0] for t in good)).shape == (0,)


# ----------------------------------------------------------------------------- sm_90 compile


def test_sampling_kernels_compile_for_sm90():
    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        for block, has_penalty, has_mask in ((64, False, False), (4096, False, False), (4096, True, False),
                                             (4096, True, True)):
            sig = {"logits_ptr": f"*{dtype}", "out_ptr": "*i64", "presence_ptr": "*u8" if has_penalty else f"*{dtype}",
                   "penalty_ptr": "*fp32" if has_penalty else f"*{dtype}",
                   "mask_ptr": "*i32" if has_mask else f"*{dtype}", "V": "i32", "stride_row": "i32",
                   "stride_prow": "i32", "stride_mrow": "i32", "BLOCK": "constexpr", "HAS_PENALTY": "constexpr",
                   "HAS_MASK": "constexpr"}
            specs.append(("glmrt.kernels.sampling", "_argmax_kernel", sig,
                          dict(BLOCK=block, HAS_PENALTY=has_penalty, HAS_MASK=has_mask)))
    for dtype in ("fp16", "bf16", "fp32"):
        sig = {"logits_ptr": f"*{dtype}", "presence_ptr": "*u8", "penalty_ptr": "*fp32", "V": "i32",
               "stride_lrow": "i32", "stride_prow": "i32", "BLOCK": "constexpr"}
        specs.append(("glmrt.kernels.sampling", "_penalty_kernel", sig, dict(BLOCK=4096)))
    for dtype in ("fp16", "bf16", "fp32"):
        sig = {"logits_ptr": f"*{dtype}", "mask_ptr": "*i32", "V": "i32", "stride_lrow": "i32",
               "stride_mrow": "i32", "BLOCK": "constexpr"}
        specs.append(("glmrt.kernels.sampling", "_token_bitmask_kernel", sig, dict(BLOCK=4096)))
    for dtype, block, has_penalty, has_mask in (("fp32", 8, False, False), ("fp32", 2048, False, False),
                                                ("bf16", 2048, True, False), ("fp32", 2048, True, True),
                                                ("fp16", 2048, True, True), ("bf16", 2048, True, True)):
        sig = {"logits_ptr": f"*{dtype}", "out_ptr": "*i64", "presence_ptr": "*u8" if has_penalty else f"*{dtype}",
               "penalty_ptr": "*fp32" if has_penalty else f"*{dtype}", "mask_ptr": "*i32" if has_mask else f"*{dtype}",
               "temperature_ptr": "*fp32", "top_k_ptr": "*i64", "top_p_ptr": "*fp32", "seeds_ptr": "*i64",
               "counters_ptr": "*i64", "V": "i32", "stride_row": "i32", "stride_prow": "i32", "stride_mrow": "i32",
               "BLOCK": "constexpr", "WAYS": "constexpr", "HAS_PENALTY": "constexpr", "HAS_MASK": "constexpr"}
        specs.append(("glmrt.kernels.sampling", "_sample_kernel", sig,
                      dict(BLOCK=block, WAYS=16, HAS_PENALTY=has_penalty, HAS_MASK=has_mask)))
    compile_for_hopper(specs)


# ----------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32, 256])
def test_sampling_bf16_real_sizes(batch):
    gen = torch.Generator(DEVICE).manual_seed(batch)
    for integer_valued in (False, True):
        logits = _strided_logits(batch, VOCAB, torch.bfloat16, gen, integer_valued)
        assert torch.equal(argmax(logits), argmax_ref(logits))
    presence = _presence(batch, VOCAB, torch.Generator().manual_seed(batch))
    penalty = 1.0 + torch.rand(batch, generator=gen, device=DEVICE)
    ref = apply_repetition_penalty_ref(logits, presence, penalty)
    apply_repetition_penalty_(logits, presence, penalty)
    assert torch.equal(logits, ref)
    assert torch.equal(argmax(logits), argmax_ref(ref))


@pytest.mark.gpu
def test_sampling_cuda_graph_replay():
    # penalty then argmax captured once at fixed shapes, replayed on new logits and ids
    gen = torch.Generator(DEVICE).manual_seed(0)
    logits = torch.randn(32, VOCAB, generator=gen, device=DEVICE).to(torch.bfloat16)
    presence = torch.rand(32, VOCAB, generator=gen, device=DEVICE) < 0.1
    penalty = torch.full((32,), 1.1, device=DEVICE)
    argmax(apply_repetition_penalty_(logits.clone(), presence, penalty))  # compile outside the capture
    torch.cuda.synchronize()
    work = logits.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = argmax(apply_repetition_penalty_(work, presence, penalty))
    for seed in (1, 2):
        gen.manual_seed(seed)
        logits = torch.randn(32, VOCAB, generator=gen, device=DEVICE).to(torch.bfloat16)
        presence.copy_(torch.rand(32, VOCAB, generator=gen, device=DEVICE) < 0.1)
        work.copy_(logits)
        graph.replay()
        ref = apply_repetition_penalty_ref(logits, presence, penalty)
        assert torch.equal(work, ref)
        assert torch.equal(tokens, argmax_ref(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32, 256])
def test_sample_real_sizes_in_a_cuda_graph(batch):
    # the sampled decode path's op captured once, replayed on new logits and counters; against the
    # ref (a different log implementation could only flip a near-tie, which random logits never make)
    gen = torch.Generator().manual_seed(batch)
    logits = _strided_logits(batch, VOCAB, torch.float32, gen).contiguous()
    params = _params(batch, VOCAB, gen)
    sample(logits, *params)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sample(logits, *params)
    for step in (1, 2):
        logits.copy_(_strided_logits(batch, VOCAB, torch.float32, gen))
        params[4].add_(step)
        graph.replay()
        assert torch.equal(tokens, sample_ref(logits, *params))
