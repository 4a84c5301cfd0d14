"""glmrt.image_processor against both transformers backends of the GLM-OCR image processor.

References: `Glm46VImageProcessor` (the torchvision backend, what AutoProcessor builds when
torchvision is installed) must be matched bit for bit by backend="torchvision" (the default);
`Glm46VImageProcessorPil` by backend="pil" within ATOL (it rescales in float64 and normalizes in
fp32 in two steps). Both are built with the GLM-OCR preprocessor_config.json values; their class
default longest_edge (28*28*15000) is NOT the checkpoint's 9633792, so the size is passed explicitly.
"""
import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from glmrt import image_processor as ip

MEAN, STD = ip.IMAGE_MEAN, ip.IMAGE_STD
ATOL = 1e-6  # PIL backend: fused fp32 normalize vs float64 rescale then fp32 normalize: <= 3.6e-7
HF_KWARGS = dict(
    size={"shortest_edge": 12544, "longest_edge": 9633792},
    image_mean=list(MEAN),
    image_std=list(STD),
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
)
TOLERANCE = {"torchvision": 0.0, "pil": ATOL}

needs_cpp = pytest.mark.skipif(not ip.HAS_CPP, reason="glmrt._C extension not built")


@pytest.fixture(scope="module")
def hf_pil():
    transformers = pytest.importorskip("transformers")
    return transformers.Glm46VImageProcessorPil(**HF_KWARGS)


@pytest.fixture(scope="module")
def hf_torchvision(torchvision_available):
    import transformers

    return transformers.Glm46VImageProcessor(**HF_KWARGS)


@pytest.fixture(scope="module", params=["torchvision", "pil"])
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def pair(request, backend):
    """(transformers' processor of this backend, ours with the same backend, atol)."""
    hf = request.getfixturevalue("hf_torchvision" if backend == "torchvision" else "hf_pil")
    return hf, ip.ImageProcessor(backend=backend), TOLERANCE[backend]


