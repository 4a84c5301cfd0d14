"""GLM-Image's vision encoder, VQ tokenizer and image processor against transformers, bit for bit.

A tiny random GlmImageForConditionalGeneration (biased or bias-free qkv, a 2- and a 3-head
variant with head dims 16 and 20, exact and tanh GELU, a position table resampled to grids of
other shapes, a 64-entry codebook, a NeoX partial-rotary text decoder) is saved with
save_pretrained and read back with safetensors; glmrt's torch backend must give transformers'
features and codes exactly (torch.equal) in fp32 and bf16, for several images of different
non-square grids in one packed call. The image processor must give both transformers backends'
pixel values and grids exactly.
"""
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from glmrt import glm_image_processor as gip
from glmrt.config import GlmImageConfig
from glmrt.model.glm_image_vision import (GlmImageVisionTower, VqTokenizer, glm_image_vision_shapes, vq_shapes,
                                          vq_unused_names)
from glmrt.model.ops import make_ops
from glmrt_testing.tiny_checkpoint import _perturb_

# Table side image_size / patch_size = 8 (variant "a") or 6 ("b"): every grid below resamples it.
VISION = {
    "a": dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4, image_size=32,
              hidden_act="gelu", attention_bias=True),
    "b": dict(depth=2, hidden_size=60, num_heads=3, intermediate_size=72, patch_size=4, image_size=24,
              hidden_act="gelu_pytorch_tanh", attention_bias=False),
}
GRIDS = [(1, 6, 10), (1, 12, 5), (1, 3, 7)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The real checkpoint's processor settings (patch 16, single frames, no merge, 512²..2048² pixels).
HF_PROCESSOR_KWARGS = dict(size={"shortest_edge": 512 * 512, "longest_edge": 2048 * 2048}, patch_size=16,
                           temporal_patch_size=1, merge_size=1)
# A processor config for the tiny checkpoint (patch 4): sources come out a few patches wide.
TINY_PREPROCESSOR = {"image_processor_type": "GlmImageImageProcessor", "size": {"shortest_edge": 32 * 32,
                     "longest_edge": 64 * 64}, "patch_size": 4, "temporal_patch_size": 1, "merge_size": 1,
                     "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}


def tiny_config(vision: dict):
    from transformers import GlmImageConfig as HfConfig

    return HfConfig(
        text_config=dict(vocab_size=256, vision_vocab_size=128, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, pad_token_id=0, eos_token_id=101,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}),
        vision_config=dict(spatial_merge_size=1, layer_norm_eps=1e-6, **vision),
        vq_config=dict(embed_dim=24, num_embeddings=64, latent_channels=vision["hidden_size"]),
        image_token_id=200, image_start_token_id=100, image_end_token_id=101,
    )


def _fit_codebook_(model) -> None:
    """Random weights leave the features far from a random codebook (one shared direction
    dominates and a few codes take everything); a trained codebook lies where the features are, so
    its 64 entries are drawn from the projected features of random pixels (an 8x8 grid)."""
    visual, vq = model.model.visual, model.model.vqmodel
    patch_dim = visual.config.in_channels * visual.patch_size**2
    pixels = torch.randn(64, patch_dim, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        features = visual(pixels, grid_thw=torch.tensor([[1, 8, 8]])).last_hidden_state  # [64, W]
        z = torch.nn.functional.conv2d(features.T.reshape(1, -1, 8, 8), vq.quant_conv.weight, vq.quant_conv.bias)
        vq.quantize.embedding.weight.copy_(z.flatten(2)[0].T)  # [64, E]


@pytest.fixture(scope="module", params=sorted(VISION))
def checkpoint(request, tmp_path_factory):
    """(directory, transformers' fp32 model, glmrt's config, the saved tensors)."""
    from safetensors.torch import load_file
    from transformers import GlmImageForConditionalGeneration

    path = tmp_path_factory.mktemp(f"tiny-glm-image-{request.param}")
    torch.manual_seed(0)
    model = GlmImageForConditionalGeneration(tiny_config(VISION[request.param])).eval()
    _perturb_(model, seed=1)
    _fit_codebook_(model)
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(TINY_PREPROCESSOR))
    assert model.config.vision_config._attn_implementation == "sdpa"
    return path, model, GlmImageConfig.from_pretrained(path), load_file(path / "model.safetensors")


@pytest.fixture(scope="module", params=sorted(DTYPES))
def dtype(request):
    return DTYPES[request.param]


@pytest.fixture(scope="module")
def pair(checkpoint, dtype):
    """(transformers' model in dtype, glmrt's tower and VQ tokenizer on the same weights in dtype)."""
    _, model, config, weights = checkpoint
    hf = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    weights = {name: t.to(dtype) for name, t in weights.items()}
    return hf, GlmImageVisionTower(config.vision, weights, make_ops("torch")), VqTokenizer(config.vq, weights)


def random_pixels(config, grids, dtype=torch.float32, seed=0):
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, config.vision.patch_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def hf_codes(hf, pixel_values, grids):
    grid_thw = torch.tensor(grids)
    with torch.no_grad():
        return hf.model.get_image_tokens(hf.model.get_image_features(pixel_values, grid_thw).pooler_output)


def test_shapes_cover_the_checkpoint(checkpoint):
    _, _, config, weights = checkpoint
    expected = {**glm_image_vision_shapes(config.vision), **vq_shapes(config.vq)}
    on_disk = {n: tuple(t.shape) for n, t in weights.items() if n.startswith(("model.visual.", "model.vqmodel."))}
    assert set(on_disk) == set(expected) | vq_unused_names()
    assert {n: on_disk[n] for n in expected} == expected


def test_tower_matches_transformers(pair, checkpoint, dtype):
    hf, tower, _ = pair
    pixel_values = random_pixels(checkpoint[2], GRIDS, dtype)
    ours = tower(pixel_values, GRIDS)
    with torch.no_grad():
        theirs = hf.model.visual(pixel_values, grid_thw=torch.tensor(GRIDS)).last_hidden_state
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs), f"max abs diff {(ours.float() - theirs.float()).abs().max()}"


