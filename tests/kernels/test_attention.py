"""Varlen flash-attention forward against its per-sequence torch reference (and SDPA on a GPU)."""
import pytest
import torch
import torch.nn.functional as F

from glmrt.kernels.attention import _launch_config, varlen_attention, varlen_attention_ref
from glmrt_testing.hopper import compile_for_hopper, hopper_resources

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype: torch.dtype) -> dict:
    # fp16: P is rounded to fp16 before the P @ V dot (as in every flash kernel)
    return {torch.float32: dict(atol=1e-5, rtol=1e-5),
            torch.float16: dict(atol=3e-3, rtol=3e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


def _cu_seqlens(lens: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=dtype)
    cu[1:] = torch.tensor(lens, dtype=dtype).cumsum(0)
    return cu.to(DEVICE)


def _qkv(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
         layout: str = "packed", seed: int = 0, q_scale: float = 1.0):
    """q [T, Hq, D], k and v [T, Hkv, D] in one of three memory layouts:
    packed: views into a text-style qkv projection [T, (Hq + 2 Hkv) D];
    vision: views into a vision-style [T, 3, H, D] projection (Hq == Hkv);
    contiguous: three separate tensors."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    if layout == "packed":
        qkv = randn(num_tokens, (hq + 2 * hkv) * d)
        q = qkv[:, : hq * d].view(num_tokens, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].view(num_tokens, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(num_tokens, hkv, d)
    elif layout == "vision":
        assert hq == hkv
        qkv = randn(num_tokens, 3, hq, d)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    else:
        q, k, v = randn(num_tokens, hq, d), randn(num_tokens, hkv, d), randn(num_tokens, hkv, d)
    return q * q_scale if q_scale != 1.0 else q, k, v


def _check(lens, num_q_heads, num_kv_heads, head_dim, dtype, causal, layout="packed", seed=0,
           q_scale=1.0, tol=None):
    q, k, v = _qkv(sum(lens), num_q_heads, num_kv_heads, head_dim, dtype, layout, seed, q_scale)
    cu = _cu_seqlens(lens)
    out = varlen_attention(q, k, v, cu, max(lens), causal)
    ref = varlen_attention_ref(q, k, v, cu, causal)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **(tol or _tol(dtype)))


# ----------------------------------------------------------------------------- interpreter / GPU

CASES = [  # (sequence lengths, Hq, Hkv, D)
    ([1], 4, 4, 64),
    ([1, 1, 1], 4, 2, 128),
    ([17, 64, 3, 130], 4, 2, 64),   # partial / exact / tiny tiles, two query blocks in the last
    ([17, 64, 3, 130], 4, 4, 128),
    ([200], 4, 2, 128),             # several key tiles, diagonal tiles in both query blocks
    ([9, 70], 16, 8, 32),           # GLM's GQA head counts at a small D
    ([5, 40], 4, 2, 16),            # the tiny test checkpoint's head dim
    # head dims that are not powers of two (padded tiles, masked lanes), and the largest
    ([7], 2, 1, 8),
    ([17, 3], 4, 2, 24),
    ([9, 40], 2, 1, 40),
    ([70], 2, 2, 48),
    ([33], 2, 2, 80),
    ([5, 20], 2, 1, 96),
    ([3, 35], 2, 1, 160),
    ([2, 33], 2, 2, 256),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens, num_q_heads, num_kv_heads, head_dim", CASES)
def test_varlen_attention_matches_reference(lens, num_q_heads, num_kv_heads, head_dim, causal,
                                            dtype):
    _check(lens, num_q_heads, num_kv_heads, head_dim, dtype, causal)


@pytest.mark.parametrize("layout", ["vision", "contiguous"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_layouts(layout, causal):
    _check([33, 80], 2, 2, 64, torch.float16, causal, layout=layout, seed=1)


def test_varlen_attention_empty_sequences_and_loose_max_seqlen():
    # Empty sequences in the pack, a max_seqlen above the longest sequence (extra query blocks
    # exit at once), int64 cu_seqlens and a custom scale.
    lens = [0, 70, 0, 5]
    q, k, v = _qkv(sum(lens), 4, 2, 64, torch.float32, seed=2)
    cu = _cu_seqlens(lens, torch.int64)
    for causal in (False, True):
        out = varlen_attention(q, k, v, cu, 300, causal, scale=0.3)
        torch.testing.assert_close(out, varlen_attention_ref(q, k, v, cu, causal, scale=0.3),
                                   **_tol(torch.float32))


def test_varlen_attention_large_scores_are_stable():
    # Scores in the hundreds: the running max must keep every exp2 in range. A score's rounding
    # error grows with its size (~300 * 2^-24), and so does the softmax's, hence the looser bound.
    for causal in (False, True):
        _check([100, 37], 2, 1, 64, torch.float32, causal, q_scale=30.0, seed=3,
               tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_never_crosses_sequences(causal):
    # Changing one sequence's K/V leaves every other sequence's output bit-identical.
    lens = [40, 70, 20]
    q, k, v = _qkv(sum(lens), 4, 2, 32, torch.float16, seed=4)
    cu = _cu_seqlens(lens)
    before = varlen_attention(q, k, v, cu, max(lens), causal)
    k2, v2 = k.clone(), v.clone()
    k2[40:110] = -k2[40:110]
    v2[40:110] = v2[40:110] * 3
    after = varlen_attention(q, k2, v2, cu, max(lens), causal)
    assert torch.equal(before[:40], after[:40]) and torch.equal(before[110:], after[110:])
    assert not torch.equal(before[40:110], after[40:110])


def test_varlen_attention_causal_first_token_is_its_value():
    # Causal query 0 of each sequence sees only key 0: its output is v[0] of its kv head.
    lens = [3, 66]
    q, k, v = _qkv(sum(lens), 4, 2, 64, torch.float32, seed=5)
    out = varlen_attention(q, k, v, _cu_seqlens(lens), max(lens), causal=True)
    for s in (0, 3):
        torch.testing.assert_close(out[s], v[s].repeat_interleave(2, dim=0), atol=1e-6, rtol=0)


def test_varlen_attention_no_tokens():
    q, k, v = _qkv(0, 4, 2, 64, torch.float32)
    assert varlen_attention(q, k, v, _cu_seqlens([]), 0, causal=True).shape == (0, 4, 64)


def test_varlen_attention_rejects_bad_inputs():
    q, k, v = _qkv(8, 4, 2, 64, torch.float32)
    cu = _cu_seqlens([8])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        varlen_attention(q[:, :3], k, v, cu, 8, causal=False)
    with pytest.raises(ValueError, match="k .* and v"):
        varlen_attention(q, k, v[:, :1], cu, 8, causal=False)
    with pytest.raises(ValueError, match="share a dtype"):
        varlen_attention(q, k.half(), v, cu, 8, causal=False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, cu.float(), 8, causal=False)
    big = torch.zeros(8, 2, 264, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 264 is not supported"):
        varlen_attention(big, big, big, cu, 8, causal=False)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        varlen_attention(torch.zeros(8, 64, 4, device=DEVICE).transpose(1, 2), k, v, cu, 8,
                         causal=False)
    with pytest.raises(ValueError, match="scale"):
        varlen_attention(q, k, v, cu, 8, causal=False, scale=-1.0)


# ----------------------------------------------------------------------------- sm_90 compile

_STRIDES = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
            "stride_ot", "stride_oh")


def _spec(dtype: str, head_dim: int, causal: bool, group: int) -> tuple:
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    config = _launch_config(head_dim, torch_dtype)
    sig = {n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    sig.update(cu_seqlens_ptr="*i32", qk_scale="fp32", **{n: "i32" for n in _STRIDES})
    consts = dict(GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal, BLOCK_M=config["BLOCK_M"],
                  BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"],
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    sig.update({n: "constexpr" for n in consts})
    return ("glmrt.kernels.attention", "_varlen_attention_kernel", sig, consts)


def test_attention_kernel_compiles_for_sm90():
    specs = [_spec(dtype, head_dim, causal, group)
             for dtype in ("fp16", "bf16")
             for head_dim, group in ((64, 1), (128, 2))
             for causal in (False, True)]
    specs += [_spec("bf16", 16, True, 2), _spec("fp16", 32, False, 8), _spec("fp32", 64, True, 2)]
    # Head dims that are not 64 or 128 (padded to a power of two), each once, dtypes and masks alternating:
    # every combination of the two is compiled above.
    specs += [_spec(("fp16", "bf16")[i % 2], head_dim, i % 3 == 0, 2)
              for i, head_dim in enumerate((8, 24, 40, 80, 96, 160, 256))]
    specs += [_spec("fp32", 256, True, 2), _spec("fp32", 40, False, 1)]
    # bf16 with group 2 at the head dims and masks of _RESOURCE_CASES is compiled for sm_90 by
    # test_attention_kernel_hopper_resources, as a launch specializes it: not compiled twice.
    compile_for_hopper([(module, name, sig, consts) for module, name, sig, consts in specs
                        if not (sig["q_ptr"] == "*bf16" and consts["GROUP"] == 2
                                and (consts["HEAD_DIM"], consts["CAUSAL"]) in _RESOURCE_CASES)])


_RESOURCE_CASES = [(64, False), (64, True), (128, False), (128, True),
                   (24, True), (80, True), (160, False), (256, False), (256, True)]


def test_attention_kernel_hopper_resources():
    # What the speed rests on, which the interpreter cannot show: wgmma for both dots, K/V tiles
    # copied asynchronously ahead of use, no register spills, and, up to BLOCK_D 128, two programs
    # per SM (registers and shared memory) so that one's softmax overlaps the other's MMAs. At
    # BLOCK_D 256 one program fills the register file, and must still fit the SM.
    specs = []
    for head_dim, causal in _RESOURCE_CASES:
        module, name, sig, consts = _spec("bf16", head_dim, causal, group=2)
        config = _launch_config(head_dim, torch.bfloat16)
        options = {k: v for k, v in config.items() if not k.startswith("BLOCK")}
        specs.append((module, name, sig, consts, options, ["wgmma.mma_async", "cp.async"]))
    for (head_dim, causal), r in zip(_RESOURCE_CASES, hopper_resources(specs)):
        r.update(head_dim=head_dim, causal=causal)
        programs = 2 if head_dim <= 128 else 1
        assert r["wgmma.mma_async"] > 0, f"no warpgroup MMA: {r}"
        assert r["cp.async"] > 0, f"K/V loads are not pipelined: {r}"
        assert r["spills"] == 0, f"registers spill: {r}"
        assert programs * r["regs"] * r["threads"] <= 65536, f"registers do not fit an SM: {r}"
        # 228 KiB of shared memory per SM, of which each resident program reserves 1 KiB
        assert programs * (r["shared"] + 1024) <= 228 * 1024, f"shared memory does not fit: {r}"


# ----------------------------------------------------------------------------- GPU, real sizes


def _sdpa_per_sequence(q, k, v, lens, causal, dtype):
    """SDPA on each sequence alone, with q, k, v cast to dtype; [T, Hq, D] in dtype."""
    group = q.shape[1] // k.shape[1]
    outs, s = [], 0
    for n in lens:
        # [1, H, n, D] each
        qs, ks, vs = (t[s: s + n].to(dtype).transpose(0, 1)[None] for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)[0].transpose(0, 1))
        s += n
    return torch.cat(outs)


def _check_against_sdpa(lens, num_q_heads, num_kv_heads, head_dim, causal, layout, seed):
    q, k, v = _qkv(sum(lens), num_q_heads, num_kv_heads, head_dim, torch.bfloat16, layout, seed)
    out = varlen_attention(q, k, v, _cu_seqlens(lens), max(lens), causal)
    sdpa = _sdpa_per_sequence(q, k, v, lens, causal, torch.bfloat16)
    exact = _sdpa_per_sequence(q, k, v, lens, causal, torch.float32)
    torch.testing.assert_close(out, sdpa, **_tol(torch.bfloat16))
    # Outputs average many values and are small, so also hold the kernel to SDPA's own bf16 error.
    err = (out.float() - exact).abs().max().item()
    sdpa_err = (sdpa.float() - exact).abs().max().item()
    assert err <= 2 * sdpa_err + 1e-3, f"max error {err} vs SDPA's {sdpa_err}"


@pytest.mark.gpu
def test_vision_attention_bf16_real_sizes():
    # A full page: 24,576 patches from images of uneven sizes, 16 heads, D 64, non-causal.
    _check_against_sdpa([12288, 4096, 5000, 3000, 192], 16, 16, 64, False, "vision", seed=6)


@pytest.mark.gpu
def test_text_prefill_bf16_real_sizes():
    # Several prompts prefilled together: causal, 16 q / 8 kv heads, D 128.
    _check_against_sdpa([6144, 1000, 4097, 2500], 16, 8, 128, True, "packed", seed=7)