def noise_image(h, w, seed=0, mode="RGB"):
    """Noise plus a gradient: stresses the resampling filter and covers the full value range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = ((yy * 255) // max(h - 1, 1) + (xx * 255) // max(w - 1, 1)) // 2
    noise = rng.integers(0, 256, (h, w, 3))
    arr = np.where(rng.random((h, w, 1)) < 0.5, noise, grad[..., None]).astype(np.uint8)
    img = Image.fromarray(arr)
    return img if mode == "RGB" else img.convert(mode)


def assert_matches_hf(hf, proc, images, atol):
    ref = hf(images, return_tensors="np")
    out = proc(images)
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_grid_thw"].dtype == torch.int64
    np.testing.assert_array_equal(out["image_grid_thw"].numpy(), ref["image_grid_thw"])
    assert out["pixel_values"].shape == ref["pixel_values"].shape
    if atol == 0:
        np.testing.assert_array_equal(out["pixel_values"].numpy(), ref["pixel_values"])
    else:
        np.testing.assert_allclose(out["pixel_values"].numpy(), ref["pixel_values"], rtol=0, atol=atol)


# ----------------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize(
    "h,w",
    [
        (5, 9),  # tiny: upscale-to-28 path, then min_pixels path
        (9, 5),
        (1, 1),
        (27, 300),
        (28, 28),
        (30, 2000),  # thin
        (2000, 30),
        (28, 5600),  # aspect ratio exactly 200
        (5600, 28),
        (100, 100),
        (113, 97),
        (300, 400),
        (480, 640),
        (1000, 777),
        (140, 5600),  # aspect 40
        (3508, 2480),  # A4 page at 300 dpi: downscaled to the pixel budget
    ],
)
def test_matches_transformers_sizes(pair, h, w):
    hf, proc, atol = pair
    assert_matches_hf(hf, proc, [noise_image(h, w, seed=h * 7 + w)], atol)


def test_matches_transformers_huge_downscale(pair):
    h, w = 3000, 2600
    th, tw = ip.smart_resize(h, w)
    assert 2 * round(h / 28) * 28 * round(w / 28) * 28 > ip.MAX_PIXELS  # takes the downscale path
    assert (th, tw) == (2352, 2016)
    hf, proc, atol = pair
    assert_matches_hf(hf, proc, [noise_image(h, w, seed=3)], atol)


def test_same_size_is_not_resampled(pair):
    """84x84 is already a valid size: torchvision returns it untouched, PIL resamples it anyway."""
    hf, proc, atol = pair
    assert proc.resized_size(84, 84) == (84, 84)
    assert_matches_hf(hf, proc, [noise_image(84, 84, seed=4)], atol)


def test_backends_differ(hf_torchvision, hf_pil):
    """The backend choice matters: PIL and torchvision bicubic give different pixels."""
    img = [noise_image(300, 400, seed=5)]
    pil = ip.ImageProcessor(backend="pil")(img)["pixel_values"].numpy()
    tv = hf_torchvision(img, return_tensors="np")["pixel_values"]
    assert np.abs(pil - tv).max() > 0.01  # at least 2 uint8 levels somewhere


def _p_with_transparency(index_form):
    img = noise_image(61, 83, seed=11).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if index_form:
        img.info["transparency"] = 5
    else:  # per-palette-entry alpha bytes, as in PNG tRNS
        img.info["transparency"] = bytes((i * 4) % 256 for i in range(64))
    return img


def _rgba():
    img = noise_image(70, 90, seed=12)
    alpha = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90), dtype=np.uint8))
    img.putalpha(alpha)
    return img


def _la():
    img = noise_image(45, 66, seed=13, mode="L")
    img.putalpha(Image.fromarray(np.random.default_rng(2).integers(0, 256, (45, 66), dtype=np.uint8)))
    return img


def _i16():
    arr = np.random.default_rng(3).integers(0, 65536, (50, 77), dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return img


def _one_bit():
    return Image.fromarray(np.random.default_rng(4).random((64, 48)) < 0.5)


MODE_CASES = {
    "L": lambda: noise_image(50, 70, seed=14, mode="L"),
    "LA": _la,
    "P": lambda: noise_image(61, 83, seed=15).convert("P", palette=Image.Palette.ADAPTIVE, colors=200),
    "P+transparency-index": lambda: _p_with_transparency(True),
    "P+transparency-bytes": lambda: _p_with_transparency(False),
    "PA": lambda: _la().convert("PA"),
    "RGBA": _rgba,
    "CMYK": lambda: noise_image(52, 64, seed=16, mode="CMYK"),
    "I;16": _i16,
    "1": _one_bit,
    "RGB+transparency": lambda: _with_info(noise_image(40, 40, seed=17), transparency=(0, 0, 0)),
}


def _with_info(img, **info):
    img.info.update(info)
    return img


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_matches_transformers_modes(pair, case):
    hf, proc, atol = pair
    assert_matches_hf(hf, proc, [MODE_CASES[case]()], atol)


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_to_rgb_matches_transformers(case):
    transforms = pytest.importorskip("transformers.image_transforms")
    img = MODE_CASES[case]()
    ours = ip.to_rgb(img)
    assert ours.mode == "RGB" and ours.size == img.size
    np.testing.assert_array_equal(np.asarray(ours), transforms.convert_to_rgb(img, return_numpy=True))


def test_to_rgb_composites_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    px = [tuple(int(v) for v in p) for p in np.asarray(ip.to_rgb(img))[0]]
    assert px[0] == (255, 255, 255) and px[1] == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in px[2])


def test_matches_transformers_batch(pair):
    # Two images of one shape: the torchvision backend resizes them as one stacked batch.
    images = [noise_image(200, 300, 1), MODE_CASES["RGBA"](), noise_image(5, 9, 2), noise_image(900, 400, 3),
              noise_image(200, 300, 6)]
    hf, proc, atol = pair
    assert_matches_hf(hf, proc, images, atol)
    out = proc(images)
    grids = out["image_grid_thw"]
    assert out["pixel_values"].shape[0] == int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum())
    # images are concatenated in order
    first = proc([images[0]])["pixel_values"]
    torch.testing.assert_close(out["pixel_values"][: first.shape[0]], first, rtol=0, atol=0)


def test_numpy_fallback_matches_transformers(pair, monkeypatch):
    monkeypatch.setattr(ip, "HAS_CPP", False)
    hf, proc, atol = pair
    assert_matches_hf(hf, proc, [noise_image(300, 211, seed=21), MODE_CASES["P+transparency-index"]()], atol)


# ------------------------------------------------------------------------ torchvision resize
@pytest.mark.parametrize(
    "h,w,th,tw,c",
    [(300, 400, 336, 448, 3), (5, 9, 112, 196, 3), (1000, 777, 364, 280, 3), (61, 83, 61, 84, 3),
     (17, 33, 47, 5, 1), (29, 31, 28, 28, 3), (40, 40, 40, 40, 3)],
)
def test_resize_torchvision_equals_torchvision(torchvision_available, h, w, th, tw, c):
    from torchvision.transforms.v2 import functional as tvF

    img = np.random.default_rng(h * w).integers(0, 256, (h, w, c), dtype=np.uint8)
    ref = tvF.resize(torch.from_numpy(img).permute(2, 0, 1).contiguous(), [th, tw],
                     interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    out = ip.resize_torchvision(img, th, tw)
    assert out.dtype == np.uint8 and out.shape == (th, tw, c)
    np.testing.assert_array_equal(out, ref.permute(1, 2, 0).numpy())


def test_resize_torchvision_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8 HWC"):
        ip.resize_torchvision(np.zeros((4, 4, 3), np.float32), 8, 8)


def test_torchvision_normalize_constants():
    """patchify's fp32(255 * value) must give back transformers' fused constants,
    torch.tensor(mean) * (1 / rescale_factor) in fp32, for the CLIP stats and random ones."""
    rng = np.random.default_rng(0)
    stats = [(MEAN, STD)] + [(tuple(rng.uniform(0, 1, 3)), tuple(rng.uniform(0.01, 1, 3))) for _ in range(2000)]
    for mean, std in stats:
        m, s = ip._torchvision_normalize_stats(mean, std)
        for ours, theirs in ((m, mean), (s, std)):
            expected = (torch.tensor([float(v) for v in theirs]) * (1.0 / (1 / 255))).numpy()
            np.testing.assert_array_equal((255.0 * np.asarray(ours)).astype(np.float32), expected)


def test_backend_validation():
    with pytest.raises(ValueError, match=r"ImageProcessor.backend .*'torch'"):
        ip.ImageProcessor(backend="torch")
    with pytest.raises(ValueError, match=r"ImageProcessor.backend"):
        ip.ImageProcessor.from_pretrained("/nonexistent", backend="PIL")
    assert ip.ImageProcessor().backend == "torchvision"


# ------------------------------------------------------------------------------ smart_resize
@pytest.mark.parametrize(
    "width,height,grid",
    [  # grids measured with the real HF processor on the real checkpoint (sizes are width x height)
        (6000, 4000, (1, 128, 192)),
        (4000, 3000, (1, 134, 180)),
        (3000, 3000, (1, 156, 156)),
        (5000, 4000, (1, 140, 174)),
        (1700, 2200, (1, 158, 122)),
        (100, 100, (1, 8, 8)),
    ],
)
def test_smart_resize_measured_grids(width, height, grid):
    h, w = ip.smart_resize(height, width)
    assert h % 28 == 0 and w % 28 == 0
    assert (1, h // 14, w // 14) == grid


def test_smart_resize_budget_per_two_frames():
    h, w = ip.smart_resize(10000, 10000)
    assert 2 * h * w <= ip.MAX_PIXELS and (h // 14) * (w // 14) // 4 <= 6144
    h, w = ip.smart_resize(28, 28)
    assert 2 * h * w >= ip.MIN_PIXELS and (h, w) == (84, 84)  # 56x56 is 6272 < 12544 per 2 frames


def test_smart_resize_matches_transformers():
    mod = pytest.importorskip("transformers.models.glm46v.image_processing_pil_glm46v")
    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 9000, (3000, 2))]
    sizes += [(int(a), int(b)) for a, b in rng.integers(1, 60, (500, 2))]
    sizes += [(h, w) for h in range(1, 40) for w in (1, 2, 3, 27, 28, 29, 41, 42, 43, 70, 5000)]
    for h, w in sizes:
        try:
            ref = mod.smart_resize(2, h, w, 2, 28, 12544, 9633792)
        except ValueError:
            with pytest.raises(ValueError):
                ip.smart_resize(h, w)
            continue
        assert ip.smart_resize(h, w) == ref, (h, w)


def test_smart_resize_aspect_ratio_error():
    with pytest.raises(ValueError, match=r"aspect ratio .*201"):
        ip.smart_resize(28, 28 * 201)
    with pytest.raises(ValueError, match="aspect ratio"):
        ip.smart_resize(10, 2100)  # upscaled to 28x5880: ratio 210
    assert ip.smart_resize(28, 28 * 200)  # exactly 200 is allowed


@pytest.mark.parametrize("backend_name", ip.BACKENDS)
def test_processor_aspect_ratio_error(backend_name):
    with pytest.raises(ValueError, match="aspect ratio"):
        ip.ImageProcessor(backend=backend_name)([noise_image(10, 2100)])


def test_smart_resize_rejects_empty():
    with pytest.raises(ValueError):
        ip.smart_resize(0, 10)


# ---------------------------------------------------------------------------------- patchify
def patchify_reference(img, mean, std, p, t, m):
    """Explicit-loop reference for the layout: rows (bh, bw, mh, mw), row vectors (c, t, py, px), fp32 normalize."""
    h, w, c = img.shape
    gh, gw = h // p, w // p
    shift = (255.0 * np.asarray(mean)).astype(np.float32)
    scale = (255.0 * np.asarray(std)).astype(np.float32)
    rows = []
    for bh in range(gh // m):
        for bw in range(gw // m):
            for mh in range(m):
                for mw in range(m):
                    y, x = (bh * m + mh) * p, (bw * m + mw) * p
                    patch = img[y : y + p, x : x + p, :].astype(np.float32)  # (py, px, c)
                    patch = (patch - shift) / scale
                    vec = np.stack([np.stack([patch[:, :, ch]] * t) for ch in range(c)])  # (c, t, py, px)
                    rows.append(vec.reshape(-1))
    return np.stack(rows)


LAYOUTS = [
    ((28, 28, 3), 14, 2, 2),
    ((56, 84, 3), 14, 2, 2),
    ((12, 8, 3), 2, 2, 2),
    ((12, 18, 1), 3, 3, 1),
    ((8, 8, 4), 2, 1, 2),
    ((9, 15, 3), 3, 2, 1),
]


def _stats(c):
    rng = np.random.default_rng(c)
    return list(rng.uniform(0.2, 0.8, c)), list(rng.uniform(0.1, 0.5, c))


@pytest.mark.parametrize("shape,p,t,m", LAYOUTS)
def test_patchify_numpy_layout(shape, p, t, m):
    img = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    mean, std = _stats(shape[2])
    out = ip.patchify_numpy(img, mean, std, p, t, m)
    assert out.dtype == np.float32 and out.shape == ((shape[0] // p) * (shape[1] // p), shape[2] * t * p * p)
    np.testing.assert_array_equal(out, patchify_reference(img, mean, std, p, t, m))


def test_patchify_value_formula():
    img = np.zeros((28, 28, 3), np.uint8)
    img[0, 0] = (0, 128, 255)
    out = ip.patchify_numpy(img, MEAN, STD)
    for c, v in enumerate((0, 128, 255)):
        expect = (v - 255 * MEAN[c]) / (255 * STD[c])
        assert abs(out[0, c * 392] - expect) < 1e-6  # (c, t=0, py=0, px=0)
        assert out[0, c * 392 + 196] == out[0, c * 392]  # t=1 copy


@needs_cpp
@pytest.mark.parametrize("shape,p,t,m", LAYOUTS + [((2212, 1708, 3), 14, 2, 2)])
def test_cpp_equals_numpy(shape, p, t, m):
    img = np.random.default_rng(6).integers(0, 256, shape, dtype=np.uint8)
    mean, std = (MEAN, STD) if shape[2] == 3 else _stats(shape[2])
    ref = ip.patchify_numpy(img, mean, std, p, t, m)
    got = ip._C.patchify(img, mean, std, p, t, m)
    assert got.dtype == np.float32 and got.shape == ref.shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got, ref)  # bit-identical
    np.testing.assert_array_equal(ip._C.patchify(img, mean, std, p, t, m, num_threads=3), ref)


@needs_cpp
def test_cpp_all_pixel_values():
    img = np.arange(256 * 28 * 3, dtype=np.int64).reshape(256, 28 * 3)
    img = (img % 256).astype(np.uint8).reshape(256, 28, 3)[:252]
    np.testing.assert_array_equal(ip._C.patchify(img, MEAN, STD), ip.patchify_numpy(img, MEAN, STD))


def test_patchify_dispatch_non_contiguous():
    base = np.random.default_rng(7).integers(0, 256, (56, 112, 3), dtype=np.uint8)
    view = base[:, ::2]  # non-contiguous 56x56
    np.testing.assert_array_equal(ip.patchify(view, MEAN, STD), ip.patchify_numpy(np.ascontiguousarray(view), MEAN, STD))


@needs_cpp
def test_cpp_concurrent_threads():
    img = np.random.default_rng(8).integers(0, 256, (560, 840, 3), dtype=np.uint8)
    ref = ip.patchify_numpy(img, MEAN, STD)
    results = [None] * 4

    def work(i):
        results[i] = ip._C.patchify(img, MEAN, STD)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in results:
        np.testing.assert_array_equal(r, ref)


BAD_ARGS = [
    (lambda: np.zeros((28, 28, 3), np.float32), MEAN, STD, 14, 2, 2, "uint8"),
    (lambda: np.zeros((28, 28), np.uint8), MEAN, STD, 14, 2, 2, "HWC"),
    (lambda: np.zeros((28, 42, 3), np.uint8), MEAN, STD, 14, 2, 2, "multiple"),
    (lambda: np.zeros((0, 28, 3), np.uint8), MEAN, STD, 14, 2, 2, "multiple"),
    (lambda: np.zeros((28, 28, 3), np.uint8), MEAN[:2], STD, 14, 2, 2, "one per channel"),
    (lambda: np.zeros((28, 28, 3), np.uint8), MEAN, (0.2, 0.0, 0.3), 14, 2, 2, "non-zero"),
    (lambda: np.zeros((28, 28, 3), np.uint8), MEAN, STD, 0, 2, 2, ">= 1"),
]


@pytest.mark.parametrize("make,mean,std,p,t,m,msg", BAD_ARGS)
def test_patchify_validation(make, mean, std, p, t, m, msg):
    with pytest.raises(ValueError, match=msg):
        ip.patchify_numpy(make(), mean, std, p, t, m)
    if ip.HAS_CPP:
        with pytest.raises(ValueError, match=msg):
            ip._C.patchify(make(), mean, std, p, t, m)


@needs_cpp
def test_cpp_rejects_non_contiguous():
    img = np.zeros((28, 56, 3), np.uint8)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        ip._C.patchify(img, MEAN, STD)


# ------------------------------------------------------------- raw patch pixels, normalized on device
@pytest.mark.parametrize("shape,p,t,m", LAYOUTS + [((2212, 1708, 3), 14, 2, 2)])
def test_patch_pixels_are_patchify_rows_before_normalizing(shape, p, t, m, monkeypatch):
    """patch_pixels keeps patchify's row and column order: with an identity "normalization"
    (mean 0, std 1/255) patchify's first temporal frame is exactly the raw pixels."""
    img = np.random.default_rng(9).integers(0, 256, shape, dtype=np.uint8)
    c = shape[2]
    identity = ip.patchify_numpy(img, [0.0] * c, [1 / 255] * c, p, t, m).reshape(-1, c, t, p * p)[:, :, 0]
    ref = ip.patch_pixels_numpy(img, p, m)
    assert ref.dtype == np.uint8 and ref.shape == ((shape[0] // p) * (shape[1] // p), c * p * p)
    np.testing.assert_array_equal(ref.reshape(-1, c, p * p), identity)
    if ip.HAS_CPP:
        got = ip._C.patch_pixels(img, p, m)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(ip._C.patch_pixels(img, p, m, num_threads=3), ref)
    monkeypatch.setattr(ip, "HAS_CPP", False)
    np.testing.assert_array_equal(ip.patch_pixels(img, p, m), ref)  # the numpy fallback


@pytest.mark.parametrize("backend_name", ip.BACKENDS)
@pytest.mark.parametrize("size,t", [((221, 317), 2), ((56, 56), 2), ((999, 130), 3)])
def test_normalized_patch_pixels_are_bit_identical_to_pixel_values(backend_name, size, t):
    """What the engine uploads (uint8) and normalizes on the device equals the float32 pixel
    values of the processor, bit for bit, for every uint8 value and both backends' constants."""
    proc = ip.ImageProcessor(backend=backend_name, temporal_patch_size=t)
    images = [noise_image(*size, seed=11), noise_image(70, 90, seed=12)]
    want = proc(images)
    raw = proc(images, normalize=False)
    assert raw["pixel_values"].dtype == torch.uint8 and raw["pixel_values"].shape[1] == 3 * 14 * 14
    assert torch.equal(raw["image_grid_thw"], want["image_grid_thw"])
    got = proc.normalize_patches(raw["pixel_values"])
    assert got.dtype == torch.float32 and torch.equal(got, want["pixel_values"])
    every_value = torch.arange(256, dtype=torch.uint8).repeat(3 * 196 // 256 + 1)[: 3 * 196].repeat(4, 1)
    table = torch.from_numpy(ip._normalize_lut(proc._patchify_mean, proc._patchify_std))
    rows = proc.normalize_patches(every_value).view(4, 3, t, 196)
    for c in range(3):
        assert torch.equal(rows[:, c, -1], table[c][every_value.view(4, 3, 196)[:, c].long()])


def test_normalize_patches_rejects_other_inputs():
    proc = ip.ImageProcessor()
    for bad in (torch.zeros(2, 588), torch.zeros(2, 587, dtype=torch.uint8), torch.zeros(588, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="patch pixels must be uint8"):
            proc.normalize_patches(bad)


def test_patch_pixels_validation():
    with pytest.raises(ValueError, match="uint8"):
        ip.patch_pixels_numpy(np.zeros((28, 28, 3), np.float32))
    with pytest.raises(ValueError, match="multiple"):
        ip.patch_pixels_numpy(np.zeros((28, 42, 3), np.uint8))
    if ip.HAS_CPP:
        for bad, msg in ((np.zeros((28, 28, 3), np.float32), "uint8"), (np.zeros((28, 42, 3), np.uint8), "multiple"),
                         (np.zeros((28, 56, 3), np.uint8)[:, ::2], "C-contiguous"), (np.zeros((28, 28), np.uint8), "HWC")):
            with pytest.raises(ValueError, match=msg):
                ip._C.patch_pixels(bad)


# ----------------------------------------------------------------------------------- loading
def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_sources(tmp_path):
    img = noise_image(33, 47, seed=9)
    data = _png_bytes(img)
    path = tmp_path / "page.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    uri = "data:image/png;base64," + b64
    wrapped = "data:image/png;base64," + "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    for src in (img, str(path), path, data, bytearray(data), memoryview(data), uri, wrapped):
        loaded = ip.load_image(src)
        assert isinstance(loaded, Image.Image)
        np.testing.assert_array_equal(np.asarray(loaded.convert("RGB")), np.asarray(img))
    assert ip.load_image(img) is img


def test_processor_accepts_all_sources(pair, tmp_path):
    hf, proc, atol = pair
    img = MODE_CASES["P+transparency-index"]()
    data = _png_bytes(img)
    path = tmp_path / "p.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    reloaded = Image.open(io.BytesIO(data))
    assert reloaded.info.get("transparency") is not None  # survives the PNG round trip
    ref = hf([reloaded], return_tensors="np")["pixel_values"]
    for src in (str(path), path, data, uri):
        np.testing.assert_allclose(proc([src])["pixel_values"].numpy(), ref, rtol=0, atol=atol)


def test_load_image_jpeg_bytes(pair):
    hf, proc, atol = pair
    buf = io.BytesIO()
    noise_image(120, 90, seed=10, mode="CMYK").save(buf, format="JPEG")
    img = ip.load_image(buf.getvalue())
    assert img.mode == "CMYK"
    assert_matches_hf(hf, proc, [img], atol)


def test_load_image_exif_orientation(tmp_path):
    image_utils = pytest.importorskip("transformers.image_utils")
    img = noise_image(40, 70, seed=18)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buf.getvalue())
    ours = ip.load_image(path)
    assert ours.size == (40, 70)  # upright: 70 high, 40 wide
    np.testing.assert_array_equal(np.asarray(ip.to_rgb(ours)), np.asarray(image_utils.load_image(str(path))))
    assert ip.load_image(buf.getvalue(), exif_transpose=False).size == (70, 40)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot decode"),
    ],
)
def test_load_image_undecodable(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ip.load_image(bad)


@pytest.mark.parametrize("fmt", ip.IMAGE_FORMATS)
def test_load_image_decodes_the_allowed_formats(fmt):
    buf = io.BytesIO()
    noise_image(24, 16, seed=3).save(buf, format=fmt)
    assert ip.load_image(buf.getvalue()).format == fmt


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "ICO"])
def test_load_image_refuses_other_formats_by_name(fmt):
    """Formats outside the list are refused before their plugin decodes anything (EPS would run
    Ghostscript), named in the error, from bytes or a data URI whatever its media type says."""
    buf = io.BytesIO()
    noise_image(24, 16, seed=3).save(buf, format=fmt)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    for src in (buf.getvalue(), uri):
        with pytest.raises(ip.ImageFormatError, match=f"{fmt} images are not accepted"):
            ip.load_image(src)