def test_codes_match_transformers(pair, checkpoint, dtype):
    hf, tower, vq = pair
    pixel_values = random_pixels(checkpoint[2], GRIDS, dtype, seed=1)
    ours = vq(tower(pixel_values, GRIDS), GRIDS)
    theirs = hf_codes(hf, pixel_values, GRIDS)
    assert ours.dtype == torch.long and ours.shape == (sum(h * w for _, h, w in GRIDS),)
    assert torch.equal(ours, theirs)
    assert len(ours.unique()) > 20  # the codebook is really searched


def test_one_image_at_a_time_gives_the_same_codes(pair, checkpoint):
    """Packing is invisible: each image's codes equal those of a call with only that image."""
    hf, tower, vq = pair
    pixel_values = random_pixels(checkpoint[2], GRIDS, seed=2)
    packed = vq(tower(pixel_values, GRIDS), GRIDS).split([h * w for _, h, w in GRIDS])
    for image, grid, codes in zip(pixel_values.split([h * w for _, h, w in GRIDS]), GRIDS, packed):
        assert torch.equal(vq(tower(image, [grid]), [grid]), codes)


def test_processed_images_give_transformers_codes(checkpoint, torchvision_available):
    """End to end: our processor -> tower -> VQ equals transformers' processor -> get_image_tokens."""
    from transformers import GlmImageImageProcessor as HfProcessor

    path, hf, config, weights = checkpoint
    images = [noise_image(50, 90, 0), noise_image(77, 41, 1, "RGBA"), noise_image(64, 64, 2, "L")]
    ours = gip.GlmImageImageProcessor.from_pretrained(path, vision=config.vision)(images)
    ref = HfProcessor.from_pretrained(path)(images, return_tensors="pt")
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    grids = [tuple(g) for g in ours["image_grid_thw"].tolist()]
    assert len(set(grids)) == 3 and all(h != w for _, h, w in grids[:2])
    tower, vq = GlmImageVisionTower(config.vision, weights, make_ops("torch")), VqTokenizer(config.vq, weights)
    codes = vq(tower(ours["pixel_values"], grids), grids)
    assert torch.equal(codes, hf_codes(hf, ref["pixel_values"], grids))


