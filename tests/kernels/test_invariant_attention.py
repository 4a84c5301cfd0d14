"""Batch-invariant paged attention against paged.py's references, and its promise: a query's
output is the same bits whether it is decoded alone or in a batch, verified among drafts,
prefilled whole or in chunks of any size, with the splits in the grid or folded in-program."""
import pytest
import torch
import triton

from glmrt.kernels import invariant_attention as ia
from glmrt.kernels.paged import paged_decode_attention_ref, paged_prefill_attention_ref
from glmrt_testing.hopper import compile_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def _cache(context_lens, block_size, num_kv_heads, head_dim, dtype, gen, max_blocks=None):
    """Random caches and shuffled block tables [B, max_blocks] for sequences of context_lens
    tokens; each sequence's slots past its context in its last block are NaN (never read)."""
    used = [max(1, triton.cdiv(n, block_size)) for n in context_lens]
    max_blocks = max_blocks or max(used) + 1
    num_blocks = sum(used) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    perm = torch.randperm(num_blocks, generator=gen)
    tables = perm[torch.randint(0, num_blocks, (len(context_lens), max_blocks), generator=gen)].int()
    start = 0
    for b, (n, u) in enumerate(zip(context_lens, used)):
        tables[b, :u] = perm[start: start + u]
        start += u
        pos = torch.arange(n, u * block_size)
        for c in (k_cache, v_cache):
            c[tables[b, pos // block_size].long(), pos % block_size] = float("nan")
    return k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE)


def _cu(chunks):
    cu = torch.zeros(len(chunks) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(chunks).cumsum(0)
    return cu.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2, 16), (6, 2, 24)])  # (Hq, Hkv, D): groups 2 and 3
