"""GLM-OCR image preprocessing: load -> RGB -> smart_resize -> bicubic resize -> normalize -> patchify.

Two backends, named as in transformers v5 (`ImageProcessor(backend=...)`):

* "torchvision" (default): equal to transformers' `Glm46VImageProcessor`, the class `AutoProcessor`
  picks whenever torchvision is installed (every GPU install, vLLM, SGLang). The uint8 RGB image is
  resized as a uint8 [1, 3, H, W] tensor by torch's antialiased bicubic kernel (what torchvision's
  `resize(..., BICUBIC, antialias=True)` calls on CPU), then normalized as (x - m_c) / s_c in fp32 with
  m_c = fp32(mean_c) * 255 and s_c = fp32(std_c) * 255 rounded in fp32, as transformers fuses
  rescale into normalize. Pixel values are bit-identical to transformers'.
* "pil": equal to transformers' `Glm46VImageProcessorPil`: `Image.resize((w, h), BICUBIC)` on the
  8-bit RGB PIL image (bit-identical uint8 pixels), normalized as (x - fp32(255*mean_c)) /
  fp32(255*std_c) in one fp32 step; transformers rescales in float64 and normalizes in fp32 in two
  steps, so pixel values agree within 4e-7.

The two backends' resized pixels differ by 1-2 uint8 levels in many places (0.015-0.03 in pixel
values), enough to change greedy output, so the backend must match the reference compared against.
The torchvision resize makes the very call torchvision makes, so it matches on every CPU kind
(torch picks the same uint8 kernel for both). Grids (smart_resize) and RGB conversion are the same
for both backends.

`patchify` uses the C++ extension `glmrt._C` when it was built and `patchify_numpy` otherwise; the
two give bit-identical results. The engine does not upload those float32 rows: it takes the raw
uint8 pixels of each patch (`patch_pixels`, [N, C*P*P], 8x fewer bytes than float32 with T = 2)
and `ImageProcessor.normalize_patches` turns them into the same float32 rows on the device, with
the same per-(channel, value) table, so the values are bit-identical.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import pathlib
import urllib.parse
import warnings
from collections.abc import Sequence
from typing import IO, Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

try:  # optional C++ extension
    from glmrt import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _C = None

HAS_CPP = _C is not None and hasattr(_C, "patchify") and hasattr(_C, "patch_pixels")

# GLM-OCR defaults (the checkpoint's preprocessor_config.json).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 12544
MAX_PIXELS = 9633792
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
MAX_ASPECT_RATIO = 200

BACKENDS = ("torchvision", "pil")
# Config files and the processor class names they may carry (older and current Hub revisions).
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
IMAGE_PROCESSOR_TYPES = tuple(
    base + suffix for base in ("Glm46VImageProcessor", "GlmOcrImageProcessor") for suffix in ("", "Fast", "Pil")
)

ImageLike = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview]

__all__ = [
    "BACKENDS",
    "HAS_CPP",
    "IMAGE_FORMATS",
    "ImageFormatError",
    "ImageProcessor",
    "load_image",
    "open_image",
    "patch_pixels",
    "patch_pixels_numpy",
    "patchify",
    "patchify_numpy",
    "resize_torchvision",
    "smart_resize",
    "to_rgb",
]


# --------------------------------------------------------------------------------------- loading
# The formats an image is decoded from (paths, bytes, data URIs; in glmrt ocr, glmrt parse, glmrt
# serve and the Python API): Pillow plugins that parse the bytes themselves. Any other format is
# refused before its plugin sees the bytes: Pillow's EPS plugin hands them to Ghostscript, and no
# input may start a program.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")


class ImageFormatError(ValueError):
    """An image in a format outside IMAGE_FORMATS; the message names the format."""


def open_image(fp: str | os.PathLike | IO[bytes]) -> Image.Image:
    """`Image.open` (the header only) limited to IMAGE_FORMATS. Raises ImageFormatError for an
    image of another format, PIL's UnidentifiedImageError for bytes of no known format or a
    broken image of an allowed one."""
    try:
        return Image.open(fp, formats=IMAGE_FORMATS)
    except Image.UnidentifiedImageError:
        found = _signature_format(fp)
        if found is None or found in IMAGE_FORMATS:
            raise
        raise ImageFormatError(f"{found} images are not accepted (only {', '.join(IMAGE_FORMATS)})") from None


def _signature_format(fp: str | os.PathLike | IO[bytes]) -> str | None:
    """The Pillow format whose signature the first 16 bytes carry (what Image.open reads to pick a
    plugin), or None: prefix tests only, no plugin opens the file."""
    if isinstance(fp, (str, os.PathLike)):
        with open(fp, "rb") as f:
            prefix = f.read(16)
    else:
        fp.seek(0)
        prefix = fp.read(16)
    Image.init()  # every plugin's signature test registered
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if accept is not None and accept(prefix):
            return fmt
    return None


def _decode(data: bytes, what: str, exif_transpose: bool = True) -> Image.Image:
    """Decodes encoded image bytes fully, refusing decompression bombs before pixel allocation."""
    if not data:
        raise ValueError(f"cannot decode {what}: it is empty")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; both are refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = open_image(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"refusing to decode {what}: decompression bomb ({exc})") from exc
    except ImageFormatError as exc:
        raise ImageFormatError(f"refusing to decode {what}: {exc}") from None
    except Image.UnidentifiedImageError as exc:
        raise ValueError(f"cannot decode {what}: not a recognised image format") from exc
    except Exception as exc:  # any failure on untrusted data means it is undecodable
        raise ValueError(f"cannot decode {what}: corrupt image header ({type(exc).__name__}: {exc})") from exc
    _check_pixel_budget(img.size, what)  # belt and braces, independent of the warnings filters
    try:
        img.load()
        if exif_transpose:  # as transformers.image_utils.load_image does for paths/URLs/base64
            ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:
        raise ValueError(
            f"cannot decode {what}: corrupt or truncated image data ({type(exc).__name__}: {exc})"
        ) from exc
    return img


def _check_pixel_budget(size: tuple[int, int], what: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    w, h = size
    if limit is not None and w * h > limit:
        raise ValueError(
            f"refusing to decode {what}: decompression bomb ({w}x{h} = {w * h} pixels exceeds "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit})"
        )


# Data URI media types of a whole document (glmrt serve's POST /glmocr/parse): the glmocr SDK's MaaS
# client sends application/pdf, or application/octet-stream for bytes it cannot sniff; the bytes decide.
DOCUMENT_MEDIA_TYPES = ("image/", "application/pdf", "application/octet-stream")


def decode_data_uri(uri: str, documents: bool = False) -> bytes:
    """The bytes of a `data:` URI (base64 or percent-encoded); ValueError if malformed or not an
    image type (with `documents`, not one of DOCUMENT_MEDIA_TYPES); an empty type is accepted."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ValueError("malformed data URI: no ',' separating header and data")
    params = header[len("data:"):].split(";")
    if params[0] and not params[0].lower().startswith(DOCUMENT_MEDIA_TYPES if documents else "image/"):
        raise ValueError(f"data URI media type {params[0]!r} is not an image{' or PDF' if documents else ''} type")
    if any(p.strip().lower() == "base64" for p in params[1:]):
        compact = "".join(urllib.parse.unquote(payload).split())
        try:
            return base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"data URI payload is not valid base64 ({exc})") from exc
    return urllib.parse.unquote_to_bytes(payload)