def test_bad_model_inputs(pair, checkpoint):
    _, tower, vq = pair
    config = checkpoint[2]
    pixel_values = random_pixels(config, GRIDS)
    with pytest.raises(ValueError, match="patches but image_grid_thw describes"):
        tower(pixel_values[:-1], GRIDS)
    with pytest.raises(ValueError, match=r"must be \[S, 48\]"):
        tower(pixel_values[:, :-1], GRIDS)
    with pytest.raises(ValueError, match=r"image_grid_thw\[0\] = \(2, 3, 5\): GLM-Image encodes single images"):
        tower(random_pixels(config, [(2, 3, 5)]), [(2, 3, 5)])
    with pytest.raises(ValueError, match="features has 59 patches"):
        vq(torch.zeros(59, config.vision.hidden_size), [(1, 6, 10)])
    with pytest.raises(ValueError, match="features must be"):
        vq(torch.zeros(60, 7), [(1, 6, 10)])


# ------------------------------------------------------------------------------ image processor
def noise_image(h, w, seed=0, mode="RGB"):
    """Noise over a gradient (every value, sharp edges for the resampling filter), in `mode`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = ((yy * 255) // max(h - 1, 1) + (xx * 255) // max(w - 1, 1)) // 2
    arr = np.where(rng.random((h, w, 1)) < 0.5, rng.integers(0, 256, (h, w, 3)), grad[..., None]).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode in ("RGBA", "LA"):
        img = img.convert(mode[:-1])
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        return img
    return img if mode == "RGB" else img.convert(mode)


@pytest.fixture(scope="module", params=gip.BACKENDS)
def processors(request, tmp_path_factory):
    """(transformers' processor of this backend, ours from the same preprocessor_config.json)."""
    import transformers

    if request.param == "torchvision":
        request.getfixturevalue("torchvision_available")
    path = tmp_path_factory.mktemp("glm-image-processor")
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "GlmImageImageProcessor", "resample": 3, "do_rescale": True,
        "rescale_factor": 0.00392156862745098, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        **HF_PROCESSOR_KWARGS}))
    hf_class = {"torchvision": transformers.GlmImageImageProcessor, "pil": transformers.GlmImageImageProcessorPil}
    return hf_class[request.param].from_pretrained(path), gip.GlmImageImageProcessor.from_pretrained(path, request.param)


def assert_matches(processors, images):
    hf, ours = processors
    ref = hf(images, return_tensors="pt")
    out = ours(images)
    assert out["pixel_values"].dtype == torch.float32 and out["image_grid_thw"].dtype == torch.int64
    assert torch.equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(out["pixel_values"], ref["pixel_values"])


@pytest.mark.parametrize("h,w", [
    (16, 16),  # the smallest source: upscaled
    (20, 33),
    (97, 131),  # odd sides
    (300, 400),
    (100, 400),  # aspect ratio exactly 4
    (401, 101),  # just under 4
    (1024, 1024),
    (1500, 1000),  # no scaling: just the halving
    (3000, 2200),  # the long side capped at sqrt(max_pixels)
])
def test_processor_matches_transformers_sizes(processors, h, w):
    assert_matches(processors, [noise_image(h, w, seed=h + w)])


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_processor_matches_transformers_modes(processors, mode):
    if mode == "I;16":
        image = Image.fromarray(np.random.default_rng(3).integers(0, 65536, (50, 77), dtype=np.uint16))
    else:
        image = noise_image(61, 83, seed=4, mode=mode)
    assert_matches(processors, [image])


def test_processor_matches_transformers_batch(processors):
    """Several images of different sizes in one call (transformers groups them by shape)."""
    images = [noise_image(300, 400, 5), noise_image(64, 200, 6), noise_image(300, 400, 7), noise_image(500, 130, 8)]
    assert_matches(processors, images)


def test_uint8_patches_normalize_to_the_same_values(processors):
    _, ours = processors
    images = [noise_image(300, 400, 10), noise_image(77, 41, 11, "RGBA")]
    pixels = ours(images, normalize=False)
    assert pixels["pixel_values"].dtype == torch.uint8
    expected = ours(images)
    assert torch.equal(pixels["image_grid_thw"], expected["image_grid_thw"])
    assert torch.equal(ours.normalize_patches(pixels["pixel_values"]), expected["pixel_values"])