def test_load_image_truncated():
    data = _png_bytes(noise_image(64, 64, seed=1))
    with pytest.raises(ValueError, match="cannot decode"):
        ip.load_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "uri,msg",
    [
        ("data:image/png;base64,@@@not base64@@@", "base64"),
        ("data:image/png;base64", "malformed"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png;base64," + base64.b64encode(b"hello world").decode(), "cannot decode"),
    ],
)
def test_load_image_bad_data_uri(uri, msg):
    with pytest.raises(ValueError, match=msg):
        ip.load_image(uri)


def test_load_image_no_network_and_bad_types(tmp_path):
    with pytest.raises(ValueError, match="not fetched"):
        ip.load_image("https://example.com/a.png")
    with pytest.raises(FileNotFoundError):
        ip.load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError):
        ip.load_image(12345)
    with pytest.raises(ValueError, match="not a usable image path"):
        ip.load_image(base64.b64encode(b"\0" * 3000).decode())  # bare base64: name too long


@pytest.mark.parametrize("limit_factor", [0.75, 0.4])  # PIL warning range / PIL error range
def test_load_image_decompression_bomb(monkeypatch, tmp_path, limit_factor):
    img = noise_image(100, 100, seed=2)
    data = _png_bytes(img)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(100 * 100 * limit_factor))
    for src in (data, "data:image/png;base64," + base64.b64encode(data).decode()):
        with pytest.raises(ValueError, match="decompression bomb"):
            ip.load_image(src)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="decompression bomb"):
        ip.ImageProcessor()([path])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # at the limit: fine
    assert ip.load_image(data).size == (100, 100)


