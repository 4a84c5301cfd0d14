"""Paged (chunked) prefill attention against its torch reference, varlen attention and decode."""
import pytest
import torch
import triton

from glmrt.kernels.attention import varlen_attention, varlen_attention_ref
from glmrt.kernels.paged import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    prefill_config,
    write_kv_cache_ref,
)
from glmrt_testing.hopper import compile_for_hopper, hopper_resources

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype: torch.dtype) -> dict:
    # fp16/bf16: P is rounded to the input dtype before the P @ V dot (as in every flash kernel)
    return {torch.float32: dict(atol=2e-5, rtol=2e-5),
            torch.float16: dict(atol=3e-3, rtol=3e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


def _cu_seqlens(chunks: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    cu = torch.zeros(len(chunks) + 1, dtype=dtype)
    cu[1:] = torch.tensor(chunks, dtype=dtype).cumsum(0)
    return cu.to(DEVICE)


def _tables(context_lens: list[int], block_size: int, max_blocks: int, num_blocks: int,
            gen: torch.Generator) -> torch.Tensor:
    """[N, max_blocks] int32 block tables from a random permutation of the pool: unordered,
    non-contiguous ids. Entries past a sequence's last block point at blocks others own."""
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.empty(len(context_lens), max_blocks, dtype=torch.int32)
    next_free = 0
    for i, n in enumerate(context_lens):
        used = triton.cdiv(n, block_size)
        tables[i, :used] = perm[next_free: next_free + used]
        next_free += used
        tables[i, used:] = perm[torch.randint(0, num_blocks, (max_blocks - used,), generator=gen)]
    assert next_free <= num_blocks
    return tables


def _prefill_case(chunks, prefixes, block_size, num_q_heads, num_kv_heads, head_dim, dtype,
                  seed=0, cu_dtype=torch.int32):
    """q [T, Hq, D] (a strided view of a packed qkv projection), random caches, cu_seqlens_q
    [N + 1], tables [N, max_blocks], context_lens [N] = prefix + chunk (all on DEVICE). The cache
    slots past each context in the sequence's own last block are NaN: no load may read them."""
    gen = torch.Generator().manual_seed(seed)
    context_lens = [n + p for n, p in zip(chunks, prefixes)]
    used = [triton.cdiv(n, block_size) for n in context_lens]
    max_blocks = max(used) + 1
    num_blocks = sum(used) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    tokens = sum(chunks)
    qkv = torch.randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(dtype).to(DEVICE)  # sliced on the device: .to() would make a slice contiguous
    q = qkv[:, : num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)
    tables = _tables(context_lens, block_size, max_blocks, num_blocks, gen)
    for i, n in enumerate(context_lens):
        pos = torch.arange(n, used[i] * block_size)
        blocks = tables[i, pos // block_size].long()
        for c in (k_cache, v_cache):
            c[blocks, pos % block_size] = float("nan")
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return ([q] + [t.to(DEVICE) for t in (k_cache, v_cache)] + [_cu_seqlens(chunks, cu_dtype)]
            + [t.to(DEVICE) for t in (tables, lens)])


def _cache_from_kv(k, v, context_lens, block_size, gen):
    """Caches holding k, v [T, Hkv, D] (sequences packed by context_lens, each from index 0) at
    shuffled blocks, through write_kv_cache_ref; returns k_cache, v_cache, tables."""
    used = [triton.cdiv(n, block_size) for n in context_lens]
    num_blocks = sum(used) + 2
    tables = _tables(context_lens, block_size, max(1, max(used)), num_blocks, gen).to(DEVICE)
    slots = torch.cat([tables[i, torch.arange(n, device=DEVICE) // block_size].long() * block_size
                       + torch.arange(n, device=DEVICE) % block_size
                       for i, n in enumerate(context_lens)])
    empty = torch.zeros(num_blocks, block_size, *k.shape[1:], dtype=k.dtype, device=DEVICE)
    k_cache, v_cache = write_kv_cache_ref(k, v, empty, empty, slots)
    return k_cache, v_cache, tables


# ----------------------------------------------------------------------------- interpreter / GPU

CASES = [  # (Hq, Hkv, D), block_size, chunks, prefixes, cu_seqlens dtype
    # group 1, D 24: chunks of 0 and 1, prefixes 0, past a block boundary and past several key
    # tiles; 130 queries make two query blocks at BLOCK_M 128 (three at fp32's 64)
    ((2, 2, 24), 16, [5, 0, 1, 70, 9, 130], [0, 7, 33, 19, 100, 5], torch.int32),
    # group 2, D 40 (padded to 64), 32-token blocks, int64 cu_seqlens
    ((4, 2, 40), 32, [1, 17, 0, 40], [45, 0, 3, 31], torch.int64),
    # group 4, D 128: prefixes a multiple of the block size, and a 1-token chunk after 70
    ((4, 1, 128), 16, [33, 1, 12], [16, 70, 0], torch.int32),
]


# The interpreter computes with numpy: a NaN anywhere in the kernel (such as exp2(-inf - -inf) in
# the online softmax of a row without a visible key) raises "invalid value" as an error.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, block_size, chunks, prefixes, cu_dtype", CASES,
                         ids=["g1-d24-bs16", "g2-d40-bs32-cu64", "g4-d128-bs16"])
def test_paged_prefill_matches_reference(heads, block_size, chunks, prefixes, cu_dtype, dtype,
                                         poison_outputs):
    # poison_outputs: `out` starts as NaN, so a row the kernel leaves unwritten is not finite.
    num_q_heads, num_kv_heads, head_dim = heads
    q, k_cache, v_cache, cu, tables, lens = _prefill_case(
        chunks, prefixes, block_size, num_q_heads, num_kv_heads, head_dim, dtype, seed=head_dim,
        cu_dtype=cu_dtype)
    assert not q.is_contiguous()
    out = paged_prefill_attention(q, k_cache, v_cache, cu, tables, lens, max(chunks))
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, cu, tables, lens)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_prefill_without_prefix_is_varlen_attention(dtype):
    # Every chunk from cache index 0 (context_lens = chunk lengths): causal attention over the
    # chunk alone, as the varlen kernel computes it from the packed K/V. The reference then makes
    # the SDPA call of varlen_attention_ref (is_causal, no mask): on CPU bit for bit; a GPU may
    # pick another SDPA backend for the gathered, contiguous K/V.
    gen = torch.Generator().manual_seed(1)
    chunks = [1, 40, 0, 17]
    hq, hkv, d = 4, 2, 40
    qkv = torch.randn(sum(chunks), (hq + 2 * hkv) * d, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : hq * d].view(-1, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(-1, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(-1, hkv, d)
    k_cache, v_cache, tables = _cache_from_kv(k, v, chunks, 16, gen)
    cu = _cu_seqlens(chunks)
    lens = torch.tensor(chunks, dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention(q, k_cache, v_cache, cu, tables, lens, max(chunks))
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, cu, tables, lens)
    varlen = varlen_attention_ref(q, k, v, cu, causal=True)
    if DEVICE == "cpu":
        assert torch.equal(ref, varlen)
    torch.testing.assert_close(ref, varlen, **_tol(dtype))
    torch.testing.assert_close(out, varlen, **_tol(dtype))
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, max(chunks), causal=True),
                               **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_prefill_single_queries_are_decode(dtype):
    # One new token per sequence: query 0 at index context_len - 1 sees the whole context, as a
    # decode step does. Group 3, D 40 (padded to 64).
    prefixes = [0, 15, 16, 39, 99]
    chunks = [1] * len(prefixes)
    q, k_cache, v_cache, cu, tables, lens = _prefill_case(chunks, prefixes, 16, 3, 1, 40, dtype,
                                                          seed=2)
    out = paged_prefill_attention(q, k_cache, v_cache, cu, tables, lens, 1)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, cu, tables, lens)
    decode_ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(ref, decode_ref, **_tol(dtype))
    torch.testing.assert_close(out, decode_ref, **_tol(dtype))
    torch.testing.assert_close(out, paged_decode_attention(q, k_cache, v_cache, tables, lens),
                               **_tol(dtype))


def test_paged_prefill_chunks_compose_into_the_whole_prompt():
    # Two prompts prefilled chunk by chunk (each chunk's k, v written by write_kv_cache_ref),
    # ragged differently at each step (one sequence idle in the last): every chunk's rows are the
    # rows of one causal attention over its whole prompt.
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, block_size = 4, 2, 32, 16
    lens = [70, 45]
    steps = [[30, 5], [1, 40], [39, 0]]
    qkv = [torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(DEVICE) for n in lens]
    q, k, v = ([x[:, a * d: b * d].reshape(x.shape[0], -1, d) for x in qkv]
               for a, b in ((0, hq), (hq, hq + hkv), (hq + hkv, hq + 2 * hkv)))
    whole = [varlen_attention_ref(q[i], k[i], v[i], _cu_seqlens([n]), causal=True)
             for i, n in enumerate(lens)]
    num_blocks = 12
    tables = _tables(lens, block_size, 6, num_blocks, gen).to(DEVICE)
    k_cache = torch.zeros(num_blocks, block_size, hkv, d, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    done = [0, 0]
    for chunks in steps:
        rows = [torch.arange(done[i], done[i] + n, device=DEVICE) for i, n in enumerate(chunks)]
        slots = torch.cat([tables[i, r // block_size].long() * block_size + r % block_size
                           for i, r in enumerate(rows)])
        k_cache, v_cache = write_kv_cache_ref(torch.cat([k[i][r] for i, r in enumerate(rows)]),
                                              torch.cat([v[i][r] for i, r in enumerate(rows)]),
                                              k_cache, v_cache, slots)
        done = [a + n for a, n in zip(done, chunks)]
        out = paged_prefill_attention(
            torch.cat([q[i][r] for i, r in enumerate(rows)]), k_cache, v_cache,
            _cu_seqlens(chunks), tables, torch.tensor(done, dtype=torch.int32, device=DEVICE),
            max(chunks))
        torch.testing.assert_close(out, torch.cat([whole[i][r] for i, r in enumerate(rows)]),
                                   **_tol(torch.float32))


def test_paged_prefill_loose_max_seqlen_int64_tables_and_scale():
    # max_seqlen_q far above the longest chunk (the extra query blocks exit at once), int64
    # block tables and context lengths, a custom scale.
    q, k_cache, v_cache, cu, tables, lens = _prefill_case([3, 0, 20], [50, 2, 17], 16, 4, 2, 64,
                                                          torch.float32, seed=4)
    tables, lens = tables.long(), lens.long()
    out = paged_prefill_attention(q, k_cache, v_cache, cu, tables, lens, 300, scale=0.3)
    torch.testing.assert_close(
        out, paged_prefill_attention_ref(q, k_cache, v_cache, cu, tables, lens, scale=0.3),
        **_tol(torch.float32))


def test_paged_prefill_no_tokens():
    k_cache = torch.zeros(2, 16, 2, 32, device=DEVICE)
    tables = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)
    q = torch.zeros(0, 4, 32, device=DEVICE)
    out = paged_prefill_attention(q, k_cache, k_cache, _cu_seqlens([0, 0]), tables, lens, 0)
    assert out.shape == (0, 4, 32)
    out = paged_prefill_attention(q, k_cache, k_cache, _cu_seqlens([]), tables[:0], lens[:0], 0)
    assert out.shape == (0, 4, 32)


def test_paged_prefill_rejects_bad_arguments():
    q, k_cache, v_cache, cu, tables, lens = _prefill_case([3, 5], [0, 4], 16, 4, 2, 32,
                                                          torch.float32)
    ok = (q, k_cache, v_cache, cu, tables, lens, 5)

    def call(**changes):
        names = ("q", "k_cache", "v_cache", "cu_seqlens_q", "block_tables", "context_lens",
                 "max_seqlen_q")
        return paged_prefill_attention(**{**dict(zip(names, ok)), **changes})

    assert call().shape == q.shape
    with pytest.raises(ValueError, match=r"q must be \[T, Hq, 32\] with Hq a multiple of 2"):
        call(q=q[:, :3])
    with pytest.raises(ValueError, match="q dtype torch.float16 must match"):
        call(q=q.half())
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        call(q=torch.zeros(8, 32, 4, device=DEVICE).transpose(1, 2))
    with pytest.raises(ValueError, match="v_cache .* must match k_cache"):
        call(v_cache=v_cache[:, :8])
    with pytest.raises(ValueError, match="head_dim 264 is not supported"):
        big = torch.zeros(2, 16, 2, 264, device=DEVICE)
        call(q=torch.zeros(8, 4, 264, device=DEVICE), k_cache=big, v_cache=big)
    for bad in (cu.float(), cu[None], cu[:0], torch.zeros(6, dtype=torch.int32,
                                                          device=DEVICE)[::2]):
        with pytest.raises(ValueError, match=r"cu_seqlens_q must be a contiguous \[N \+ 1\]"):
            call(cu_seqlens_q=bad)
    with pytest.raises(ValueError, match=r"block_tables must be \[2, max_blocks\]"):
        call(block_tables=tables[:1])
    with pytest.raises(ValueError, match="block_tables must be int32/int64"):
        call(block_tables=tables.float())
    with pytest.raises(ValueError, match=r"context_lens must be a contiguous \[2\]"):
        call(context_lens=lens[:1])
    with pytest.raises(ValueError, match=r"context_lens must be a contiguous \[2\]"):
        call(context_lens=lens.float())
    for bad in (-1, 5.0, True, None):
        with pytest.raises(ValueError, match="max_seqlen_q must be an int >= 0"):
            call(max_seqlen_q=bad)
    with pytest.raises(ValueError, match="scale must be positive"):
        paged_prefill_attention(*ok, scale=-1.0)


# ----------------------------------------------------------------------------- sm_90 compile

_STRIDES = ("stride_qt", "stride_qh", "stride_kc_block", "stride_kc_slot", "stride_kc_head",
            "stride_vc_block", "stride_vc_slot", "stride_vc_head", "stride_bt", "stride_ot",
            "stride_oh")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _spec(dtype: str, head_dim: int, block_size: int = 16, group: int = 2,
          cu: str = "i32") -> tuple:
    config = prefill_config(head_dim, _DTYPES[dtype])
    sig = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
           "cu_seqlens_ptr": f"*{cu}", "block_tables_ptr": "*i32", "context_lens_ptr": "*i32",
           "out_ptr": f"*{dtype}", "qk_scale": "fp32", "max_blocks": "i32",
           **{n: "i32" for n in _STRIDES}}
    consts = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                  BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"],
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    sig.update({n: "constexpr" for n in consts})
    return ("glmrt.kernels.paged", "_paged_prefill_kernel", sig, consts)


def test_paged_prefill_kernel_compiles_for_sm90():
    # Padded head dims (24 -> 32, 80 -> 128), the 64-key tiles (D <= 64), 32- and 64-token
    # blocks, int64 cu_seqlens, group 1 and 8, and the fp32 test path (ieee FMA dots). D 256 is
    # left out: its compile alone takes longer than the rest of this file.
    compile_for_hopper([
        _spec("bf16", 24, group=1), _spec("fp16", 64, block_size=32, cu="i64"),
        _spec("bf16", 80, block_size=64, group=8), _spec("fp32", 40),
    ])


def test_paged_prefill_hopper_resources():
    # What the speed rests on, which the interpreter cannot show: wgmma for both dots, K/V copied
    # asynchronously with copies still in flight while a tile is consumed (wait_group 3: the 5
    # stages of prefill_config), no register spills, and two programs per SM, at GLM-OCR's D 128
    # (16 q / 8 kv heads, 16-token blocks).
    cases = [("bf16", 128), ("fp16", 128)]
    specs = []
    for dtype, head_dim in cases:
        config = prefill_config(head_dim, _DTYPES[dtype])
        options = {k: v for k, v in config.items() if not k.startswith("BLOCK")}
        specs.append((*_spec(dtype, head_dim), options,
                      ["wgmma.mma_async", "cp.async.cg", "cp.async.wait_group \t3;"]))
    for (dtype, head_dim), r in zip(cases, hopper_resources(specs)):
        r.update(dtype=dtype, head_dim=head_dim)
        assert r["wgmma.mma_async"] > 0, f"no warpgroup MMA: {r}"
        assert r["cp.async.cg"] > 0, f"K/V loads are not asynchronous copies: {r}"
        assert r["cp.async.wait_group \t3;"] > 0, f"no K/V copy in flight during a tile: {r}"
        assert r["spills"] == 0, f"registers spill: {r}"
        assert 2 * r["regs"] * r["threads"] <= 65536, f"2 programs do not fit the registers: {r}"
        # 228 KiB of shared memory per SM, of which each resident program reserves 1 KiB
        assert 2 * (r["shared"] + 1024) <= 228 * 1024, f"2 programs do not fit shared memory: {r}"


# ----------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
def test_paged_prefill_bf16_real_sizes():
    # GLM-OCR's heads (16 q / 8 kv, D 128), 16-token blocks: long chunks after long prefixes.
    q, k_cache, v_cache, cu, tables, lens = _prefill_case(
        [2048, 1, 517, 1000], [4096, 3000, 0, 123], 16, 16, 8, 128, torch.bfloat16, seed=5)
    out = paged_prefill_attention(q, k_cache, v_cache, cu, tables, lens, 2048)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, cu, tables, lens)
    torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


@pytest.mark.gpu
def test_paged_prefill_cuda_graph_replay():
    # Captured once at fixed shapes (T, N, max_seqlen_q), replayed with new chunk boundaries,
    # prefixes and tables, an empty chunk included.
    block_size, max_blocks, tokens = 16, 32, 96
    steps = [([30, 1, 65], [0, 200, 17]), ([0, 90, 6], [5, 300, 0])]
    q, k_cache, v_cache, cu, tables, lens = _prefill_case(
        [32, 32, 32], [max_blocks * block_size - 32] * 3, block_size, 16, 8, 128, torch.bfloat16)
    gen = torch.Generator().manual_seed(6)
    # New tables may hand any slot to a context: no NaN-poisoned slots this time.
    k_cache, v_cache = (torch.randn(k_cache.shape, generator=gen).to(torch.bfloat16).to(DEVICE)
                        for _ in range(2))
    paged_prefill_attention(q, k_cache, v_cache, cu, tables, lens, tokens)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_prefill_attention(q, k_cache, v_cache, cu, tables, lens, tokens)
    for chunks, prefixes in steps:
        context = [n + p for n, p in zip(chunks, prefixes)]
        cu.copy_(_cu_seqlens(chunks))
        lens.copy_(torch.tensor(context, dtype=torch.int32))
        tables.copy_(_tables(context, block_size, tables.shape[1], k_cache.shape[0], gen))
        q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
        graph.replay()
        ref = paged_prefill_attention_ref(q, k_cache, v_cache, cu, tables, lens)
        torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))