def test_processor_accepts_encoded_images(processors, tmp_path):
    _, ours = processors
    image = noise_image(90, 120, 9)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    image.save(tmp_path / "source.png")
    expected = ours([image])["pixel_values"]
    assert torch.equal(ours([buffer.getvalue()])["pixel_values"], expected)
    assert torch.equal(ours(str(tmp_path / "source.png"))["pixel_values"], expected)


@pytest.mark.parametrize("min_pixels,max_pixels,factor", [(512 * 512, 2048 * 2048, 16), (56 * 56, 28 * 28 * 1280, 16),
                                                          (32 * 32, 64 * 64, 4), (1000, 9000, 14), (4096, 4096, 8)])
def test_smart_resize_matches_transformers(min_pixels, max_pixels, factor):
    from transformers.models.glm_image.image_processing_pil_glm_image import smart_resize

    sizes = [(h, w) for h in range(factor, 700, 37) for w in range(factor, 700, 41)] + [(5000, 4000), (2049, 4096)]
    for h, w in sizes:
        try:
            expected = smart_resize(h, w, factor, min_pixels, max_pixels)
        except ValueError:
            with pytest.raises(ValueError):
                gip.smart_resize(h, w, factor, min_pixels, max_pixels)
            continue
        assert gip.smart_resize(h, w, factor, min_pixels, max_pixels) == expected, (h, w)


def test_processor_rejects_bad_images(processors):
    _, ours = processors
    with pytest.raises(ValueError, match=r"aspect ratio 4.01 exceeds 4"):
        ours([noise_image(100, 401)])
    with pytest.raises(ValueError, match=r"too small: both sides must be >= 16 \(patch_size\)"):
        ours([noise_image(15, 40)])
    with pytest.raises(ValueError, match="no images given"):
        ours([])


def test_num_tokens(processors):
    _, ours = processors
    out = ours([noise_image(300, 400), noise_image(100, 400)])
    assert [ours.num_tokens(tuple(g)) for g in out["image_grid_thw"].tolist()] == [16 * 21, 16 * 64]


@pytest.mark.parametrize("change,message", [
    ({"temporal_patch_size": 2}, "temporal_patch_size=2 is not supported: the vision encoder takes single frames"),
    ({"temporal_patch_size": None}, "temporal_patch_size=2 is not supported"),  # transformers' default
    ({"merge_size": 2}, "merge_size=2 is not supported: the VQ tokenizer gives one code per patch"),
    ({"size": {"shortest_edge": 4096}}, r"size.longest_edge \(or max_pixels\) must be a positive int, got None"),
    ({"size": [512, 512]}, "size must be an object"),
    ({"patch_size": 0}, "patch_size must be a positive int"),
    ({"image_std": [0.2, 0.0, 0.3]}, "image_std must be non-zero"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must be 3 finite numbers"),
    ({"resample": 2}, "resample=2 is not supported"),
    ({"do_normalize": False}, "do_normalize=False is not supported"),
    ({"image_processor_type": "Glm46VImageProcessor"}, "is not a GLM-Image image processor"),
])
def test_processor_config_errors(tmp_path, change, message):
    cfg = {**TINY_PREPROCESSOR, **change}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    with pytest.raises(ValueError, match=message):
        gip.GlmImageImageProcessor.from_pretrained(tmp_path)


def test_processor_config_precedence_and_vision_check(tmp_path, checkpoint):
    """min_pixels / max_pixels override size's entries, as in transformers; the patch size must be
    the vision encoder's."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {**TINY_PREPROCESSOR, "min_pixels": 40 * 40, "max_pixels": 80 * 80}))
    ours = gip.GlmImageImageProcessor.from_pretrained(tmp_path, "pil", vision=checkpoint[2].vision)
    assert (ours.min_pixels, ours.max_pixels, ours.patch_size, ours.backend) == (1600, 6400, 4, "pil")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**TINY_PREPROCESSOR, "patch_size": 8}))
    with pytest.raises(ValueError, match=r"patch_size=8 != the vision encoder's vision_config.patch_size 4"):
        gip.GlmImageImageProcessor.from_pretrained(tmp_path, vision=checkpoint[2].vision)
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        gip.GlmImageImageProcessor.from_pretrained(tmp_path / "missing")