# ----------------------------------------------------------------------------- from_pretrained
def test_from_pretrained_missing_file_gives_defaults(tmp_path):
    p = ip.ImageProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (12544, 9633792)
    assert p.image_mean == MEAN and p.image_std == STD
    assert (p.patch_size, p.temporal_patch_size, p.merge_size) == (14, 2, 2)
    assert p.backend == "torchvision"
    assert ip.ImageProcessor.from_pretrained(tmp_path, backend="pil").backend == "pil"


CUSTOM_CONFIG = {
    "size": {"shortest_edge": 3136, "longest_edge": 200704},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.25, 0.25, 0.25],
    "image_processor_type": "Glm46VImageProcessor",
    "processor_class": "Glm46VProcessor",
}


def _hf_kwargs(cfg):
    return {k: v for k, v in cfg.items() if "type" not in k and "class" not in k}


def test_from_pretrained_reads_config(tmp_path, backend):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CUSTOM_CONFIG))
    p = ip.ImageProcessor.from_pretrained(tmp_path, backend=backend)
    assert p.backend == backend
    assert (p.min_pixels, p.max_pixels) == (3136, 200704)
    assert p.image_mean == (0.5, 0.5, 0.5) and p.image_std == (0.25, 0.25, 0.25)
    out = p([noise_image(1000, 800)])
    t, gh, gw = out["image_grid_thw"][0].tolist()
    assert 2 * gh * gw * 14 * 14 <= 200704
    transformers = pytest.importorskip("transformers")
    if backend == "torchvision":
        pytest.importorskip("torchvision")
        ref = transformers.Glm46VImageProcessor(**_hf_kwargs(CUSTOM_CONFIG))
    else:
        ref = transformers.Glm46VImageProcessorPil(**_hf_kwargs(CUSTOM_CONFIG))
    assert_matches_hf(ref, p, [noise_image(1000, 800)], TOLERANCE[backend])


