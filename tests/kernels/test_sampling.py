"""Device argmax and repetition penalty against torch.argmax and transformers' penalty math."""
import pytest
import torch

from glmrt.kernels.sampling import (
    apply_repetition_penalty_,
    apply_repetition_penalty_ref,
    argmax,
    argmax_ref,
)
from tests.kernels.hopper import compile_for_hopper

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


def _token_ids(batch: int, length: int, vocab: int, dtype: torch.dtype,
               gen: torch.Generator) -> torch.Tensor:
    """Ids drawn from a small pool (many duplicates), with -1 padding in the tail of every row."""
    pool = torch.randint(0, vocab, (64,), generator=gen)
    ids = pool[torch.randint(0, 64, (batch, length), generator=gen)]
    pad_from = torch.randint(length // 2, length + 1, (batch, 1), generator=gen)
    ids = torch.where(torch.arange(length)[None, :] >= pad_from, -1, ids)
    return ids.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch,length,vocab", [(1, 1, 50), (3, 40, 1000), (4, 2500, 3001)])
def test_repetition_penalty_matches_reference(dtype, ids_dtype, batch, length, vocab):
    gen = torch.Generator().manual_seed(batch * length)
    logits = _strided_logits(batch, vocab, dtype, gen)
    ids = _token_ids(batch, length, vocab, ids_dtype, gen)
    ref = apply_repetition_penalty_ref(logits, ids, 1.1)
    out = apply_repetition_penalty_(logits, ids, 1.1)
    assert out is logits
    assert torch.equal(logits, ref)  # gather, one dtype rounding, scatter: bit-exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_repetition_penalty_per_row_and_duplicates_penalised_once(dtype):
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0], [2.0, -2.0, 1.0, 4.0], [2.0, -2.0, 1.0, 4.0]],
                          dtype=dtype, device=DEVICE)
    # row 0: 0 and 1 five times each (L > one program's block of ids would be the same);
    # row 1: only padding and an id past the vocab; row 2: every id once
    ids = torch.tensor([[0, 1, 0, 1, 0, 1, 0, 1, 0, 1], [-1] * 9 + [7], [3, 2, 1, 0] + [-1] * 6],
                       device=DEVICE)
    penalty = torch.tensor([2.0, 3.0, 4.0], device=DEVICE)
    ref = apply_repetition_penalty_ref(logits, ids, penalty)
    apply_repetition_penalty_(logits, ids, penalty)
    expected = [[1.0, -4.0, 1.0, 4.0], [2.0, -2.0, 1.0, 4.0], [0.5, -8.0, 0.25, 1.0]]
    assert logits.tolist() == expected
    assert torch.equal(logits, ref)


def test_repetition_penalty_duplicates_across_programs():
    gen = torch.Generator().manual_seed(4)
    logits = _strided_logits(2, 100, torch.float32, gen)
    ids = torch.full((2, 5000), 17, device=DEVICE)  # five programs of ids, one token
    ref = apply_repetition_penalty_ref(logits, ids, 1.3)
    apply_repetition_penalty_(logits, ids, 1.3)
    assert torch.equal(logits, ref)


def test_repetition_penalty_rejects_bad_arguments():
    logits = torch.randn(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="token_ids"):
        apply_repetition_penalty_(logits, torch.zeros(3, 4, dtype=torch.int64, device=DEVICE), 1.1)
    with pytest.raises(ValueError, match="token_ids"):
        apply_repetition_penalty_(logits, torch.zeros(2, 4, device=DEVICE), 1.1)
    with pytest.raises(ValueError, match="penalty"):
        apply_repetition_penalty_(logits, torch.zeros(2, 4, dtype=torch.int64, device=DEVICE),
                                  torch.ones(3, device=DEVICE))
    untouched = logits.clone()
    apply_repetition_penalty_(logits, torch.zeros(2, 0, dtype=torch.int64, device=DEVICE), 1.1)
    assert torch.equal(logits, untouched)


# ----------------------------------------------------------------------------- sm_90 compile


def test_sampling_kernels_compile_for_sm90():
    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        for block in (64, 4096):
            sig = {"logits_ptr": f"*{dtype}", "out_ptr": "*i64", "V": "i32", "stride_row": "i32",
                   "BLOCK": "constexpr"}
            specs.append(("glmrt.kernels.sampling", "_argmax_kernel", sig, dict(BLOCK=block)))
    for dtype in ("fp16", "bf16"):
        for ids in ("i32", "i64"):
            for per_row in (False, True):
                sig = {"logits_ptr": f"*{dtype}", "ids_ptr": f"*{ids}", "penalty_ptr": "*fp32",
                       "vals_ptr": f"*{dtype}", "penalty": "fp32", "V": "i32", "L": "i32",
                       "stride_lrow": "i32", "stride_irow": "i32", "BLOCK": "constexpr",
                       "PER_ROW": "constexpr"}
                specs.append(("glmrt.kernels.sampling", "_penalty_gather_kernel", sig,
                              dict(BLOCK=1024, PER_ROW=per_row)))
            sig = {"logits_ptr": f"*{dtype}", "ids_ptr": f"*{ids}", "vals_ptr": f"*{dtype}",
                   "V": "i32", "L": "i32", "stride_lrow": "i32", "stride_irow": "i32",
                   "BLOCK": "constexpr"}
            specs.append(("glmrt.kernels.sampling", "_penalty_scatter_kernel", sig,
                          dict(BLOCK=1024)))
    compile_for_hopper(specs)


# ----------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32, 256])
def test_sampling_bf16_real_sizes(batch):
    gen = torch.Generator(DEVICE).manual_seed(batch)
    for integer_valued in (False, True):
        logits = _strided_logits(batch, VOCAB, torch.bfloat16, gen, integer_valued)
        assert torch.equal(argmax(logits), argmax_ref(logits))
    ids = _token_ids(batch, 8192, VOCAB, torch.int64, torch.Generator().manual_seed(batch))
    penalty = 1.0 + torch.rand(batch, generator=gen, device=DEVICE)
    ref = apply_repetition_penalty_ref(logits, ids, penalty)
    apply_repetition_penalty_(logits, ids, penalty)
    assert torch.equal(logits, ref)
    ref = apply_repetition_penalty_ref(logits, ids, 1.1)
    apply_repetition_penalty_(logits, ids, 1.1)
    assert torch.equal(logits, ref)
    assert torch.equal(argmax(logits), argmax_ref(ref))


@pytest.mark.gpu
def test_sampling_cuda_graph_replay():
    # penalty then argmax captured once at fixed shapes, replayed on new logits and ids
    gen = torch.Generator(DEVICE).manual_seed(0)
    logits = torch.randn(32, VOCAB, generator=gen, device=DEVICE).to(torch.bfloat16)
    ids = torch.randint(-1, VOCAB, (32, 2048), generator=gen, device=DEVICE)
    penalty = torch.full((32,), 1.1, device=DEVICE)
    argmax(apply_repetition_penalty_(logits.clone(), ids, penalty))  # compile outside the capture
    torch.cuda.synchronize()
    work = logits.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = argmax(apply_repetition_penalty_(work, ids, penalty))
    for seed in (1, 2):
        gen.manual_seed(seed)
        logits = torch.randn(32, VOCAB, generator=gen, device=DEVICE).to(torch.bfloat16)
        ids.copy_(torch.randint(-1, VOCAB, (32, 2048), generator=gen, device=DEVICE))
        work.copy_(logits)
        graph.replay()
        ref = apply_repetition_penalty_ref(logits, ids, penalty)
        assert torch.equal(work, ref)
        assert torch.equal(tokens, argmax_ref(ref))
