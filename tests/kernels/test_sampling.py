"""Device argmax, repetition penalty and token bitmask against torch.argmax, transformers' penalty
math and a plain-torch unpacking of llguidance's bitmask layout."""
import pytest
import torch

from glmrt.kernels.sampling import (
    apply_repetition_penalty_,
    apply_repetition_penalty_ref,
    apply_token_bitmask_,
    apply_token_bitmask_ref,
    argmax,
    argmax_ref,
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


# ----------------------------------------------------------------------------- sm_90 compile


def test_sampling_kernels_compile_for_sm90():
    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        for block in (64, 4096):
            sig = {"logits_ptr": f"*{dtype}", "out_ptr": "*i64", "V": "i32", "stride_row": "i32",
                   "BLOCK": "constexpr"}
            specs.append(("glmrt.kernels.sampling", "_argmax_kernel", sig, dict(BLOCK=block)))
    for dtype in ("fp16", "bf16", "fp32"):
        sig = {"logits_ptr": f"*{dtype}", "presence_ptr": "*u8", "penalty_ptr": "*fp32", "V": "i32",
               "stride_lrow": "i32", "stride_prow": "i32", "BLOCK": "constexpr"}
        specs.append(("glmrt.kernels.sampling", "_penalty_kernel", sig, dict(BLOCK=4096)))
    for dtype in ("fp16", "bf16", "fp32"):
        sig = {"logits_ptr": f"*{dtype}", "mask_ptr": "*i32", "V": "i32", "stride_lrow": "i32",
               "stride_mrow": "i32", "BLOCK": "constexpr"}
        specs.append(("glmrt.kernels.sampling", "_token_bitmask_kernel", sig, dict(BLOCK=4096)))
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