def test_from_pretrained_prefers_processor_config(tmp_path):
    """Current Hub revisions nest the image processor in processor_config.json; transformers reads
    that entry first and preprocessor_config.json only without it."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 1, "longest_edge": 2}}))
    nested = dict(CUSTOM_CONFIG, image_processor_type="GlmOcrImageProcessor")
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"processor_class": "GlmOcrProcessor", "image_processor": nested})
    )
    p = ip.ImageProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (3136, 200704)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "GlmOcrProcessor"}))
    p = ip.ImageProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (1, 2)


@pytest.mark.parametrize("kind", ip.IMAGE_PROCESSOR_TYPES)
def test_from_pretrained_accepts_glm_types(tmp_path, kind):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(CUSTOM_CONFIG, image_processor_type=kind)))
    assert ip.ImageProcessor.from_pretrained(tmp_path).max_pixels == 200704


@pytest.mark.parametrize(
    "file,text,msg",
    [
        ("preprocessor_config.json", '{"resample": 2}', "resample=2"),
        ("preprocessor_config.json", '{"image_processor_type": "Qwen2VLImageProcessor"}',
         "image_processor_type='Qwen2VLImageProcessor'"),
        ("preprocessor_config.json", "[1, 2]", "expected a JSON object"),
        ("preprocessor_config.json", "{not json", "not valid JSON"),
        ("processor_config.json", '{"image_processor": [1]}', "image_processor must be a JSON object"),
        ("processor_config.json", '{"image_processor": {"do_normalize": false}}', "do_normalize=False"),
    ],
)
def test_from_pretrained_rejects_bad_config(tmp_path, file, text, msg):
    (tmp_path / file).write_text(text)
    with pytest.raises(ValueError, match=msg) as info:
        ip.ImageProcessor.from_pretrained(tmp_path)
    assert file in str(info.value)
