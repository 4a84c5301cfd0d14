"""GLM-Image condition-image preprocessing: images -> one row of C*P*P pixel values per patch.

Bit-identical to transformers' GlmImageImageProcessor (backend "torchvision", what AutoProcessor
builds when torchvision is installed) or GlmImageImageProcessorPil ("pil"): load -> RGB ->
GLM-Image's smart_resize -> bicubic resize -> rescale and normalize -> patches, row-major over
the patch grid (one frame, no merge blocks: the vision encoder takes C*P*P values per patch and the
VQ tokenizer gives one code per patch).

Loading, RGB conversion, the torchvision resize and patch extraction are GLM-OCR's
(image_processor.py). GLM-Image's own parts:
- the target size (`smart_resize`): sources need both sides >= patch_size and an aspect ratio
  <= 4; the scale that lifts the short side to sqrt(min_pixels), or caps the long side at
  sqrt(max_pixels), is applied to *half* the image size, each side rounded to a multiple of the
  patch size;
- normalization by a [C, 256] table computed with the reference backend's own ops (torchvision:
  rescale fused into normalize, (x - fp32(mean) * 255) / (fp32(std) * 255) in fp32; PIL: x / 255
  in float64 rounded to fp32, then (x - mean) / std in fp32). Both are elementwise in the uint8
  value, so the table reproduces every bit.
"""
from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .config import GlmImageVisionConfig
from .image_processor import (BACKENDS, IMAGE_MEAN, IMAGE_STD, ImageLike, _image_processor_config, load_image,
                              patch_pixels, resize_torchvision, to_rgb)