def load_image(image: ImageLike, exif_transpose: bool = True) -> Image.Image:
    """Returns a PIL image from a PIL image, a file path, encoded bytes or a `data:` URI.

    Decoded inputs are turned upright by their EXIF orientation tag (`exif_transpose`), as
    transformers.image_utils.load_image does for paths, URLs and base64; a PIL image is returned as
    is (it is already decoded, so neither orientation nor the pixel limit is applied to it).
    Undecodable input and images over `PIL.Image.MAX_IMAGE_PIXELS` raise ValueError; a missing
    file raises FileNotFoundError. Nothing is fetched from the network.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), "image bytes", exif_transpose)
    if isinstance(image, str) and image[:5].lower() == "data:":
        return _decode(decode_data_uri(image), "data URI", exif_transpose)
    if isinstance(image, str) and image.split("://", 1)[0].lower() in ("http", "https", "ftp", "file"):
        raise ValueError("image URLs are not fetched; pass a local path, bytes or a data URI")
    if isinstance(image, (str, os.PathLike)):
        path = pathlib.Path(image)
        shown = _short(str(path))
        try:
            is_file = path.is_file()
        except (OSError, ValueError) as exc:  # e.g. a name too long (a bare base64 string), a NUL byte
            raise ValueError(f"not a usable image path or data URI: {shown} ({exc.__class__.__name__})") from exc
        if not is_file:
            raise FileNotFoundError(f"image file not found: {shown}")
        return _decode(path.read_bytes(), f"image file {shown}", exif_transpose)
    raise TypeError(
        f"unsupported image input {type(image).__name__}; expected PIL.Image, path, bytes or data URI"
    )


def _short(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts to RGB exactly like transformers.image_transforms.convert_to_rgb.

    An image with an alpha band or a `transparency` info entry is converted to RGBA and composited
    onto opaque white; any other mode is `convert("RGB")` (a no-op copy for RGB).
    """
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------- resize
def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    temporal: int = TEMPORAL_PATCH_SIZE,
) -> tuple[int, int]:
    """Target (height, width), multiples of `factor`, for one image (transformers' smart_resize).

    The pixel budget [min_pixels, max_pixels] applies to a `temporal`-frame clip, i.e. to
    temporal*h*w; a single image counts as `temporal` frames.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio}")
    h_bar = round(height / factor) * factor  # Python round: half to even, as transformers
    w_bar = round(width / factor) * factor
    frames = temporal  # num_frames == temporal_factor for one image: t_bar == temporal
    if frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_torchvision(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 HWC -> uint8 [height, width, C], bit-identical to torchvision's CPU
    `resize(uint8 CHW tensor, [height, width], BICUBIC, antialias=True)`.

    On CPU torchvision hands the uint8 tensor, as a contiguous [1, C, H, W] batch, straight to
    torch's native uint8 antialiased bicubic kernel (which rounds and saturates to [0, 255] itself)
    and returns the input unchanged when the size does not change; this makes the same call.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"resize_torchvision: image must be uint8 HWC, got {image.dtype} with {image.ndim} dims")
    if image.shape[:2] == (height, width):
        return image
    chw = torch.tensor(image).permute(2, 0, 1).contiguous()  # a copy: PIL-backed arrays are read-only
    out = torch.nn.functional.interpolate(
        chw[None], size=[height, width], mode="bicubic", align_corners=False, antialias=True
    )
    return out[0].permute(1, 2, 0).contiguous().numpy()


def _torchvision_normalize_stats(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean/std to give `patchify` so that it normalizes exactly like the torchvision backend.

    That backend fuses rescale (1/255) into normalize by scaling fp32(mean_c) and fp32(std_c) by 255
    in fp32, which can be 1 ulp away from patchify's fp32(255 * mean_c) computed in double. Those fp32
    products divided by 255 in double come back exactly through patchify's fp32(255.0 * value): the
    double round trip is off by far less than half an fp32 ulp.
    """
    shift = np.asarray(mean, dtype=np.float32) * np.float32(255.0)
    scale = np.asarray(std, dtype=np.float32) * np.float32(255.0)
    return tuple(float(v) / 255.0 for v in shift), tuple(float(v) / 255.0 for v in scale)


