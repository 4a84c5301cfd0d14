"""Split-KV paged decode attention against its torch reference (the cache write is tested with
the M-RoPE kernel it is fused into, in test_rope.py)."""
import pytest
import torch
import triton

from glmrt.kernels import paged
from glmrt.kernels.paged import (
    decode_tiles,
    default_num_splits,
    multiprocessor_count,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from glmrt.kernels.rope import mrope_write_kv_
from glmrt_testing.hopper import compile_for_hopper, hopper_resources

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = -1234.5


def _tol(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=1e-5, rtol=1e-5),
            torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}[dtype]


def _make_tables(context_lens: list[int], block_size: int, max_blocks: int, num_blocks: int,
                 gen: torch.Generator) -> torch.Tensor:
    """Block tables drawn from a random permutation of the pool: non-contiguous, unordered ids.
    Entries past a sequence's last block point at blocks that other sequences own."""
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.empty(len(context_lens), max_blocks, dtype=torch.int32)
    next_free = 0
    for b, n in enumerate(context_lens):
        used = -(-n // block_size)
        tables[b, :used] = perm[next_free: next_free + used]
        next_free += used
        tables[b, used:] = perm[torch.randint(0, num_blocks, (max_blocks - used,), generator=gen)]
    assert next_free <= num_blocks
    return tables


def _decode_case(context_lens, block_size, num_q_heads, num_kv_heads, head_dim, dtype,
                 max_blocks=None, seed=0, packed_q=False, num_queries=1):
    """q [B * num_queries, Hq, D], caches, tables [B, max_blocks], context_lens [B] (on DEVICE)."""
    gen = torch.Generator().manual_seed(seed)
    needed = sum(-(-n // block_size) for n in context_lens)
    max_blocks = max_blocks or max(1, max(-(-n // block_size) for n in context_lens))
    num_blocks = needed + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    rows = len(context_lens) * num_queries
    if packed_q:  # q as a strided view of a packed [B * Q, (Hq + 2 Hkv) * D] projection output
        qkv = torch.randn(rows, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen)
        # sliced on the device: a copy of the strided view to the GPU would come out contiguous
        q = qkv.to(dtype).to(DEVICE)[:, : num_q_heads * head_dim].view(rows, num_q_heads, head_dim)
    else:
        q = torch.randn(rows, num_q_heads, head_dim, generator=gen).to(dtype)
    tables = _make_tables(context_lens, block_size, max_blocks, num_blocks, gen)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, tables, lens)]


# ----------------------------------------------------------------------------- decode attention

CONTEXT_LENS = [1, 15, 16, 0, 17, 100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [1, 3, 12, None])  # 12 > blocks (and tiles) of any row
def test_paged_decode_matches_reference(dtype, block_size, num_splits):
    q, k_cache, v_cache, tables, lens = _decode_case(CONTEXT_LENS, block_size, 4, 2, 32, dtype,
                                                     max_blocks=9)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=num_splits)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert (out[CONTEXT_LENS.index(0)] == 0).all()
    torch.testing.assert_close(out, ref, **_tol(dtype))


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_paged_decode_glm_heads_long_context(num_splits):
    # GLM-OCR's head shape (16 q / 8 kv heads, D 128) over several tiles; q a packed-qkv view.
    lens = [300, 0, 129]
    q, k_cache, v_cache, tables, lens_t = _decode_case(lens, 16, 16, 8, 128, torch.float16,
                                                       seed=3, packed_q=True)
    assert not q.is_contiguous()
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens_t, scale=0.1,
                                 num_splits=num_splits)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens_t, scale=0.1)
    assert (out[1] == 0).all()
    torch.testing.assert_close(out, ref, **_tol(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [8, 24, 80, 160, 256])
def test_paged_decode_non_power_of_two_head_dim_and_group(head_dim, dtype):
    # 6 q heads over 2 kv heads (group 3), head dims padded to a power of two (or to 16): the
    # padded head/dim lanes must stay inert. Tables and lengths in int64 this time.
    q, k_cache, v_cache, tables, lens = _decode_case([33, 7, 0], 16, 6, 2, head_dim, dtype,
                                                     seed=4)
    tables, lens = tables.long(), lens.long()
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=2)
    assert (out[2] == 0).all()
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens),
                               **_tol(dtype))