MAX_ASPECT_RATIO = 4
IMAGE_PROCESSOR_TYPES = ("GlmImageImageProcessor", "GlmImageImageProcessorFast", "GlmImageImageProcessorPil")
# transformers' GlmImageImageProcessor class defaults, which a key absent from the config takes.
HF_DEFAULTS = {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, "patch_size": 14,
               "temporal_patch_size": 2, "merge_size": 2, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
               "rescale_factor": 1 / 255}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width), multiples of `factor` (the patch size), for a height x width image:
    transformers' GLM-Image smart_resize, including its halving of the image size."""
    if height < factor or width < factor:
        raise ValueError(f"image of {height}x{width} pixels is too small: both sides must be >= {factor} (patch_size)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {height}x{width} pixels: aspect ratio {ratio:.4g} exceeds {MAX_ASPECT_RATIO}")
    shortest, longest = int(round(math.sqrt(min_pixels))), int(round(math.sqrt(max_pixels)))
    scale = 1.0
    if min(height, width) < shortest:
        scale = shortest / min(height, width)
    if max(height, width) * scale > longest:
        scale = longest / max(height, width)
    h_bar = max(factor, int(round(height // 2 * scale / factor)) * factor)  # Python round: half to even
    w_bar = max(factor, int(round(width // 2 * scale / factor)) * factor)
    if max(h_bar, w_bar) > longest:
        beta = max(h_bar, w_bar) / longest
        h_bar = max(factor, int(math.floor(h_bar / beta / factor)) * factor)
        w_bar = max(factor, int(math.floor(w_bar / beta / factor)) * factor)
    return h_bar, w_bar


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _normalize_table(mean: Sequence[float], std: Sequence[float], rescale_factor: float, backend: str) -> torch.Tensor:
    """[C, 256] fp32: the pixel value each uint8 value of each channel becomes, by the backend's ops."""
    if backend == "torchvision":
        shift = torch.tensor(mean) * (1.0 / rescale_factor)  # fp32, as transformers fuses rescale into normalize
        scale = torch.tensor(std) * (1.0 / rescale_factor)
        return (torch.arange(256, dtype=torch.float32)[None, :] - shift[:, None]) / scale[:, None]
    values = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    table = (values[None, :] - np.array(mean, dtype=np.float32)[:, None]) / np.array(std, dtype=np.float32)[:, None]
    return torch.from_numpy(table)


class GlmImageImageProcessor:
    """Condition images -> pixel values [sum h*w, 3*P*P] and grids [n, 3] (see __call__)."""

    # One frame per patch, one prompt token per patch (the only values the encoder takes).
    temporal_patch_size = 1
    merge_size = 1

    def __init__(self, min_pixels: int, max_pixels: int, patch_size: int, image_mean: Sequence[float] = IMAGE_MEAN,
                 image_std: Sequence[float] = IMAGE_STD, rescale_factor: float = 1 / 255,
                 backend: str = "torchvision") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"GlmImageImageProcessor.backend must be one of {BACKENDS}, got {backend!r}")
        self.min_pixels, self.max_pixels, self.patch_size = int(min_pixels), int(max_pixels), int(patch_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.rescale_factor = float(rescale_factor)
        self.backend = backend
        self._table = _normalize_table(self.image_mean, self.image_std, self.rescale_factor, backend).reshape(-1)
        self._tables: dict[torch.device, torch.Tensor] = {}  # the table on each device normalize_patches ran on

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backend: str = "torchvision",
                        vision: GlmImageVisionConfig | None = None) -> "GlmImageImageProcessor":
        """Reads GLM-Image's `processor/` folder (processor_config.json's image_processor entry, else
        preprocessor_config.json); a key it lacks takes transformers' class default. With `vision`,
        the patch size and channels are checked against the vision encoder's."""
        found = _image_processor_config(pathlib.Path(path))
        if found is None:
            raise ValueError(f"no preprocessor_config.json in {path}")
        cfg, file = found
        kind = cfg.get("image_processor_type")
        if kind is not None and kind not in IMAGE_PROCESSOR_TYPES:
            raise ValueError(f"{file}: image_processor_type={kind!r} is not a GLM-Image image processor "
                             f"(expected one of {IMAGE_PROCESSOR_TYPES})")
        for key, allowed in (("do_resize", True), ("do_rescale", True), ("do_normalize", True),
                             ("do_convert_rgb", True), ("resample", 3)):  # 3: PIL BICUBIC
            if key in cfg and cfg[key] != allowed:
                raise ValueError(f"{file}: {key}={cfg[key]!r} is not supported (only {allowed!r})")
        get = lambda key: cfg[key] if cfg.get(key) is not None else HF_DEFAULTS[key]  # noqa: E731
        for key, why in (("temporal_patch_size", "the vision encoder takes single frames"),
                         ("merge_size", "the VQ tokenizer gives one code per patch")):
            if get(key) != 1:
                raise ValueError(f"{file}: {key}={get(key)!r} is not supported: {why} (only 1)")
        size = get("size")
        if not isinstance(size, dict):
            raise ValueError(f"{file}: size must be an object with shortest_edge and longest_edge, got {size!r}")
        # As transformers' __init__: min_pixels / max_pixels, when set, override size's entries.
        min_pixels = cfg["min_pixels"] if cfg.get("min_pixels") is not None else size.get("shortest_edge")
        max_pixels = cfg["max_pixels"] if cfg.get("max_pixels") is not None else size.get("longest_edge")
        mean, std, rescale = get("image_mean"), get("image_std"), get("rescale_factor")
        for key, values in (("image_mean", mean), ("image_std", std)):
            if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(map(_is_finite, values))):
                raise ValueError(f"{file}: {key} must be 3 finite numbers (RGB), got {values!r}")
        if 0 in std:
            raise ValueError(f"{file}: image_std must be non-zero, got {std!r}")
        if not (_is_finite(rescale) and rescale > 0):
            raise ValueError(f"{file}: rescale_factor must be a positive number, got {rescale!r}")
        patch_size = _positive_int(get("patch_size"), f"{file}: patch_size")
        if vision is not None:
            if patch_size != vision.patch_size:
                raise ValueError(f"{file}: patch_size={patch_size} != the vision encoder's "
                                 f"vision_config.patch_size {vision.patch_size}")
            if vision.in_channels != 3:
                raise ValueError(f"vision_config.in_channels {vision.in_channels} is not supported (RGB images: 3)")
        return cls(_positive_int(min_pixels, f"{file}: size.shortest_edge (or min_pixels)"),
                   _positive_int(max_pixels, f"{file}: size.longest_edge (or max_pixels)"),
                   patch_size, mean, std, rescale, backend)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size, self.min_pixels, self.max_pixels)

    def num_tokens(self, grid: tuple[int, int, int]) -> int:
        """Prompt tokens (<|image|> placeholders, then codes) of an image with this patch grid:
        t*h*w / merge_size², with merge_size 1."""
        t, h, w = grid
        return t * h * w

    def preprocess_one(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (uint8 patch pixels [gh*gw, 3*P*P], row vector order (c, py, px), (1, gh, gw))."""
        rgb = to_rgb(load_image(image))
        h, w = self.resized_size(rgb.height, rgb.width)
        if self.backend == "pil":  # transformers' PIL backend resizes even to the same size
            resized = np.asarray(rgb.resize((w, h), resample=Image.Resampling.BICUBIC), dtype=np.uint8)
        else:
            resized = resize_torchvision(np.asarray(rgb, dtype=np.uint8), h, w)
        return patch_pixels(resized, self.patch_size, 1), (1, h // self.patch_size, w // self.patch_size)

    def normalize_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 patch pixels [N, 3*P*P] -> float32 pixel values [N, 3*P*P] on their device."""
        pp = self.patch_size**2
        if pixels.dtype != torch.uint8 or pixels.dim() != 2 or pixels.shape[1] != 3 * pp:
            raise ValueError(f"patch pixels must be uint8 [N, {3 * pp}], got {pixels.dtype} {tuple(pixels.shape)}")
        table = self._tables.get(pixels.device)
        if table is None:
            table = self._tables[pixels.device] = self._table.to(pixels.device)
        channel_base = torch.arange(0, 3 * 256, 256, device=pixels.device)[:, None]  # [3, 1]
        return table[pixels.view(-1, 3, pp).int() + channel_base].view(-1, 3 * pp)

    def __call__(self, images: Sequence[ImageLike] | ImageLike, normalize: bool = True) -> dict[str, torch.Tensor]:
        """images -> {"pixel_values": float32 [N, 3*P*P] (with normalize=False their uint8 pixels,
        4x fewer bytes to upload; normalize_patches on the device gives the same floats),
        "image_grid_thw": int64 [n, 3]}."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        patches, grids = zip(*(self.preprocess_one(image) for image in images))
        pixels = torch.from_numpy(np.concatenate(patches, axis=0))
        return {"pixel_values": self.normalize_patches(pixels) if normalize else pixels,
                "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}

    def __repr__(self) -> str:
        return (f"GlmImageImageProcessor(min_pixels={self.min_pixels}, max_pixels={self.max_pixels}, "
                f"patch_size={self.patch_size}, image_mean={self.image_mean}, image_std={self.image_std}, "
                f"rescale_factor={self.rescale_factor}, backend={self.backend!r})")
