"""glmrt.kernels.rope: kernels vs their plain-torch references vs transformers' GlmOcr code."""
import pytest
import torch
from transformers import GlmImageTextConfig, GlmOcrTextConfig, GlmOcrVisionConfig
from transformers.models.glm_image.modeling_glm_image import GlmImageTextRotaryEmbedding
from transformers.models.glm_image.modeling_glm_image import (
    apply_rotary_pos_emb as glm_image_apply_rotary_pos_emb,
)
from transformers.models.glm_ocr.modeling_glm_ocr import (
    GlmOcrRMSNorm,
    GlmOcrTextRotaryEmbedding,
    GlmOcrVisionRotaryEmbedding,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
)

from glmrt.kernels.rope import (
    _tile,
    mrope_ref,
    mrope_write_kv_,
    mrope_write_kv_ref,
    vision_qk_norm_rope_,
    vision_qk_norm_rope_ref,
)
from glmrt.model.ops import TorchOps, TritonOps
from glmrt_testing.hopper import compile_for_hopper

THETA = 10000.0
EPS = 1e-5
MAX_POS = 10000


def _bits(x: torch.Tensor) -> torch.Tensor:
    """x's raw bits as integers: equal iff bit-identical, NaNs (poison) included."""
    return x.view({torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}[x.dtype])


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: within 1e-5. fp16/bf16: the kernel follows the reference's rounding, so almost every
    element is bit-identical; the rest differ where an fp32 ulp (sum order, rsqrt, cos) tipped one
    rounding of an intermediate, i.e. by about one ulp of the head's largest value."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        return
    ulp = 2.0 ** (-10 if out.dtype == torch.float16 else -7)
    diff = (out.float() - ref.float()).abs()
    bound = 4 * ulp * ref.float().abs().amax(-1, keepdim=True)
    assert (diff <= bound).all(), f"max |out - ref| {diff.max().item()} exceeds an intermediate's ulp"
    exact = (out == ref).float().mean().item()
    assert exact > 0.99, f"only {exact:.4f} of elements are bit-identical to the reference"


def _packed_qkv(tokens: int, heads: tuple[int, int, int], head_dim: int, dtype: torch.dtype,
                device: str = "cpu"):
    """A packed projection output [T, (Hq+Hk+Hv)*D] and q, k strided views into it."""
    hq, hk, hv = heads
    qkv = torch.randn(tokens, (hq + hk + hv) * head_dim, dtype=torch.float32, device=device).to(dtype)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim: (hq + hk) * head_dim].view(tokens, hk, head_dim)
    return qkv, q, k