@pytest.mark.parametrize("num_queries", [1, 4])
def test_decode_matches_reference(dtype, heads, num_queries):
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(num_queries)
    lens = [1, 17, 0, 256, 257, 600, 3][: 7 if num_queries == 1 else 6]  # 3 < Q: rows with no key
    k_cache, v_cache, tables = _cache(lens, 16, hkv, d, dtype, gen)
    q = torch.randn(len(lens) * num_queries, hq, d, generator=gen).to(dtype).to(DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = ia.decode_attention(q, k_cache, v_cache, tables, ctx, num_queries)
    grid = ia.decode_attention(q, k_cache, v_cache, tables, ctx, num_queries, splits_in_grid=True)
    assert torch.equal(out, grid)  # the splits folded in-program or by the combine kernel
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, num_queries=num_queries)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    chunks, prefixes = [5, 0, 130, 64, 1], [0, 7, 300, 0, 511]
    lens = [c + p for c, p in zip(chunks, prefixes)]
    k_cache, v_cache, tables = _cache(lens, 16, 2, 16, dtype, gen)
    qkv = torch.randn(sum(chunks), 8 * 16, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : 4 * 16].view(-1, 4, 16)  # a strided view of a packed projection
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = ia.prefill_attention(q, k_cache, v_cache, _cu(chunks), tables, ctx, max(chunks))
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, _cu(chunks), tables, ctx)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_query_is_the_same_bits_however_it_is_run(dtype):
    """One 600-token sequence (3 splits) beside others: prefilled whole, in chunks of 64, 500 and
    ragged ones, decoded one token at a time in batches of 1 and 5 (both decode paths), verified
    four at a time — every query's output identical."""
    gen = torch.Generator().manual_seed(5)
    n, hq, hkv, d = 600, 4, 2, 16
    others = [40, 700, 3, 256]
    k_cache, v_cache, tables = _cache([n] + others, 16, hkv, d, dtype, gen, max_blocks=48)
    q_all = torch.randn(n, hq, d, generator=gen).to(dtype).to(DEVICE)
    one = tables[:1]
    whole = ia.prefill_attention(q_all, k_cache, v_cache, _cu([n]), one,
                                 torch.tensor([n], dtype=torch.int32, device=DEVICE), n)
    for cuts in ([64] * 10, [500, 100], [1, 255, 2, 300, 42]):
        parts, start = [], 0
        for c in cuts:
            end = min(n, start + c)
            ctx = torch.tensor([end], dtype=torch.int32, device=DEVICE)
            parts.append(ia.prefill_attention(q_all[start:end], k_cache, v_cache, _cu([end - start]),
                                              one, ctx, end - start))
            start = end
        assert torch.equal(torch.cat(parts), whole), cuts
    # the same chunk packed with other sequences' chunks
    q_mix = torch.cat([torch.randn(7, hq, d, generator=gen).to(dtype).to(DEVICE), q_all[300:400]])
    ctx = torch.tensor([47, 400], dtype=torch.int32, device=DEVICE)
    mixed = ia.prefill_attention(q_mix, k_cache, v_cache, _cu([7, 100]), tables[[1, 0]], ctx, 100)
    assert torch.equal(mixed[7:], whole[300:400])
    for p in (0, 1, 255, 256, 257, 511, 599):
        for batch in (1, 5):
            rows = torch.randn(batch, hq, d, generator=gen).to(dtype).to(DEVICE)
            rows[batch // 2] = q_all[p]
            lens = torch.tensor([5, 700, 40, 256, 3][:batch], dtype=torch.int32)
            lens[batch // 2] = p + 1
            order = [1, 2, 0, 4, 3][:batch]
            order[batch // 2] = 0
            for in_grid in (False, True):
                out = ia.decode_attention(rows, k_cache, v_cache, tables[order], lens.to(DEVICE),
                                          splits_in_grid=in_grid)
                assert torch.equal(out[batch // 2], whole[p]), (p, batch, in_grid)
        if p >= 3:  # verified as the last of four queries, and as the first
            for last in (p, min(p + 3, n - 1)):
                ctx = torch.tensor([last + 1], dtype=torch.int32, device=DEVICE)
                out = ia.decode_attention(q_all[last - 3: last + 1], k_cache, v_cache, one, ctx, 4)
                assert torch.equal(out[p - (last - 3)], whole[p]), (p, last)


def test_rejects_what_paged_attention_rejects():
    k_cache, v_cache, tables = _cache([4], 16, 2, 16, torch.float32, torch.Generator().manual_seed(0))
    ctx = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="num_queries"):
        ia.decode_attention(torch.zeros(2, 4, 16, device=DEVICE), k_cache, v_cache, tables, ctx, 0)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        ia.prefill_attention(torch.zeros(4, 4, 16, device=DEVICE), k_cache, v_cache, _cu([4]),
                             tables, ctx, -1)


# ----------------------------------------------------------------------------- sm_90 compile


def _spec(dtype: str, head_dim: int, group: int, num_queries: int, grid_splits: int) -> tuple:
    block_r, block_n, block_d = ia.tiles(head_dim, {"fp32": torch.float32}.get(dtype, torch.float16))
    part = "*fp32" if grid_splits > 1 else f"*{dtype}"
    sig = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
           "cu_seqlens_ptr": "*i32", "block_tables_ptr": "*i32", "context_lens_ptr": "*i32",
           "out_ptr": f"*{dtype}", "part_m_ptr": part, "part_l_ptr": part, "part_acc_ptr": part,
           "qk_scale": "fp32", "max_blocks": "i32"}
    for n in ("stride_qt", "stride_qh", "stride_kc_block", "stride_kc_slot", "stride_kc_head",
              "stride_vc_block", "stride_vc_slot", "stride_vc_head", "stride_bt", "stride_ot",
              "stride_oh"):
        sig[n] = "i32"
    consts = dict(NUM_Q_HEADS=8 * group, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=16,
                  NUM_QUERIES=num_queries, GRID_SPLITS=grid_splits, SPLIT_KEYS=ia.SPLIT,
                  BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    sig.update({n: "constexpr" for n in consts})
    combine = {n: sig[n] for n in ("context_lens_ptr", "out_ptr", "part_m_ptr", "part_l_ptr",
                                   "part_acc_ptr", "max_blocks", "stride_ot", "stride_oh")}
    combine_consts = {n: v for n, v in consts.items() if n not in ("BLOCK_N", "DOT_PRECISION")}
    combine.update({n: "constexpr" for n in combine_consts})
    return [("glmrt.kernels.invariant_attention", "_attention_kernel", sig, consts),
            ("glmrt.kernels.invariant_attention", "_combine_kernel", combine, combine_consts)]


def test_invariant_attention_compiles_for_sm90():
    specs = []
    for dtype in ("bf16", "fp16"):
        specs += _spec(dtype, 128, 2, 1, 64)  # GLM-OCR decode, a 16k table
        specs += _spec(dtype, 128, 2, 4, 17)  # verifying 3 drafts
        specs.append(_spec(dtype, 128, 2, 0, 1)[0])  # prefill
    for head_dim in (24, 80, 256):
        specs += _spec("bf16", head_dim, 3, 1, 5)
        specs.append(_spec("bf16", head_dim, 3, 0, 1)[0])
    specs.append(_spec("fp32", 128, 2, 0, 1)[0])
    compile_for_hopper(specs)


# ----------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
def test_glm_ocr_heads_bf16_same_bits_decoded_chunked_and_verified():
    gen = torch.Generator().manual_seed(9)
    n, hq, hkv, d, dt = 2000, 16, 8, 128, torch.bfloat16
    k_cache, v_cache, tables = _cache([n, 5000, 300], 16, hkv, d, dt, gen, max_blocks=1025)
    q_all = torch.randn(n, hq, d, generator=gen).to(dt).to(DEVICE)
    ctx = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    whole = ia.prefill_attention(q_all, k_cache, v_cache, _cu([n]), tables[:1], ctx, n)
    torch.testing.assert_close(whole, paged_prefill_attention_ref(q_all, k_cache, v_cache, _cu([n]),
                                                                  tables[:1], ctx), **TOL[dt])
    for p in (0, 255, 256, 1999):
        for batch in (1, 3):
            rows = torch.randn(batch, hq, d, generator=gen).to(dt).to(DEVICE)
            rows[0] = q_all[p]
            lens = torch.tensor([p + 1, 5000, 300][:batch], dtype=torch.int32, device=DEVICE)
            out = ia.decode_attention(rows, k_cache, v_cache, tables[:batch], lens)
            assert torch.equal(out[0], whole[p]), (p, batch)
    out = ia.decode_attention(q_all[1996:2000], k_cache, v_cache, tables[:1], ctx, 4)
    assert torch.equal(out, whole[1996:2000])