def test_paged_decode_rejects_head_dim_over_256():
    q, k_cache, v_cache, tables, lens = _decode_case([5], 16, 2, 1, 264, torch.float32)
    with pytest.raises(ValueError, match="head_dim 264 is not supported"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens)


def test_paged_decode_after_the_cache_write():
    # Tokens written by the decoder's cache write (mrope_write_kv_) are the ones decode reads
    # back. At position 0 the rotation is the identity, so the cache holds k itself.
    gen = torch.Generator().manual_seed(5)
    block_size, num_kv_heads, head_dim, n = 16, 2, 32, 40
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    table = torch.tensor([[4, 1, 6]], dtype=torch.int32, device=DEVICE)
    pos = torch.arange(n, device=DEVICE)
    slots = table[0, pos // block_size].long() * block_size + pos % block_size
    k_cache = torch.full((8, block_size, num_kv_heads, head_dim), SENTINEL, device=DEVICE)
    v_cache = k_cache.clone()
    mrope_write_kv_(k.clone(), k.clone(), v, torch.zeros(3, n, dtype=torch.int64, device=DEVICE),
                    [head_dim // 2, 0, 0], 10000.0, k_cache, v_cache, slots)
    q = torch.randn(1, 4, head_dim, generator=gen).to(DEVICE)
    out = paged_decode_attention(q, k_cache, v_cache, table, torch.tensor([n], dtype=torch.int32,
                                                                        device=DEVICE))
    kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    ref = torch.einsum("hn,nhd->hd", (torch.einsum("hd,nhd->hn", q[0], kk) / head_dim ** 0.5)
                       .softmax(-1), vv)
    torch.testing.assert_close(out[0], ref, **_tol(torch.float32))


def test_default_num_splits_is_static_and_bounded():
    assert default_num_splits(32, 8, 256, 16) == 1   # 256 programs already fill 132 SMs
    assert default_num_splits(8, 8, 256, 16) == 6    # 384 programs: one wave of 3 x 132
    assert default_num_splits(1, 8, 256, 16) == 49
    assert default_num_splits(1, 8, 2, 16) == 1      # a 32-token table holds a single tile
    assert default_num_splits(512, 8, 512, 16) == 1
    assert default_num_splits(8, 8, 256, 16, num_sms=108) == 5  # A100: one wave of 3 x 108
    # The interpreter (1 "SM"): a few splits at batch 1, so CPU runs still cross split + combine.
    assert multiprocessor_count(torch.device("cpu")) == 1
    assert default_num_splits(1, 1, 256, 16, num_sms=1) == 3
    assert default_num_splits(6, 1, 256, 16, num_sms=1) == 1


def test_paged_decode_rejects_bad_shapes():
    q, k_cache, v_cache, tables, lens = _decode_case([5], 16, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        paged_decode_attention(q[:, :3], k_cache, v_cache, tables, lens)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens.float())


def test_paged_decode_multi_query_rejects_bad_shapes():
    # 2 sequences x 3 queries: q must have exactly B * Q rows, num_queries must be an int >= 1.
    q, k_cache, v_cache, tables, lens = _decode_case([5, 9], 16, 4, 2, 32, torch.float32,
                                                     num_queries=3)
    for bad in (0, -1, 1.0, True, None):
        with pytest.raises(ValueError, match="num_queries must be an int >= 1"):
            paged_decode_attention(q, k_cache, v_cache, tables, lens, num_queries=bad)
    with pytest.raises(ValueError, match=r"q must be \[B \* 3,"):
        paged_decode_attention(q[:5], k_cache, v_cache, tables, lens, num_queries=3)
    with pytest.raises(ValueError, match=r"block_tables must be \[3, max_blocks\]"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, num_queries=2)
    with pytest.raises(ValueError, match=r"context_lens must be \[2\]"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens[:1], num_queries=3)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, num_queries=3)
    assert out.shape == q.shape


# ----------------------------------------------------------------------------- several queries


def _poisoned_empty(monkeypatch):
    """torch.empty filled with NaN while patched: every output / partial element the launcher
    allocates must be written by a kernel."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def _query_lens(context_lens: list[int], num_queries: int) -> list[list[int]]:
    """[B][Q] tokens query j of each sequence sees (may be <= 0: a zero row)."""
    return [[n - (num_queries - 1 - j) for j in range(num_queries)] for n in context_lens]


# Ragged: 0 and 1 (shorter than any Q: some or all rows see nothing), 65 and 130 (the last 64-token
# tile holds 1 or 2 tokens, fewer than the earlier queries' offsets: fully masked tile rows), 33.
MULTI_QUERY_LENS = [1, 0, 65, 3, 130, 33]


# The interpreter computes with numpy: a NaN anywhere in the kernel (such as exp2(-inf - -inf) in
# the online softmax of a row without a token yet) raises "invalid value" as an error.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_queries", [2, 3, 5])
@pytest.mark.parametrize("heads,block_size,num_splits", [
    ((16, 8, 128), 16, 1),   # GLM-OCR: group 2, Q * 2 <= 10 rows of the 16 MMA rows
    ((16, 8, 128), 32, 3),
    ((6, 2, 80), 16, 2),     # group 3: Q * 3 up to 15 rows, D padded to 128
    ((8, 2, 48), 32, 1),     # group 4: Q 5 takes 20 rows, BLOCK_H 32
], ids=["glm-bs16-s1", "glm-bs32-s3", "g3-d80-bs16-s2", "g4-d48-bs32-s1"])
def test_paged_decode_multi_query_matches_reference(dtype, num_queries, heads, block_size,
                                                   num_splits, monkeypatch):
    num_q_heads, num_kv_heads, head_dim = heads
    q, k_cache, v_cache, tables, lens = _decode_case(MULTI_QUERY_LENS, block_size, num_q_heads,
                                                     num_kv_heads, head_dim, dtype, seed=11,
                                                     num_queries=num_queries)
    # Poison the cache slots past each context: masked loads must never read them.
    flat = [c.view(-1, num_kv_heads, head_dim) for c in (k_cache, v_cache)]
    for b, n in enumerate(MULTI_QUERY_LENS):
        pos = torch.arange(n, tables.shape[1] * block_size, device=DEVICE)
        slots = tables[b, pos // block_size].long() * block_size + pos % block_size
        owned = pos // block_size < -(-n // block_size)  # the sequence's own last block
        for c in flat:
            c[slots[owned]] = float("nan")
    with monkeypatch.context() as m:
        _poisoned_empty(m)
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=num_splits,
                                     num_queries=num_queries)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, num_queries=num_queries)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    seen = torch.tensor(_query_lens(MULTI_QUERY_LENS, num_queries), device=DEVICE).view(-1)
    assert (out[seen <= 0] == 0).all() and (ref[seen <= 0] == 0).all()
    assert (out[seen > 0].abs().amax(dim=(1, 2)) > 0).all()
    torch.testing.assert_close(out, ref, **_tol(dtype))


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("num_queries", [2, 4])
def test_paged_decode_multi_query_equals_single_queries(num_queries, num_splits):
    # Q queries in one call = Q single-query calls over contexts ctx - (Q-1-j): query j's rows
    # (every Q-th row of q) see exactly the tokens a decode at that position sees.
    lens = [0, 2, 70, 129, 40]
    q, k_cache, v_cache, tables, lens_t = _decode_case(lens, 16, 6, 2, 64, torch.float32, seed=12,
                                                       num_queries=num_queries, packed_q=True)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens_t, num_splits=num_splits,
                                 num_queries=num_queries)
    for j in range(num_queries):
        lens_j = (lens_t - (num_queries - 1 - j)).clamp(min=0)
        single = paged_decode_attention(q[j::num_queries], k_cache, v_cache, tables, lens_j,
                                        num_splits=num_splits)
        torch.testing.assert_close(out[j::num_queries], single, atol=1e-6, rtol=1e-6)
        ref = paged_decode_attention_ref(q[j::num_queries], k_cache, v_cache, tables, lens_j)
        torch.testing.assert_close(single, ref, **_tol(torch.float32))


def test_paged_decode_multi_query_reference_is_single_query_reference():
    # The reference at Q queries is the Q=1 reference, call for call (bit-identical).
    lens = [5, 1, 0, 20]
    q, k_cache, v_cache, tables, lens_t = _decode_case(lens, 16, 4, 2, 32, torch.float32, seed=13,
                                                       num_queries=3)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens_t, num_queries=3)
    for j in range(3):
        single = paged_decode_attention_ref(q[j::3], k_cache, v_cache, tables,
                                            (lens_t - (2 - j)).clamp(min=0))
        assert torch.equal(out[j::3], single)


def test_paged_decode_multi_query_past_table_capacity():
    # Context lengths past max_blocks * block_size: every row still sees at most the table's
    # tokens, as a single-query call does (the tail queries all see the whole table).
    q, k_cache, v_cache, tables, lens = _decode_case([40], 16, 4, 2, 32, torch.float32, seed=14,
                                                     num_queries=3)
    lens = torch.tensor([42], dtype=torch.int32, device=DEVICE)  # table holds 48, seen: 40 41 42
    tables = tables[:, :2]  # 32 tokens: queries see 32, 32, 32
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=2, num_queries=3)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, num_queries=3)
    torch.testing.assert_close(out, ref, **_tol(torch.float32))
    single = paged_decode_attention(q, k_cache, v_cache, tables.expand(3, -1),
                                    torch.full((3,), 32, dtype=torch.int32, device=DEVICE))
    torch.testing.assert_close(out, single, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- sm_90 compile


def _split_spec(dtype: str, num_splits: int, block_size: int, group: int, head_dim: int,
                num_queries: int = 1) -> tuple:
    sig = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
           "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "out_ptr": f"*{dtype}",
           "part_out_ptr": "*fp32" if num_splits > 1 else f"*{dtype}",
           "part_lse_ptr": "*fp32" if num_splits > 1 else f"*{dtype}",
           "qk_scale": "fp32", "max_blocks": "i32"}
    for n in ("stride_qb", "stride_qh", "stride_kc_block", "stride_kc_slot", "stride_kc_head",
              "stride_vc_block", "stride_vc_slot", "stride_vc_head", "stride_bt", "stride_ob",
              "stride_oh"):
        sig[n] = "i32"
    block_d, block_n = decode_tiles(head_dim)
    consts = dict(NUM_Q_HEADS=8 * group, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                  NUM_SPLITS=num_splits, NUM_QUERIES=num_queries,
                  BLOCK_H=max(16, triton.next_power_of_2(num_queries * group)),
                  BLOCK_D=block_d, BLOCK_N=block_n,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    sig.update({n: "constexpr" for n in consts})
    return ("glmrt.kernels.paged", "_paged_decode_split_kernel", sig, consts)


def _combine_spec(dtype: str, num_splits: int, head_dim: int = 128) -> tuple:
    sig = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{dtype}",
           "stride_ob": "i32", "stride_oh": "i32"}
    consts = dict(NUM_Q_HEADS=16, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
                  BLOCK_S=triton.next_power_of_2(num_splits),
                  BLOCK_D=triton.next_power_of_2(head_dim))
    sig.update({n: "constexpr" for n in consts})
    return ("glmrt.kernels.paged", "_paged_decode_combine_kernel", sig, consts)


def test_paged_kernels_compile_for_sm90():
    specs = []
    for dtype in ("fp16", "bf16"):
        for num_splits, block_size in ((1, 16), (3, 16), (4, 32), (64, 16)):
            specs.append(_split_spec(dtype, num_splits, block_size, group=2, head_dim=128))
        for num_splits in (3, 64):
            specs.append(_combine_spec(dtype, num_splits))
        for num_splits, block_size in ((1, 16), (3, 32)):  # GLM-OCR heads, 4 queries: 8 rows
            specs.append(_split_spec(dtype, num_splits, block_size, group=2, head_dim=128,
                                     num_queries=4))
        specs.append(_split_spec(dtype, 2, 16, group=8, head_dim=128, num_queries=4))  # 32 rows
    # Other head dims, each once, fp16 and bf16 alternating: both are 16-bit, so a head dim compiles
    # to the same tiles, layouts and register and shared-memory footprint in either, and each
    # dtype's own conversions and MMAs are compiled above.
    for i, head_dim in enumerate((8, 24, 80, 160, 256)):
        dtype = ("fp16", "bf16")[i % 2]
        specs.append(_split_spec(dtype, 2, 16, group=3, head_dim=head_dim))
        # speculative verification: 4 queries x group 3 = 12 of the 16 MMA rows
        specs.append(_split_spec(dtype, 2, 16, group=3, head_dim=head_dim, num_queries=4))
        specs.append(_combine_spec(dtype, 5, head_dim))
    specs.append(_split_spec("fp32", 2, 16, group=2, head_dim=128))
    specs.append(_split_spec("fp32", 2, 16, group=2, head_dim=256))
    specs.append(_split_spec("fp32", 2, 16, group=2, head_dim=128, num_queries=4))
    compile_for_hopper(specs)


_PIPELINE_HEAD_DIMS = (128, 80, 160, 256)


def test_decode_kernel_is_pipelined_on_sm90():
    # The bandwidth of decode rests on K/V tiles copied asynchronously ahead of use (cp.async or
    # bulk copies) as 16-byte vectors, on the MMA path, and on three programs sharing an SM with
    # no register spills, for every padded head dim; the interpreter cannot show any of it.
    # Also with 4 queries (speculative verification, 8 of the 16 MMA rows): per-row masks only.
    options = dict(num_warps=paged._DECODE_WARPS, num_stages=paged._DECODE_STAGES)
    cases = [(d, n) for n in (1, 4) for d in _PIPELINE_HEAD_DIMS]
    specs = [(*_split_spec("bf16", 2, 16, group=2, head_dim=d, num_queries=n), options,
              ["cp.async", "mma.sync"]) for d, n in cases]
    for (head_dim, num_queries), r in zip(cases, hopper_resources(specs)):
        r["head_dim"], r["num_queries"] = head_dim, num_queries
        assert r["cp.async"] > 0, f"K/V loads are not pipelined: {r}"
        assert r["mma.sync"] > 0, f"no tensor-core MMA: {r}"
        assert r["spills"] == 0, f"registers spill: {r}"
        assert 3 * r["regs"] * r["threads"] <= 65536, f"3 programs do not fit the registers: {r}"
        assert 3 * (r["shared"] + 1024) <= 228 * 1024, f"3 programs do not fit shared memory: {r}"


# ----------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("num_queries", [1, 4])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_paged_decode_bf16_real_sizes(num_splits, num_queries):
    batch, context, block_size = 32, 4096, 16
    lens = [context - (b * 37) % 100 for b in range(batch)]  # ragged last blocks
    q, k_cache, v_cache, tables, lens_t = _decode_case(lens, block_size, 16, 8, 128, torch.bfloat16,
                                                       max_blocks=context // block_size, seed=8,
                                                       num_queries=num_queries)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens_t, num_splits=num_splits,
                                 num_queries=num_queries)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens_t, num_queries=num_queries)
    torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("num_queries", [1, 3])
def test_paged_decode_cuda_graph_replay(num_queries):
    # Captured once at fixed shapes, replayed with new lengths / tables / a zero-length row (and,
    # with 3 queries, a 1-token context: its first two rows see nothing).
    block_size, max_blocks = 16, 64
    lens_a = [1000, 17, 0, 512]
    lens_b = [1, 1024, 700, 0]
    # the pool is sized for four full tables, enough for either set of lengths
    q, k_cache, v_cache, tables, lens_t = _decode_case([max_blocks * block_size] * 4, block_size,
                                                       16, 8, 128, torch.bfloat16,
                                                       num_queries=num_queries)
    gen = torch.Generator().manual_seed(9)
    call = dict(num_queries=num_queries)
    paged_decode_attention(q, k_cache, v_cache, tables, lens_t, **call)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens_t, **call)
    for lens in (lens_a, lens_b):
        lens_t.copy_(torch.tensor(lens, dtype=torch.int32))
        tables.copy_(_make_tables(lens, block_size, max_blocks, k_cache.shape[0], gen))
        q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
        graph.replay()
        ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens_t, **call)
        torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))
        seen = torch.tensor(_query_lens(lens, num_queries), device=DEVICE).view(-1)
        assert (out[seen <= 0] == 0).all()