# -------------------------------------------------------------------------------------- patchify
def _normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[C, 256] fp32 table of (v - f32(255*mean_c)) / f32(255*std_c); same ops as the C++ one."""
    shift = (255.0 * np.asarray(mean, dtype=np.float64)).astype(np.float32)
    scale = (255.0 * np.asarray(std, dtype=np.float64)).astype(np.float32)
    values = np.arange(256, dtype=np.float32)
    return (values[None, :] - shift[:, None]) / scale[:, None]


def _check_patchify_args(image, mean, std, patch_size, temporal_patch_size, merge_size) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"patchify: image must be a uint8 array, got {getattr(image, 'dtype', type(image))}")
    if image.ndim != 3:
        raise ValueError(f"patchify: image must be HWC (3 dims), got {image.ndim} dims")
    h, w, c = image.shape
    if c < 1:
        raise ValueError("patchify: image has no channels")
    if len(mean) != c or len(std) != c:
        raise ValueError(
            f"patchify: mean and std need {c} values (one per channel), got {len(mean)} and {len(std)}"
        )
    if not all(math.isfinite(m) for m in mean):
        raise ValueError("patchify: mean must be finite")
    if not all(math.isfinite(s) and s != 0 for s in std):
        raise ValueError("patchify: std must be finite and non-zero")
    if patch_size < 1 or temporal_patch_size < 1 or merge_size < 1:
        raise ValueError("patchify: patch_size, temporal_patch_size and merge_size must be >= 1")
    unit = patch_size * merge_size
    if h < 1 or w < 1 or h % unit or w % unit:
        raise ValueError(
            f"patchify: image size {h}x{w} is not a positive multiple of patch_size*merge_size = {unit}"
        )


def patchify_numpy(
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> np.ndarray:
    """numpy twin of glmrt._C.patchify: uint8 HWC -> float32 [N, C*T*P*P].

    Rows in merge-block-major order (bh, bw, mh, mw), row vector order (c, t, py, px), the T
    temporal copies identical, x = (pixel - 255*mean_c) / (255*std_c) in fp32.
    """
    _check_patchify_args(image, mean, std, patch_size, temporal_patch_size, merge_size)
    h, w, c = image.shape
    p, t, m = patch_size, temporal_patch_size, merge_size
    lut = _normalize_lut(mean, std)
    normed = np.empty((h, w, c), dtype=np.float32)
    for ch in range(c):
        normed[..., ch] = lut[ch][image[..., ch]]
    gh, gw = h // p, w // p
    blocks = normed.reshape(gh // m, m, p, gw // m, m, p, c)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, c, py, px)
    out = np.empty((gh // m, gw // m, m, m, c, t, p, p), dtype=np.float32)
    out[...] = blocks[:, :, :, :, :, None]  # temporal copies
    return out.reshape(gh * gw, c * t * p * p)


def patch_pixels_numpy(image: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE) -> np.ndarray:
    """numpy twin of glmrt._C.patch_pixels: uint8 HWC -> uint8 [N, C*P*P], patchify's rows without
    normalization or temporal copies (row vector order (c, py, px))."""
    c = image.shape[2] if isinstance(image, np.ndarray) and image.ndim == 3 else 0
    _check_patchify_args(image, [0.0] * c, [1.0] * c, patch_size, 1, merge_size)
    h, w, c = image.shape
    p, m = patch_size, merge_size
    blocks = image.reshape(h // p // m, m, p, w // p // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
    return np.ascontiguousarray(blocks).reshape((h // p) * (w // p), c * p * p)


def patch_pixels(image: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE) -> np.ndarray:
    """uint8 HWC image -> uint8 [N, C*P*P]; C++ when built, else `patch_pixels_numpy`."""
    if not HAS_CPP:
        return patch_pixels_numpy(image, patch_size, merge_size)
    if isinstance(image, np.ndarray) and not image.flags.c_contiguous:
        image = np.ascontiguousarray(image)
    return _C.patch_pixels(image, patch_size, merge_size)


def patchify(
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> np.ndarray:
    """uint8 HWC image -> float32 [N, C*T*P*P]; C++ when built, else `patchify_numpy`."""
    if not HAS_CPP:
        return patchify_numpy(image, mean, std, patch_size, temporal_patch_size, merge_size)
    if isinstance(image, np.ndarray) and not image.flags.c_contiguous:
        image = np.ascontiguousarray(image)
    return _C.patchify(
        image, [float(v) for v in mean], [float(v) for v in std], patch_size, temporal_patch_size, merge_size
    )


# ------------------------------------------------------------------------------------- processor
def read_config_json(path: pathlib.Path) -> dict[str, Any] | None:
    """A JSON object from a checkpoint config file; None if the file is absent."""
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _image_processor_config(path: pathlib.Path) -> tuple[dict[str, Any], pathlib.Path] | None:
    """The image processor settings and the file they came from, with transformers' precedence: the
    `image_processor` entry of processor_config.json (current Hub revisions), else
    preprocessor_config.json; None if neither has them."""
    processor_file = path / PROCESSOR_CONFIG
    nested = (read_config_json(processor_file) or {}).get("image_processor")
    if nested is not None:
        if not isinstance(nested, dict):
            raise ValueError(f"{processor_file}: image_processor must be a JSON object, got {type(nested).__name__}")
        return nested, processor_file
    preprocessor_file = path / PREPROCESSOR_CONFIG
    cfg = read_config_json(preprocessor_file)
    return None if cfg is None else (cfg, preprocessor_file)


class ImageProcessor:
    """GLM-OCR image processor: list of images -> pixel_values [sum N, 1176] + image_grid_thw [n, 3].

    `backend` is "torchvision" (transformers' default `Glm46VImageProcessor`) or "pil"
    (`Glm46VImageProcessorPil`); see the module docstring for what each computes.
    """

    def __init__(
        self,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        image_mean: Sequence[float] = IMAGE_MEAN,
        image_std: Sequence[float] = IMAGE_STD,
        patch_size: int = PATCH_SIZE,
        temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
        merge_size: int = MERGE_SIZE,
        backend: str = "torchvision",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"ImageProcessor.backend must be one of {BACKENDS}, got {backend!r}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (RGB)")
        if min(patch_size, temporal_patch_size, merge_size) < 1:
            raise ValueError("patch_size, temporal_patch_size and merge_size must be >= 1")
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.backend = backend
        # What patchify gets: it normalizes as (x - fp32(255*mean)) / fp32(255*std).
        if backend == "torchvision":
            self._patchify_mean, self._patchify_std = _torchvision_normalize_stats(self.image_mean, self.image_std)
        else:
            self._patchify_mean, self._patchify_std = self.image_mean, self.image_std
        self._normalize_tables: dict[torch.device, torch.Tensor] = {}  # normalize_patches' table per device

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backend: str = "torchvision") -> "ImageProcessor":
        """Reads a checkpoint directory's image processor settings (processor_config.json's
        `image_processor` entry, else preprocessor_config.json); GLM-OCR defaults if neither has them."""
        found = _image_processor_config(pathlib.Path(path))
        if found is None:
            return cls(backend=backend)
        cfg, cfg_path = found
        kind = cfg.get("image_processor_type")
        if kind is not None and kind not in IMAGE_PROCESSOR_TYPES:
            raise ValueError(
                f"{cfg_path}: image_processor_type={kind!r} is not a GLM-OCR image processor "
                f"(expected one of {IMAGE_PROCESSOR_TYPES})"
            )
        # Settings this implementation hard-wires: refuse configs that ask for something else.
        unsupported = {
            "do_resize": (True,),
            "do_rescale": (True,),
            "do_normalize": (True,),
            "do_convert_rgb": (True,),
            "resample": (3,),  # PIL BICUBIC
        }
        for key, allowed in unsupported.items():
            if key in cfg and cfg[key] not in allowed:
                raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (only {allowed[0]!r})")
        if "rescale_factor" in cfg and not math.isclose(cfg["rescale_factor"], 1 / 255, rel_tol=1e-6):
            raise ValueError(f"{cfg_path}: rescale_factor={cfg['rescale_factor']!r} is not supported (only 1/255)")
        size = cfg.get("size") or {}
        min_pixels = size.get("shortest_edge", cfg.get("min_pixels", MIN_PIXELS))
        max_pixels = size.get("longest_edge", cfg.get("max_pixels", MAX_PIXELS))
        return cls(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            image_mean=cfg.get("image_mean", IMAGE_MEAN),
            image_std=cfg.get("image_std", IMAGE_STD),
            patch_size=cfg.get("patch_size", PATCH_SIZE),
            temporal_patch_size=cfg.get("temporal_patch_size", TEMPORAL_PATCH_SIZE),
            merge_size=cfg.get("merge_size", MERGE_SIZE),
            backend=backend,
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(
            height, width, self.factor, self.min_pixels, self.max_pixels, self.temporal_patch_size
        )

    def resize(self, rgb: Image.Image, height: int, width: int) -> np.ndarray:
        """RGB PIL image -> uint8 [height, width, 3], as the backend's transformers class resizes it."""
        if self.backend == "pil":  # the PIL backend always resizes, even to the same size
            return np.asarray(rgb.resize((width, height), resample=Image.Resampling.BICUBIC), dtype=np.uint8)
        return resize_torchvision(np.asarray(rgb, dtype=np.uint8), height, width)

    def preprocess_one(self, image: ImageLike, normalize: bool = True) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches, (1, gh, gw)): float32 [gh*gw, 3*T*P*P] pixel values, or with
        normalize=False their raw uint8 pixels [gh*gw, 3*P*P] (see `normalize_patches`)."""
        rgb = to_rgb(load_image(image))
        h, w = self.resized_size(rgb.height, rgb.width)
        resized = self.resize(rgb, h, w)
        if normalize:
            patches = patchify(resized, self._patchify_mean, self._patchify_std,
                               self.patch_size, self.temporal_patch_size, self.merge_size)
        else:
            patches = patch_pixels(resized, self.patch_size, self.merge_size)
        return patches, (1, h // self.patch_size, w // self.patch_size)

    def normalize_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3*P*P] patch pixels (`normalize=False`) -> float32 pixel values [N, 3*T*P*P]
        on their device, bit-identical to `normalize=True` (the same table, gathered)."""
        pp = self.patch_size**2
        if pixels.dtype != torch.uint8 or pixels.dim() != 2 or pixels.shape[1] != 3 * pp:
            raise ValueError(f"patch pixels must be uint8 [N, {3 * pp}], got {pixels.dtype} {tuple(pixels.shape)}")
        lut = self._normalize_tables.get(pixels.device)  # [3 * 256], channel-major
        if lut is None:
            lut = self._normalize_tables[pixels.device] = torch.from_numpy(
                _normalize_lut(self._patchify_mean, self._patchify_std).reshape(-1)).to(pixels.device)
        channel_base = torch.arange(0, 3 * 256, 256, device=pixels.device)[:, None]  # [3, 1]
        values = lut[pixels.view(-1, 3, pp).int() + channel_base]  # [N, 3, P*P]
        t = self.temporal_patch_size
        return values[:, :, None, :].expand(-1, 3, t, pp).reshape(-1, 3 * t * pp)

    def __call__(self, images: Sequence[ImageLike] | ImageLike, normalize: bool = True) -> dict[str, torch.Tensor]:
        """images -> {"pixel_values": float32 [N, 3*T*P*P] (uint8 [N, 3*P*P] with normalize=False),
        "image_grid_thw": int64 [n, 3]}."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        patches, grids = [], []
        for image in images:
            p, grid = self.preprocess_one(image, normalize)
            patches.append(p)
            grids.append(grid)
        pixel_values = patches[0] if len(patches) == 1 else np.concatenate(patches, axis=0)
        return {
            "pixel_values": torch.from_numpy(pixel_values),
            "image_grid_thw": torch.tensor(grids, dtype=torch.int64),
        }

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(min_pixels={self.min_pixels}, max_pixels={self.max_pixels}, "
            f"image_mean={self.image_mean}, image_std={self.image_std}, patch_size={self.patch_size}, "
            f"temporal_patch_size={self.temporal_patch_size}, merge_size={self.merge_size}, "
            f"backend={self.backend!r})"
        )