def _vision_positions(S: int, device: str = "cpu", dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """[S, 2] (row, col), a column-major strided view with large values."""
    return torch.randint(0, MAX_POS, (2, S), device=device, dtype=dtype).t()


def _text_positions(T: int, device: str = "cpu", dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """[3, T] (t, h, w), every other column of a wider tensor, with large values."""
    return torch.randint(0, MAX_POS, (3, 2 * T), device=device, dtype=dtype)[:, ::2]


def _run_vision(S: int, H: int, D: int, dtype: torch.dtype, device: str = "cpu",
                pos_dtype: torch.dtype = torch.int64) -> None:
    qkv, q, k = _packed_qkv(S, (H, H, H), D, dtype, device)
    v_before = qkv[:, 2 * H * D:].clone()
    q_weight = (1 + 0.5 * torch.randn(D, device=device)).to(dtype)
    k_weight = (1 + 0.5 * torch.randn(D, device=device)).to(dtype)
    positions = _vision_positions(S, device, pos_dtype)
    q_ref, k_ref = vision_qk_norm_rope_ref(q, k, q_weight, k_weight, positions, THETA, EPS)
    vision_qk_norm_rope_(q, k, q_weight, k_weight, positions, THETA, EPS)
    _assert_matches(q, q_ref)
    _assert_matches(k, k_ref)
    assert torch.equal(qkv[:, 2 * H * D:], v_before), "v was written"


# ---- kernels vs references (Triton interpreter on CPU, compiled on a GPU) --------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S,H,D", [(1, 16, 64), (37, 3, 64), (130, 5, 32), (9, 2, 16)])
def test_vision_qk_norm_rope_matches_ref(S, H, D, dtype):
    torch.manual_seed(S * 100 + H)
    _run_vision(S, H, D, dtype, pos_dtype=torch.int32 if S % 2 else torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S,H,D", [(3, 2, 4), (5, 3, 24), (4, 2, 40), (6, 3, 80), (2, 16, 256)])
def test_vision_qk_norm_rope_any_head_dim(S, H, D, dtype):
    # D a multiple of 4 but not a power of two: padded lanes of each half must stay inert.
    torch.manual_seed(D)
    _run_vision(S, H, D, dtype)


def test_vision_qk_norm_rope_contiguous_inputs():
    torch.manual_seed(1)
    S, H, D = 11, 4, 64
    q, k = torch.randn(S, H, D), torch.randn(S, H, D)
    q_weight, k_weight = torch.randn(D), torch.randn(D)
    positions = torch.randint(0, MAX_POS, (S, 2), dtype=torch.int32)
    q_ref, k_ref = vision_qk_norm_rope_ref(q, k, q_weight, k_weight, positions, THETA, EPS)
    vision_qk_norm_rope_(q, k, q_weight, k_weight, positions, THETA, EPS)
    _assert_matches(q, q_ref)
    _assert_matches(k, k_ref)


# (T, Hq, Hk, D, rotary_dim, mrope_section): partial and full rotations, sizes that are not powers
# of two, GQA and odd token counts (several programs, a ragged last one).
ROTARY_CASES = [
    (7, 4, 2, 64, 32, [4, 6, 6]),         # half the head rotates
    (5, 3, 1, 48, 24, [2, 5, 5]),         # rotary/2 = 12 and D = 48 padded, odd sections
    (33, 5, 3, 128, 64, [8, 12, 12]),     # GLM-Image's split, odd head counts
    (3, 32, 2, 128, 64, [8, 12, 12]),     # GLM-Image's heads
    (6, 3, 1, 80, 32, [4, 6, 6]),         # 48 pass-through dims, padded to 64
    (9, 4, 2, 40, 40, [6, 7, 7]),         # full rotation, D not a power of two
    (1, 2, 2, 128, 128, [16, 24, 24]),    # full rotation, a decode row, Hq == Hk
    (5, 3, 2, 256, 128, [16, 24, 24]),    # the widest head
    (4, 2, 1, 64, 2, [1, 0, 0]),          # a single frequency
]


def test_mrope_rotary_dim_none_is_the_whole_head():
    torch.manual_seed(5)
    q, k = torch.randn(6, 3, 48), torch.randn(6, 1, 48)
    positions = _text_positions(6)
    for interleaved in (False, True):
        whole = mrope_ref(q, k, positions, [4, 10, 10], THETA, None, interleaved)
        explicit = mrope_ref(q, k, positions, [4, 10, 10], THETA, 48, interleaved)
        assert all(torch.equal(a, b) for a, b in zip(whole, explicit))
    # the layouts differ: NeoX is the interleaved rotation with the dims permuted
    neox = mrope_ref(q, k, positions, [4, 10, 10], THETA, interleaved=False)[0]
    perm = torch.arange(48).view(2, 24).t().flatten()  # pair (2j, 2j+1) <- dims (j, 24 + j)
    pairs = mrope_ref(q[..., perm], k[..., perm], positions, [4, 10, 10], THETA)[0]
    assert torch.equal(neox[..., perm], pairs)


def test_tile_keeps_glm_shapes_and_grows_warps_for_wide_tokens():
    # GLM-OCR's shapes keep 4 warps; a token whose heads alone exceed the tile gets more warps.
    assert _tile(1000, 16, 128) == (2, 4)
    assert _tile(3, 16, 64) == (4, 4)
    assert _tile(1000, 32, 256) == (1, 8)
    assert _tile(1000, 128, 256) == (1, 16)


def test_errors_name_the_offending_tensor():
    q, k = torch.randn(4, 2, 64), torch.randn(4, 2, 64)
    w = torch.ones(64)

    def mrope_write_kv(q, k, sections):  # with a valid cache write: the errors are the rotation's
        cache = torch.zeros(1, 16, *k.shape[1:])
        mrope_write_kv_(q, k, k, torch.zeros(3, 4, dtype=torch.int64), sections, THETA, cache,
                        cache.clone(), torch.zeros(4, dtype=torch.int64))

    with pytest.raises(ValueError, match="positions"):
        vision_qk_norm_rope_(q, k, w, w, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="q_weight"):
        vision_qk_norm_rope_(q, k, torch.ones(32), w, torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_write_kv(q, k, [8, 12, 8])
    with pytest.raises(ValueError, match="contiguous in head_dim"):
        mrope_write_kv(q.transpose(1, 2), k, [8, 12, 12])
    odd = torch.randn(4, 2, 7)
    with pytest.raises(ValueError, match="head_dim 7 is not supported.*multiple of 2"):
        mrope_write_kv(odd, odd, [1, 1, 1])
    six = torch.randn(4, 2, 6)
    with pytest.raises(ValueError, match="head_dim 6 is not supported.*multiple of 4"):
        vision_qk_norm_rope_(six, six, torch.ones(6), torch.ones(6),
                             torch.zeros(4, 2, dtype=torch.int64))
    big = torch.randn(4, 2, 260)
    with pytest.raises(ValueError, match="head_dim 260 is not supported"):
        mrope_write_kv(big, big, [130, 0, 0])


@pytest.mark.parametrize("rotary_dim,sections,message", [
    (31, [4, 6, 6], "rotary_dim must be an even number from 2 to head_dim = 64"),
    (66, [11, 11, 11], "rotary_dim must be an even number from 2 to head_dim = 64"),
    (0, [0, 0, 0], "rotary_dim must be an even number"),
    (-32, [4, 6, 6], "rotary_dim must be an even number"),
    (32.0, [4, 6, 6], "rotary_dim must be an even number"),
    (32, [8, 12, 12], r"mrope_section must be 3 sizes summing to rotary_dim/2 = 16 "
                      r"\(rotary_dim 32, head_dim 64\), got \[8, 12, 12\]"),
    (32, [4, 6, 4], "mrope_section must be 3 sizes summing to rotary_dim/2 = 16"),
    (32, [4, 12], "mrope_section must be 3 sizes"),
    (None, [4, 6, 6], "mrope_section must be 3 sizes summing to rotary_dim/2 = 32"),
])
def test_bad_rotary_dim_or_sections_raise(rotary_dim, sections, message):
    _, q, k, v, k_cache, v_cache, slots = _fused_case(4, 4, 2, 64, torch.float32)
    positions = _text_positions(4)
    for interleaved in (False, True):
        calls = [
            lambda: mrope_ref(q, k, positions, sections, THETA, rotary_dim, interleaved),
            lambda: mrope_write_kv_(q, k, v, positions, sections, THETA, k_cache, v_cache, slots,
                                    rotary_dim, interleaved),
            lambda: mrope_write_kv_ref(q, k, v, positions, sections, THETA, k_cache, v_cache, slots,
                                       rotary_dim, interleaved),
        ]
        for call in calls:
            with pytest.raises(ValueError, match=message):
                call()
    assert (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()


def test_interleaved_must_be_a_bool():
    _, q, k, v, k_cache, v_cache, slots = _fused_case(4, 2, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="interleaved must be a bool, got 'neox'"):
        mrope_write_kv_(q, k, v, _text_positions(4), [4, 6, 6], THETA, k_cache, v_cache, slots,
                        32, "neox")


# ---- M-RoPE fused with the paged KV-cache write -----------------------------------------------------

SENTINEL = -1234.5


def _v_view(qkv: torch.Tensor, HQ: int, HK: int, D: int) -> torch.Tensor:
    return qkv[:, (HQ + HK) * D:].view(qkv.shape[0], HK, D)


def _fused_case(T: int, HQ: int, HK: int, D: int, dtype: torch.dtype, device: str = "cpu",
                block_size: int = 16, slot_dtype: torch.dtype = torch.int64,
                fill: float = SENTINEL):
    """Packed q|k|v views, caches filled with `fill`, and a slot mapping with a few -1 rows."""
    qkv, q, k = _packed_qkv(T, (HQ, HK, HK), D, dtype, device)
    v = _v_view(qkv, HQ, HK, D)
    num_blocks = T // block_size + 2
    cache_shape = (num_blocks, block_size, HK, D)
    k_cache = torch.full(cache_shape, fill, dtype=dtype, device=device)
    v_cache = torch.full(cache_shape, fill, dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size)[:T]
    slots[1::4] = -1  # padding rows of a graph batch
    return qkv, q, k, v, k_cache, v_cache, slots.to(slot_dtype).to(device)


def _run_mrope_write_kv(T: int, HQ: int, HK: int, D: int, sections: list[int],
                        dtype: torch.dtype, device: str = "cpu",
                        pos_dtype: torch.dtype = torch.int64, slot_dtype: torch.dtype = torch.int64,
                        rotary_dim: int | None = None, interleaved: bool = True,
                        fill: float = SENTINEL, block_size: int = 16) -> None:
    qkv, q, k, v, k_cache, v_cache, slots = _fused_case(T, HQ, HK, D, dtype, device, block_size,
                                                        slot_dtype, fill)
    positions = _text_positions(T, device, pos_dtype)
    rope = (rotary_dim, interleaved)
    before = qkv.clone()
    q_ref, k_ref, k_cache_ref, v_cache_ref = mrope_write_kv_ref(q, k, v, positions, sections, THETA,
                                                                k_cache, v_cache, slots, *rope)
    assert mrope_write_kv_(q, k, v, positions, sections, THETA, k_cache, v_cache, slots,
                           *rope) is None
    _assert_matches(q, q_ref)
    _assert_matches(k, k_ref)
    # v is only read; the pass-through dims of every q and k head keep their bits
    assert _bits(v).equal(_bits(_v_view(before, HQ, HK, D))), "v was written"
    R = D if rotary_dim is None else rotary_dim
    heads = qkv.view(T, -1, D)[:, : HQ + HK]
    assert _bits(heads[..., R:]).equal(_bits(before.view(T, -1, D)[:, : HQ + HK, R:]))
    # slot -1 rows and untouched slots keep the fill; the others hold the reference's rows
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=device)  # [blocks, slots]
    written.view(-1)[slots[slots >= 0].long()] = True
    untouched = _bits(torch.full_like(k_cache[~written], fill))
    for cache in (k_cache, k_cache_ref, v_cache):
        assert _bits(cache[~written]).equal(untouched), "a slot -1 row or a free slot was written"
    _assert_matches(k_cache[written], k_cache_ref[written])
    assert _bits(v_cache).equal(_bits(v_cache_ref))
    # the cache holds the whole rotated k row, bit for bit: the rotated dims as left in k, the
    # pass-through dims as they came in
    stored = slots >= 0
    assert _bits(k_cache.view(-1, HK, D)[slots[stored].long()]).equal(_bits(k[stored]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,HQ,HK", [
    (1, 16, 8),     # a decode row, GLM-OCR's heads
    (7, 16, 8),     # GQA, odd T
    (33, 5, 3),     # odd head counts, several programs, ragged last program
    (130, 2, 1),    # a prefill, one kv head
])
def test_mrope_write_kv_matches_ref(T, HQ, HK, dtype):
    torch.manual_seed(T * 100 + HQ)
    # positions int32 for odd T, slots int32 unless T % 3 == 0: the pairings other than int64 for
    # both, which is the default of the other tests
    _run_mrope_write_kv(T, HQ, HK, 128, [16, 24, 24], dtype,
                        pos_dtype=torch.int32 if T % 2 else torch.int64,
                        slot_dtype=torch.int32 if T % 3 else torch.int64)


@pytest.mark.parametrize("D,sections", [(32, [4, 6, 6]), (64, [0, 16, 16]), (16, [8, 0, 0])])
def test_mrope_write_kv_other_sections(D, sections):
    torch.manual_seed(D)
    _run_mrope_write_kv(5, 3, 2, D, sections, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D,sections", [(2, [1, 0, 0]), (8, [1, 1, 2]), (24, [4, 4, 4]),
                                        (40, [6, 7, 7]), (80, [8, 16, 16]), (96, [16, 16, 16]),
                                        (256, [32, 48, 48])])
def test_mrope_write_kv_any_head_dim(D, sections, dtype):
    # padded head-dim lanes must neither be read past a row nor written into a neighbour slot
    torch.manual_seed(D)
    _run_mrope_write_kv(13, 5, 3, D, sections, dtype)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mrope_write_kv_block_sizes(dtype, block_size, slot_dtype):
    # slots over shuffled blocks of either size, some -1 (padding rows of a graph batch)
    torch.manual_seed(block_size)
    _run_mrope_write_kv(21, 4, 2, 32, [4, 6, 6], dtype, slot_dtype=slot_dtype,
                        block_size=block_size)


def test_mrope_write_kv_no_tokens_and_bad_arguments():
    _, q, k, v, k_cache, v_cache, slots = _fused_case(4, 4, 2, 32, torch.float32)
    positions = _text_positions(4)
    mrope_write_kv_(q[:0], k[:0], v[:0], positions[:, :0], [4, 6, 6], THETA, k_cache, v_cache,
                    slots[:0])
    assert (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()
    # all slots -1 (a graph batch of padding rows): q and k rotate, the caches stay as they were
    q_ref, k_ref, _, _ = mrope_write_kv_ref(q, k, v, positions, [4, 6, 6], THETA, k_cache, v_cache,
                                            slots)
    mrope_write_kv_(q, k, v, positions, [4, 6, 6], THETA, k_cache, v_cache,
                    torch.full_like(slots, -1))
    _assert_matches(q, q_ref)
    _assert_matches(k, k_ref)
    assert (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()
    with pytest.raises(ValueError, match="slot_mapping"):
        mrope_write_kv_(q, k, v, positions, [4, 6, 6], THETA, k_cache, v_cache, slots[:3])
    with pytest.raises(ValueError, match=r"k must be \[T, 2, 32\]"):
        mrope_write_kv_(q, q, v, positions, [4, 6, 6], THETA, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="v must be"):
        mrope_write_kv_(q, k, v[:, :1], positions, [4, 6, 6], THETA, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_write_kv_(q, k, v, positions, [4, 6, 4], THETA, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping must be a contiguous"):
        mrope_write_kv_(q, k, v, positions, [4, 6, 6], THETA, k_cache, v_cache,
                        torch.zeros(8, dtype=torch.int64)[::2])
    with pytest.raises(ValueError, match="slot_mapping must be a contiguous int32 or int64"):
        mrope_write_kv_(q, k, v, positions, [4, 6, 6], THETA, k_cache, v_cache, torch.zeros(4))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,HQ,HK,D,rotary_dim,sections", ROTARY_CASES)
def test_mrope_write_kv_rotary_dim_matches_ref(T, HQ, HK, D, rotary_dim, sections, dtype,
                                               interleaved):
    # NeoX halves (GLM-Image) and, for the same sizes, GPT-J pairs over a partial rotary dim.
    # NaN-poisoned caches: a slot -1 row, a free slot or a pass-through dim written wrongly shows.
    torch.manual_seed(T * 1000 + D + rotary_dim)
    int_dtype = torch.int32 if T % 2 else torch.int64
    _run_mrope_write_kv(T, HQ, HK, D, sections, dtype, pos_dtype=int_dtype, slot_dtype=int_dtype,
                        rotary_dim=rotary_dim, interleaved=interleaved, fill=float("nan"))


def test_ops_pass_rotary_dim_and_layout_through():
    # TorchOps (the reference) and TritonOps (the fused kernel) with GLM-Image's rotation.
    torch.manual_seed(6)
    T, HQ, HK, D, sections = 5, 4, 2, 64, [4, 6, 6]
    _, q, k, v, k_cache, v_cache, slots = _fused_case(T, HQ, HK, D, torch.float32)
    positions = _text_positions(T)
    expected = mrope_write_kv_ref(q, k, v, positions, sections, THETA, k_cache, v_cache, slots,
                                  32, False)
    for ops in (TorchOps(), TritonOps()):
        kc, vc = k_cache.clone(), v_cache.clone()
        q_out, k_out = ops.mrope_write_kv(q.clone(), k.clone(), v, positions, sections, THETA,
                                          kc, vc, slots, rotary_dim=32, interleaved=False)
        for ours, ref in zip((q_out, k_out, kc, vc), expected):
            _assert_matches(ours, ref)


# ---- references and kernels vs transformers (fp32) --------------------------------------------------


def test_vision_matches_transformers():
    torch.manual_seed(2)
    S, H, D = 45, 4, 64
    config = GlmOcrVisionConfig(hidden_size=H * D, num_heads=H, depth=1, rms_norm_eps=EPS)
    qkv, q, k = _packed_qkv(S, (H, H, H), D, torch.float32)
    q_norm, k_norm = GlmOcrRMSNorm(D, eps=EPS), GlmOcrRMSNorm(D, eps=EPS)
    with torch.no_grad():
        q_norm.weight.normal_(1.0, 0.5)
        k_norm.weight.normal_(1.0, 0.5)
    positions = torch.randint(0, MAX_POS, (S, 2))  # transformers' get_vision_position_ids layout
    with torch.no_grad():
        cos, sin = GlmOcrVisionRotaryEmbedding(config)(q, positions)
        q_hf, k_hf = apply_rotary_pos_emb_vision(q_norm(q), k_norm(k), cos, sin)
        q_ref, k_ref = vision_qk_norm_rope_ref(q, k, q_norm.weight, k_norm.weight, positions,
                                               config.rope_parameters["rope_theta"], EPS)
        vision_qk_norm_rope_(q, k, q_norm.weight, k_norm.weight, positions,
                             config.rope_parameters["rope_theta"], EPS)
    for ours in (q_ref, q):
        torch.testing.assert_close(ours, q_hf, atol=1e-5, rtol=1e-5)
    for ours in (k_ref, k):
        torch.testing.assert_close(ours, k_hf, atol=1e-5, rtol=1e-5)


def test_mrope_matches_transformers():
    torch.manual_seed(3)
    T, HQ, HK, D = 29, 4, 2, 128
    config = GlmOcrTextConfig(
        hidden_size=96, num_attention_heads=HQ, num_key_value_heads=HK, head_dim=D,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "mrope_section": [16, 24, 24]},
    )
    _, q, k, v, k_cache, v_cache, slots = _fused_case(T, HQ, HK, D, torch.float32)
    positions = torch.randint(0, MAX_POS, (3, T))
    with torch.no_grad():
        cos, sin = GlmOcrTextRotaryEmbedding(config)(q, positions[:, None, :])  # [1, T, D]
        # transformers' attention layout is [B, H, T, D]
        q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_hf, k_hf = q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)
    section = config.rope_parameters["mrope_section"]
    q_ref, k_ref = mrope_ref(q, k, positions, section, THETA)
    mrope_write_kv_(q, k, v, positions, section, THETA, k_cache, v_cache, slots)
    for ours in (q_ref, q):
        torch.testing.assert_close(ours, q_hf, atol=1e-5, rtol=1e-5)
    for ours in (k_ref, k):
        torch.testing.assert_close(ours, k_hf, atol=1e-5, rtol=1e-5)
    stored = slots >= 0
    torch.testing.assert_close(k_cache.view(-1, HK, D)[slots[stored]], k_hf[stored],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mrope_ref_is_bit_exact_with_transformers_low_precision(dtype):
    """The reference (torch backend) rounds like transformers' bf16/fp16 text rope, bit for bit."""
    torch.manual_seed(4)
    T, HQ, HK, D = 37, 4, 2, 128
    config = GlmOcrTextConfig(
        hidden_size=96, num_attention_heads=HQ, num_key_value_heads=HK, head_dim=D,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "mrope_section": [16, 24, 24]},
    )
    q, k = torch.randn(T, HQ, D).to(dtype), torch.randn(T, HK, D).to(dtype)
    positions = torch.randint(0, MAX_POS, (3, T))
    with torch.no_grad():
        cos, sin = GlmOcrTextRotaryEmbedding(config)(q, positions[:, None, :])
        q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ref, k_ref = mrope_ref(q, k, positions, [16, 24, 24], THETA)
    assert torch.equal(q_ref, q_hf[0].transpose(0, 1))
    assert torch.equal(k_ref, k_hf[0].transpose(0, 1))


def _glm_image_rotary(B: int, T: int, H: int, D: int, factor: float, sections: list[int]):
    """GLM-Image's text rotary embedding for a tiny config, and [3, B, T] positions."""
    config = GlmImageTextConfig(
        hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "mrope_section": sections,
                         "partial_rotary_factor": factor},
    )
    return GlmImageTextRotaryEmbedding(config), torch.randint(0, MAX_POS, (3, B, T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,factor,sections", [
    (64, 0.5, [4, 6, 6]),
    (128, 0.5, [8, 12, 12]),   # GLM-Image
    (48, 0.5, [2, 5, 5]),
    (40, 1.0, [6, 7, 7]),      # full rotation
])
def test_mrope_ref_neox_is_bit_exact_with_transformers_glm_image(D, factor, sections, dtype):
    """mrope_ref(interleaved=False) is GlmImageTextRotaryEmbedding + apply_rotary_pos_emb, bit
    for bit, in transformers' attention layout [B, H, T, D] with batched [3, B, T] positions."""
    torch.manual_seed(D + len(str(dtype)))
    B, T, HQ, HK = 2, 19, 4, 2
    rotary, positions = _glm_image_rotary(B, T, HQ, D, factor, sections)
    rotary_dim = int(D * factor)
    assert rotary.inv_freq.shape == (rotary_dim // 2,)
    q = torch.randn(B, HQ, T, D).to(dtype)
    k = torch.randn(B, HK, T, D).to(dtype)
    with torch.no_grad():
        cos, sin = rotary(q, positions)  # [B, T, rotary_dim], in q's dtype
        q_hf, k_hf = glm_image_apply_rotary_pos_emb(q, k, cos, sin)

    def tokens(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [B * T, H, D]
        return x.transpose(1, 2).reshape(B * T, x.shape[1], D)

    q_ref, k_ref = mrope_ref(tokens(q), tokens(k), positions.reshape(3, B * T), sections, THETA,
                             rotary_dim=rotary_dim, interleaved=False)
    assert torch.equal(q_ref, tokens(q_hf))
    assert torch.equal(k_ref, tokens(k_hf))
    assert torch.equal(q_ref[..., rotary_dim:], tokens(q)[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mrope_ref_partial_interleaved_is_bit_exact_with_transformers_glm_ocr(dtype):
    """GlmOcr's interleaved text rope honours partial_rotary_factor too; so does mrope_ref."""
    torch.manual_seed(8)
    T, HQ, HK, D = 23, 4, 2, 64
    config = GlmOcrTextConfig(
        hidden_size=96, num_attention_heads=HQ, num_key_value_heads=HK, head_dim=D,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "mrope_section": [4, 6, 6],
                         "partial_rotary_factor": 0.5},
    )
    q, k = torch.randn(T, HQ, D).to(dtype), torch.randn(T, HK, D).to(dtype)
    positions = torch.randint(0, MAX_POS, (3, T))
    with torch.no_grad():
        cos, sin = GlmOcrTextRotaryEmbedding(config)(q, positions[:, None, :])  # [1, T, 32]
        q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          cos, sin)
    q_ref, k_ref = mrope_ref(q, k, positions, [4, 6, 6], THETA, rotary_dim=32)
    assert torch.equal(q_ref, q_hf[0].transpose(0, 1))
    assert torch.equal(k_ref, k_hf[0].transpose(0, 1))


def test_mrope_neox_kernel_matches_transformers_glm_image():
    # the kernel itself against transformers (fp32), on strided views of a packed projection
    torch.manual_seed(9)
    T, HQ, HK, D, sections = 21, 4, 2, 128, [8, 12, 12]
    rotary, positions = _glm_image_rotary(1, T, HQ, D, 0.5, sections)
    _, q, k, v, k_cache, v_cache, slots = _fused_case(T, HQ, HK, D, torch.float32)
    with torch.no_grad():
        cos, sin = rotary(q, positions)
        q_hf, k_hf = glm_image_apply_rotary_pos_emb(q.transpose(0, 1)[None],
                                                    k.transpose(0, 1)[None], cos, sin)
    q_hf, k_hf = q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)
    mrope_write_kv_(q, k, v, positions[:, 0], sections, THETA, k_cache, v_cache, slots,
                    rotary_dim=64, interleaved=False)
    stored = slots >= 0
    torch.testing.assert_close(q, q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache.view(-1, HK, D)[slots[stored]], k_hf[stored],
                               atol=1e-5, rtol=1e-5)


# ---- sm_90 compile ----------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _vision_spec(dtype: str, pos: str, D: int = 64, H: int = 16,
                 block_s: int = 4) -> tuple[str, str, dict, dict]:
    signature = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "qw_ptr", "kw_ptr")}
    signature |= {"pos_ptr": f"*{pos}", "inv_freq_ptr": "*fp32", "S": "i32", "H": "i32"}
    signature |= {s: "i32" for s in ("stride_qs", "stride_qh", "stride_ks", "stride_kh",
                                     "stride_ps", "stride_pc")}
    constexprs = {"HALF": D // 2, "BLOCK_S": block_s, "BLOCK_H": _pow2(H),
                  "BLOCK_HALF": _pow2(D // 2)}
    signature |= {"eps": "fp32"} | {name: "constexpr" for name in constexprs}
    return "glmrt.kernels.rope", "_vision_qk_norm_rope_kernel", signature, constexprs


def _mrope_constexprs(D: int, HQ: int, HK: int, block_t: int, rotary: int | None = None,
                      interleaved: bool = True) -> dict:
    half = (rotary or D) // 2
    # GLM-OCR splits its 64 frequencies [16, 24, 24], GLM-Image its 32 [8, 12, 12]
    sec_t = half // 4
    return {"HALF": half, "SEC_T": sec_t, "SEC_TH": sec_t + (half - sec_t) // 2,
            "INTERLEAVED": interleaved, "BLOCK_T": block_t, "BLOCK_HQ": _pow2(HQ),
            "BLOCK_HK": _pow2(HK), "BLOCK_HALF": _pow2(half)}


def _mrope_write_kv_spec(dtype: str, pos: str, slot: str, block_t: int, D: int = 128,
                         HQ: int = 16, HK: int = 8, rotary: int | None = None,
                         interleaved: bool = True, block_size: int = 16
                         ) -> tuple[str, str, dict, dict]:
    signature = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}",
                 "pos_ptr": f"*{pos}", "inv_freq_ptr": "*fp32", "k_cache_ptr": f"*{dtype}",
                 "v_cache_ptr": f"*{dtype}", "slot_mapping_ptr": f"*{slot}",
                 "T": "i32", "HQ": "i32", "HK": "i32"}
    signature |= {s: "i32" for s in ("stride_qt", "stride_qh", "stride_kt", "stride_kh",
                                     "stride_vt", "stride_vh", "stride_pr", "stride_pt",
                                     "stride_kc_block", "stride_kc_slot", "stride_kc_head",
                                     "stride_vc_block", "stride_vc_slot", "stride_vc_head")}
    rotary = rotary or D
    constexprs = _mrope_constexprs(D, HQ, HK, block_t, rotary, interleaved) | {
        "HEAD_DIM": D, "BLOCK_SIZE": block_size,
        "BLOCK_PASS": _pow2(D - rotary) if rotary < D else 1, "BLOCK_D": _pow2(D)}
    signature |= {name: "constexpr" for name in constexprs}
    return "glmrt.kernels.rope", "_mrope_write_kv_kernel", signature, constexprs


# GLM-Image's text attention: 32 q heads, 2 kv heads, head_dim 128, NeoX over the first 64 dims
GLM_IMAGE_ROPE = dict(D=128, HQ=32, HK=2, rotary=64, interleaved=False)


def test_compiles_for_sm90():
    specs = []
    for dtype in ("fp16", "bf16"):
        for pos in ("i32", "i64"):
            slot = "i64" if pos == "i32" else "i32"
            # GLM-OCR and GLM-Image: a decode row and a prefill tile (_tile gives 2 tokens)
            specs += [_vision_spec(dtype, pos)]
            specs += [_mrope_write_kv_spec(dtype, pos, slot, bt) for bt in (1, 2)]
            specs += [_mrope_write_kv_spec(dtype, pos, slot, bt, **GLM_IMAGE_ROPE)
                      for bt in (1, 2)]
        specs += [_mrope_write_kv_spec(dtype, "i64", "i64", 2, block_size=32)]
    # Other sizes, each once, fp16 and bf16 alternating: both are 16-bit, so a size compiles to the
    # same tiles, layouts and register and shared-memory footprint in either, and each dtype's own
    # conversions are compiled above, for every position and slot dtype.
    dtypes = ("fp16", "bf16")
    for i, D in enumerate((4, 24, 40, 80, 256)):
        specs += [_vision_spec(dtypes[i % 2], "i64", D, H=3, block_s=2)]
    for i, D in enumerate((2, 8, 24, 40, 80, 96, 160, 256)):  # with the head dims of test_paged's
        specs += [_mrope_write_kv_spec(dtypes[(i + bt) % 2], "i64", "i64", bt, D, HQ=5, HK=3)
                  for bt in (1, 2)]
    # partial and full NeoX, partial interleaved, sizes that are not powers of two
    for i, (D, rotary, interleaved) in enumerate(((48, 24, False), (80, 32, False), (40, 40, False),
                                                  (256, 128, False), (64, 2, False), (64, 32, True),
                                                  (48, 24, True))):
        specs += [_mrope_write_kv_spec(dtypes[i % 2], "i64", "i32", 2, D, 5, 3, rotary, interleaved)]
    compile_for_hopper(specs)


# ---- GPU, real sizes, bf16 ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("S", [24576, 4099])
def test_vision_qk_norm_rope_gpu_bf16(S, pos_dtype):
    torch.manual_seed(S)
    _run_vision(S, 16, 64, torch.bfloat16, device="cuda", pos_dtype=pos_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T", [1, 3, 5, 912, 6157])
def test_mrope_write_kv_gpu_bf16(T, pos_dtype):
    torch.manual_seed(T)
    _run_mrope_write_kv(T, 16, 8, 128, [16, 24, 24], torch.bfloat16, device="cuda",
                        pos_dtype=pos_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 3, 5, 912, 6157])
def test_mrope_write_kv_neox_partial_gpu_bf16(T):
    torch.manual_seed(T)
    _run_mrope_write_kv(T, 32, 2, 128, [8, 12, 12], torch.bfloat16, device="cuda",
                        pos_dtype=torch.int32 if T % 2 else torch.int64, rotary_dim=64,
                        interleaved=False, fill=float("nan"))


@pytest.mark.gpu
def test_mrope_write_kv_cuda_graph_replay():
    # Captured once, replayed with new positions and slots: nothing is read on the host.
    T, HQ, HK, D, sections = 8, 16, 8, 128, [16, 24, 24]
    qkv, q, k, v, k_cache, v_cache, slots = _fused_case(T, HQ, HK, D, torch.bfloat16, "cuda")
    positions = _text_positions(T, "cuda").contiguous()
    mrope_write_kv_(q, k, v, positions, sections, THETA, k_cache, v_cache, slots)  # compile, table
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mrope_write_kv_(q, k, v, positions, sections, THETA, k_cache, v_cache, slots)
    for _ in range(2):
        qkv.copy_(torch.randn(qkv.shape, device="cuda").to(qkv.dtype))
        positions.copy_(torch.randint(0, MAX_POS, positions.shape, device="cuda"))
        new_slots = torch.randperm(k_cache.shape[0] * k_cache.shape[1], device="cuda")[:T]
        new_slots[::3] = -1
        slots.copy_(new_slots)
        q_ref, k_ref, k_cache_ref, v_cache_ref = mrope_write_kv_ref(
            q, k, v, positions, sections, THETA, k_cache, v_cache, slots)
        graph.replay()
        _assert_matches(q, q_ref)
        _assert_matches(k, k_ref)
        _assert_matches(k_cache, k_cache_ref)
        assert torch.equal(v_cache, v_cache_ref)
