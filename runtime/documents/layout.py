"""PP-DocLayoutV3 layout analysis for `glmrt parse`, step for step as the glmocr SDK does it.

page (PIL) -> RGB -> `preprocess` (800x800, torch's uint8 bicubic, /255) -> transformers'
PPDocLayoutV3ForObjectDetection -> `_raw_detections` (transformers' post_process_object_detection:
top-k over queries x classes, reading order from the order logits, a polygon per box from its mask,
with the SDK's patched polygon step) -> `_layout_postprocess` (the SDK's apply_layout_postprocess:
NMS, large-image filter, containment merge, unclip, reading order, clamp) -> `_regions` (label ->
task, abandoned labels dropped, boxes normalised to 0..1000) -> `LayoutRegion`s.

Only the model comes from transformers at run time: its image processor needs torchvision and its
polygon step needs OpenCV, so both are reimplemented here with numpy/torch and checked against
them in tests/test_layout.py (pixel values bit-identical; the OpenCV calls it makes --
findContours external/simple, contourArea, arcLength, approxPolyDP, nearest resize -- follow
OpenCV 4.x's algorithms and rounding step for step). The two slow ones, contour tracing and
approxPolyDP, run in C++ (glmrt._C, csrc/contours.cpp) when it was built, with the Python twins
here as the reference; a box's polygon is traced only when post-processing keeps the box. Where
the SDK sorts (np.argsort, torch.sort, torch.topk) the same call is made on the same arrays, so
ties resolve the same way.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..loader import HubError
from . import DEFAULT_LAYOUT_MODEL as DEFAULT_MODEL  # defined with the package, for the CLI

try:  # optional C++ extension: the contour tracing below, 100x faster and off the GIL
    from glmrt import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _C = None

HAS_CPP_CONTOURS = _C is not None and hasattr(_C, "external_contours") and hasattr(_C, "approx_poly_dp")
logger = logging.getLogger(__name__)

# --- the SDK's layout defaults (glmocr config.yaml `pipeline.layout`, layout_postprocess_utils) ---
# The SDK's id2label (config.yaml). It, not the checkpoint's, names the classes, as in the SDK.
LABELS = ("abstract", "algorithm", "aside_text", "chart", "content", "display_formula", "doc_title",
          "figure_title", "footer", "footer_image", "footnote", "formula_number", "header",
          "header_image", "image", "inline_formula", "number", "paragraph_title", "reference",
          "reference_content", "seal", "table", "text", "vertical_text", "vision_footnote")
TASKS = ("text", "table", "formula", "skip")  # "skip": kept (figures) but not recognised
# label_task_mapping: "abandon" labels are dropped before indexing.
LABEL_TASK = {
    **{label: "text" for label in ("abstract", "algorithm", "content", "doc_title", "figure_title",
                                   "paragraph_title", "reference_content", "text", "vertical_text",
                                   "vision_footnote", "seal", "formula_number")},
    "table": "table", "display_formula": "formula", "inline_formula": "formula",
    "chart": "skip", "image": "skip",
    **{label: "abandon" for label in ("header", "footer", "number", "footnote", "aside_text",
                                      "reference", "footer_image", "header_image")},
}
THRESHOLD = 0.3  # score threshold; also binarises the masks the polygons come from
BATCH_SIZE = 8  # images per forward (LayoutConfig's default)
NMS_IOU_SAME, NMS_IOU_DIFF = 0.6, 0.98  # what apply_layout_postprocess passes to its nms()
# An "image" box covering more of the page than this is dropped (when the page has other boxes).
LARGE_IMAGE_AREA_LANDSCAPE, LARGE_IMAGE_AREA_PORTRAIT = 0.82, 0.93
CONTAINED = 0.8  # box i is inside box j when this share of i's area lies in j
# layout_merge_bboxes_mode: "large" drops boxes inside a box of that class, "small" drops boxes
# that contain one of that class (only "reference" is "small").
MERGE_MODES = {cls: "small" if LABELS[cls] == "reference" else "large" for cls in range(len(LABELS))}
PRESERVED = frozenset(LABELS.index(label) for label in ("image", "seal", "chart"))  # never merged away
UNCLIP_RATIO = (1.0, 1.0)  # layout_unclip_ratio (width, height): applied, though it changes nothing

# --- transformers' PPDocLayoutV3ImageProcessor defaults, the only configuration implemented ---
INPUT_SIZE = (800, 800)  # (height, width)
MASK_STRIDE = 4  # out_masks are at 1/4 of the input resolution
_PROCESSOR_DEFAULTS = {"size": {"height": 800, "width": 800}, "resample": 3, "do_resize": True,
                       "do_rescale": True, "do_normalize": True, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}
_RESCALE = 1 / 255


def preprocess(images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """pixel_values [B, 3, 800, 800] fp32, bit-identical to PPDocLayoutV3ImageProcessor's on CPU.

    The processor resizes the uint8 [1, 3, H, W] tensor with torch's uint8 bicubic kernel
    (antialias off, as torchvision's resize passes uint8 straight through on CPU), then divides by
    fp32(1 * 255) after subtracting 0 -- its rescale fused into normalize. The kernel runs on CPU
    here too: the float path a GPU would take rounds differently.
    """
    if not images:
        raise ValueError("images: expected at least one page image")
    batch = []
    for image in images:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()[None]  # [1, 3, H, W]
        if tuple(pixels.shape[-2:]) != INPUT_SIZE:
            pixels = torch.nn.functional.interpolate(pixels, size=INPUT_SIZE, mode="bicubic",
                                                     align_corners=False, antialias=False)
        batch.append(pixels)
    mean = (torch.tensor(_PROCESSOR_DEFAULTS["image_mean"]) * (1.0 / _RESCALE)).view(-1, 1, 1)
    std = (torch.tensor(_PROCESSOR_DEFAULTS["image_std"]) * (1.0 / _RESCALE)).view(-1, 1, 1)
    return {"pixel_values": torch.cat(batch).float().sub_(mean).div_(std)}


@dataclass
class LayoutRegion:
    """One region of a page, as the SDK's layout detector reports it."""

    index: int  # reading order on the page, 0-based, after abandoned regions are dropped
    label: str  # PP-DocLayoutV3 label, e.g. "text", "table", "display_formula", "image"
    task: str  # "text" | "table" | "formula" | "skip"
    score: float
    bbox_2d: list[int]  # [x1, y1, x2, y2], each int(pixel / side * 1000)
    polygon: list[list[int]] = field(default_factory=list)  # [[x, y], ...] normalised like bbox_2d

    def to_dict(self) -> dict:
        """The SDK's region dict (its keys, in its order)."""
        return {"index": self.index, "label": self.label, "score": self.score, "bbox_2d": self.bbox_2d,
                "polygon": self.polygon, "task_type": self.task}


def region_box(size: tuple[int, int], bbox_2d: list[int]) -> tuple[int, int, int, int]:
    """The region's box (x1, y1, x2, y2) in the pixels of a page of `size`, as the SDK crops it."""
    width, height = size
    x1, y1, x2, y2 = (int(v * side / 1000) for v, side in zip(bbox_2d, (width, height, width, height)))
    return x1, y1, x2, y2


def crop_region(image: Image.Image, bbox_2d: list[int]) -> Image.Image:
    """The region's pixels as the SDK crops them for recognition (crop_image_region, no polygon)."""
    return image.crop(region_box(image.size, bbox_2d))


class LayoutDetector:
    """PP-DocLayoutV3 (transformers' model) with the SDK's pre- and post-processing."""

    def __init__(self, model: torch.nn.Module, *, threshold: float = THRESHOLD, batch_size: int = BATCH_SIZE,
                 threshold_by_class: dict[int | str, float] | None = None, checkpoint: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if model.config.num_labels != len(LABELS):
            raise ValueError(f"model config num_labels: expected {len(LABELS)} PP-DocLayoutV3 classes, "
                             f"got {model.config.num_labels}")
        self.model = model
        self.device = next(model.parameters()).device
        self.threshold = threshold
        self.batch_size = batch_size
        self.threshold_by_class = _class_thresholds(threshold_by_class or {})
        self.checkpoint = checkpoint  # the directory it was loaded from (recorded with glmrt parse's progress)

    @classmethod
    def from_pretrained(cls, model: str | Path = DEFAULT_MODEL, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, threshold: float = THRESHOLD,
                        batch_size: int = BATCH_SIZE,
                        threshold_by_class: dict[int | str, float] | None = None) -> "LayoutDetector":
        """A local checkpoint directory or a Hub id (json + safetensors fetched, never pickles)."""
        try:
            from transformers import PPDocLayoutV3ForObjectDetection
        except ImportError as exc:
            raise ImportError("layout analysis needs transformers: pip install 'glmrt[documents]'") from exc
        path = resolve_checkpoint(model)
        _check_processor_config(path)
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        # fp32 on every device, as the SDK runs it: bf16 moves scores across the 0.3 threshold, box
        # edges by pixels and the order votes, and the model is small enough for fp32 to be cheap.
        net = PPDocLayoutV3ForObjectDetection.from_pretrained(path, dtype=dtype or torch.float32,
                                                              use_safetensors=True)
        return cls(net.to(device).eval(), threshold=threshold, batch_size=batch_size,
                   threshold_by_class=threshold_by_class, checkpoint=str(path))

    def detect(self, images: list[Image.Image]) -> list[list[LayoutRegion]]:
        """Regions of each page in reading order (the SDK's PPDocLayoutDetector.process)."""
        pages = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        results = []
        for start in range(0, len(pages), self.batch_size):
            chunk = pages[start:start + self.batch_size]
            raws = self._detect_raw(chunk)
            if self.threshold_by_class:
                raws = [_filter_by_class(raw, self.threshold, self.threshold_by_class) for raw in raws]
            for page, raw in zip(chunk, raws):
                results.append(_regions(_layout_postprocess(raw, *page.size), *page.size))
        return results

    def _pre_threshold(self) -> float:
        """The score (and mask) threshold of the first pass: the lowest one configured."""
        return min(self.threshold, *self.threshold_by_class.values()) if self.threshold_by_class else self.threshold

    def _forward(self, pages: list[Image.Image]) -> tuple:
        """The model's outputs for a batch of RGB pages, and the pages' sizes [B, (h, w)]."""
        pixel_values = preprocess(pages)["pixel_values"].to(self.device, self.model.dtype)
        with torch.inference_mode():
            outputs = self.model(pixel_values=pixel_values)
        return outputs, torch.tensor([page.size[::-1] for page in pages], device=self.device)

    def _raw(self, outputs, sizes: torch.Tensor) -> list[_RawDetections]:
        return _raw_detections(outputs.logits, outputs.pred_boxes, outputs.order_logits, outputs.out_masks,
                               sizes, self._pre_threshold())

    def _detect_raw(self, pages: list[Image.Image]) -> list[_RawDetections]:
        """As the SDK: if post-processing a batch fails, each page is run again alone; a page that
        still fails has no regions (logged) and the others are kept."""
        outputs, sizes = self._forward(pages)
        try:
            return self._raw(outputs, sizes)
        except Exception as exc:  # noqa: BLE001 -- the SDK's fallback
            logger.warning("layout post-processing failed for a batch, retrying page by page: %s", exc)
        raws = []
        for i, page in enumerate(pages):
            try:
                raws.extend(self._raw(*self._forward([page])))
            except Exception as exc:  # noqa: BLE001
                logger.warning("layout post-processing failed for page %d of the batch: %s", i, exc)
                raws.append(_RawDetections.empty())
        return raws


def check_reference(model: str | Path) -> Path | None:
    """A layout checkpoint reference -> its directory, or None for a Hub id (owner/name); anything
    else raises FileNotFoundError. Nothing is loaded or fetched (the CLI checks its flag with it)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name!r} is neither a checkpoint directory nor a Hub id (owner/name)")
    return None


def resolve_checkpoint(model: str | Path) -> Path:
    """A layout checkpoint reference -> its directory: a local one as is, a Hub id fetched into the
    HF cache (json and safetensors only, never pickles); HubError when that fails."""
    try:
        path = check_reference(model)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model: {exc}") from None
    if path is not None:
        return path
    name = str(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:
        raise HubError(f"could not resolve Hub layout model {name!r}: {exc}") from exc


def _check_processor_config(path: Path) -> None:
    """preprocess() implements the processor's defaults; a checkpoint asking for others is refused."""
    import json

    config_file = path / "preprocessor_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model: {config_file} is missing")
    config = json.loads(config_file.read_text())
    for key, expected in _PROCESSOR_DEFAULTS.items():
        if key in config and config[key] != expected:
            raise ValueError(f"{config_file.name} {key}: only {expected!r} is supported, got {config[key]!r}")
    if not math.isclose(config.get("rescale_factor", _RESCALE), _RESCALE, rel_tol=1e-9):
        raise ValueError(f"{config_file.name} rescale_factor: only 1/255 is supported, got {config['rescale_factor']}")
    for key in ("do_pad", "do_center_crop"):
        if config.get(key):
            raise ValueError(f"{config_file.name} {key}: not supported")


def _class_thresholds(by_class: dict[int | str, float]) -> dict[int, float]:
    thresholds = {}
    for key, value in by_class.items():
        if isinstance(key, str) and key not in LABELS:
            raise ValueError(f"threshold_by_class: unknown label {key!r}")
        thresholds[LABELS.index(key) if isinstance(key, str) else int(key)] = float(value)
    return thresholds


# --------------------------------------------------------------- model outputs -> raw detections


@dataclass
class _RawDetections:
    """One page's detections above the threshold, sorted by reading order (numpy, on CPU)."""

    scores: np.ndarray  # [N] float32
    labels: np.ndarray  # [N] int64 class ids
    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2 in page pixels
    order: np.ndarray  # [N] int64 reading-order rank of the box's query
    polygons: Sequence[np.ndarray | None]  # [K, 2] float page pixels; None where the mask is empty

    @classmethod
    def empty(cls) -> "_RawDetections":
        return cls(np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                   np.zeros(0, np.int64), [])


def _raw_detections(logits: torch.Tensor, pred_boxes: torch.Tensor, order_logits: torch.Tensor,
                    out_masks: torch.Tensor, sizes: torch.Tensor, threshold: float) -> list[_RawDetections]:
    """transformers' post_process_object_detection, op for op on the model's device.

    logits [B, Q, C], pred_boxes [B, Q, 4] (cx, cy, w, h in 0..1), order_logits [B, Q, Q],
    out_masks [B, Q, 200, 200], sizes [B, 2] (height, width) int64.
    """
    # Reading order: query q's rank is how many queries vote to precede it.
    order_scores = order_logits.sigmoid()
    batch, queries, _ = order_scores.shape
    votes = order_scores.triu(diagonal=1).sum(dim=1) + (1.0 - order_scores.transpose(1, 2)).tril(diagonal=-1).sum(dim=1)
    pointers = torch.argsort(votes, dim=1)
    ranks = torch.arange(queries, device=pointers.device, dtype=pointers.dtype).expand(batch, -1)
    order = torch.empty_like(pointers).scatter_(1, pointers, ranks)  # [B, Q]

    centers, dims = torch.split(pred_boxes, 2, dim=-1)
    boxes = torch.cat([centers - 0.5 * dims, centers + 0.5 * dims], dim=-1)
    height, width = sizes.unbind(1)
    boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :]

    # The Q best (query, class) pairs: a query can appear once per class.
    scores, index = torch.topk(logits.sigmoid().flatten(1), queries, dim=-1)
    labels = index % logits.shape[2]
    index = index // logits.shape[2]
    boxes = boxes.gather(1, index.unsqueeze(-1).repeat(1, 1, 4))
    order = order.gather(1, index)

    results = []
    for b in range(batch):
        keep = scores[b] >= threshold
        ranks_kept, by_order = torch.sort(order[b][keep])
        page_boxes = boxes[b][keep][by_order]
        masks = out_masks[b][index[b][keep][by_order]].sigmoid() > threshold  # [N, 200, 200]
        page_boxes_np = page_boxes.cpu().numpy()
        # Mask cells per page pixel, rounded as transformers computes them: `800 / size` on a
        # tensor is reciprocal-then-multiply in torch, which differs from a division in the last bit.
        scale = [np.float32(1) / np.float32(sizes[b, k].item()) * np.float32(INPUT_SIZE[k]) / np.float32(MASK_STRIDE)
                 for k in (1, 0)]
        results.append(_RawDetections(
            scores=scores[b][keep][by_order].cpu().numpy(), labels=labels[b][keep][by_order].cpu().numpy(),
            boxes=page_boxes_np, order=ranks_kept.cpu().numpy(),
            polygons=_MaskPolygons(page_boxes_np, masks.cpu().numpy(), scale)))
    return results


class _MaskPolygons(Sequence):
    """Each box's polygon from its mask (`_mask_polygon`), computed the first time it is asked for:
    post-processing looks up those of the boxes it keeps only, a few of the boxes above the
    threshold, and tracing a mask is the slowest step of the layout analysis."""

    def __init__(self, boxes: np.ndarray, masks: np.ndarray, scale: list[np.float32]):
        self._boxes, self._masks, self._scale = boxes, masks, scale  # [N, 4], [N, 200, 200] bool
        self._traced: dict[int, np.ndarray | None] = {}

    def __len__(self) -> int:
        return len(self._boxes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i not in self._traced:
            self._traced[i] = _mask_polygon(self._boxes[i], self._masks[i], self._scale)
        return self._traced[i]

    def select(self, keep: np.ndarray) -> "_MaskPolygons":
        return _MaskPolygons(self._boxes[keep], self._masks[keep], self._scale)


def _filter_by_class(raw: _RawDetections, threshold: float, by_class: dict[int, float]) -> _RawDetections:
    """The SDK's per-class thresholds (classes not listed keep `threshold`), compared in fp32."""
    limits = np.full_like(raw.scores, threshold)
    for cls, limit in by_class.items():
        limits[raw.labels == cls] = limit
    keep = raw.scores >= limits
    polygons = (raw.polygons.select(keep) if isinstance(raw.polygons, _MaskPolygons)
                else [p for p, k in zip(raw.polygons, keep) if k])
    return _RawDetections(raw.scores[keep], raw.labels[keep], raw.boxes[keep], raw.order[keep], polygons)


# ------------------------------------------------------ polygons (what the SDK does with OpenCV)


def _mask_polygon(box: np.ndarray, mask: np.ndarray, scale: list[np.float32]) -> np.ndarray | None:
    """A box's outline from its mask: the SDK's patched _extract_polygon_points_by_masks.

    box [4] float32 page pixels; mask [200, 200] bool; scale: mask cells per page pixel (x, y).
    The mask under the box is stretched (nearest) to the box's integer size, its largest outer
    contour simplified (approxPolyDP, 0.4% of the perimeter) and 45-degree corners squared off.
    Returns [K, 2] page pixels; the box's corners when the mask gives fewer than 4 points, None when
    the mask under the box is empty.
    """
    x1, y1, x2, y2 = (int(v) for v in box.astype(np.int32))
    w, h = x2 - x1, y2 - y1
    rect = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32)
    if w <= 0 or h <= 0:
        return rect
    mask_h, mask_w = mask.shape
    # Python's round (half to even) of the fp32 products, as the SDK computes them.
    xs = [min(max(round(float(np.float32(v) * scale[0])), 0), mask_w) for v in (x1, x2)]
    ys = [min(max(round(float(np.float32(v) * scale[1])), 0), mask_h) for v in (y1, y2)]
    cropped = mask[ys[0]:ys[1], xs[0]:xs[1]]
    if cropped.size == 0:
        return rect
    contours = _external_contours(_resize_nearest(cropped.astype(np.uint8), w, h))
    if not contours:
        return None
    largest = max(contours, key=_contour_area)  # first of equal areas, as Python's max
    points = _square_corners(_approx_poly_dp(largest, 0.004 * _arc_length(largest)))
    if len(points) < 4:
        return rect
    return np.asarray(points) + np.array([x1, y1], dtype=np.int32)


def _resize_nearest(src: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(src, (width, height), interpolation=INTER_NEAREST): source index floor(i * s / d)."""
    src_h, src_w = src.shape
    if (src_w, src_h) == (width, height):
        return src.copy()
    cols = np.minimum(np.floor(np.arange(width) * (1.0 / (width / src_w))).astype(np.int64), src_w - 1)
    rows = np.minimum(np.floor(np.arange(height) * (1.0 / (height / src_h))).astype(np.int64), src_h - 1)
    return src[rows][:, cols]


def _external_contours(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """The external contours of a uint8 mask, as lists of (x, y): glmrt._C's (C++, the GIL released)
    when it was built, else the Python twin's; the same either way."""
    if not HAS_CPP_CONTOURS:
        return _external_contours_py(mask)
    return [list(map(tuple, c.tolist())) for c in _C.external_contours(np.ascontiguousarray(mask, dtype=np.uint8))]


def _approx_poly_dp(points: list[tuple[int, int]], epsilon: float) -> list[tuple[int, int]]:
    """The closed curve simplified: glmrt._C's when it was built, else the Python twin's."""
    if not HAS_CPP_CONTOURS:
        return _approx_poly_dp_py(points, epsilon)
    return list(map(tuple, _C.approx_poly_dp(np.array(points, dtype=np.int32).reshape(-1, 2), epsilon).tolist()))


# Freeman chain codes: direction s -> (dx, dy), counter-clockwise on screen starting rightwards.
_CHAIN = ((1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1))
_NEW, _RIGHT = 2, 0x82  # border marks: followed; followed with background on the right
_NEW_BYTE, _RIGHT_BYTE = bytes([_NEW]), bytes([_RIGHT])


def _external_contours_py(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Python twin of glmrt._C.external_contours: cv2.findContours(mask, RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)[0], as lists of (x, y).

    Suzuki-Abe border following as OpenCV 4.x does it. The mask gets a 1-pixel background frame;
    a raster scan starts an outer border at each 0 -> 1 step whose 1 is still unmarked, unless the
    nearest marked pixel to its left on the row is a followed, non-right border pixel (the step is
    then inside a hole of a border already followed); each border followed marks its pixels. Only
    the points where the direction changes are kept. Contours are returned last found first.

    OpenCV visits every change of value along each row; the decisions it takes there are the ones
    above, and a border only marks pixels later in raster order, so the 0 -> 1 steps of the mask
    can be listed once up front.
    """
    h, w = mask.shape
    stride = w + 2
    framed = np.zeros((h + 2, stride), np.uint8)
    framed[1:-1, 1:-1] = mask != 0
    rows, cols = np.nonzero((framed[:, 1:] == 1) & (framed[:, :-1] == 0))  # in raster order
    img = bytearray(framed.tobytes())  # flat, row-major; marks are written here
    contours = []
    for flat in (rows * stride + cols + 1).tolist():  # flat index of each step's 1
        if img[flat] != 1:  # already on a followed border
            continue
        row = flat - flat % stride
        nearest = max(img.rfind(_NEW_BYTE, row, flat), img.rfind(_RIGHT_BYTE, row, flat))  # -1: none
        if nearest >= 0 and img[nearest] == _NEW:  # inside a hole
            continue
        contours.append(_follow_border(img, flat, stride))
    return contours[::-1]


def _follow_border(img: bytearray, start: int, stride: int) -> list[tuple[int, int]]:
    """Follows the outer border from flat index `start` of the framed image, marking its pixels;
    returns the (x, y) (unframed) of each pixel where the border changes direction."""
    steps = [dx + dy * stride for dx, dy in _CHAIN] * 2  # s and s + 8: the same neighbour
    s = 4  # the background pixel on the left we came from
    while True:  # clockwise from there to the first foreground neighbour
        s = (s - 1) & 7
        second = start + steps[s]
        if img[second] or s == 4:
            break
    if s == 4:  # an isolated pixel
        img[start] = _RIGHT
        return [(start % stride - 1, start // stride - 1)]
    corners = []
    here, prev_s = start, s ^ 4
    while True:
        came = s
        while s < 15:  # counter-clockwise from the previous pixel to the next foreground one
            s += 1
            nxt = here + steps[s]
            if img[nxt]:
                break
        s &= 7
        if 1 <= s <= came:  # the search passed the right neighbour, which is background
            img[here] = _RIGHT
        elif img[here] == 1:
            img[here] = _NEW
        if s != prev_s:
            corners.append(here)
            prev_s = s
        if nxt == start and here == second:
            return [(i % stride - 1, i // stride - 1) for i in corners]
        here, s = nxt, (s + 4) & 7


def _contour_area(points: list[tuple[int, int]]) -> float:
    """cv2.contourArea: |shoelace| / 2 (exact for integer points)."""
    total, (px, py) = 0, points[-1]
    for x, y in points:
        total += px * y - py * x
        px, py = x, y
    return abs(total) * 0.5


def _arc_length(points: list[tuple[int, int]]) -> float:
    """cv2.arcLength(closed=True): each side's length in fp32, summed in order in float64."""
    xy = np.asarray(points, dtype=np.float32)
    d = xy - np.roll(xy, 1, axis=0)
    total = 0.0
    for side in np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]).tolist():
        total += side
    return total


def _approx_poly_dp_py(points: list[tuple[int, int]], epsilon: float) -> list[tuple[int, int]]:
    """Python twin of glmrt._C.approx_poly_dp: cv2.approxPolyDP(points, epsilon, closed=True) for integer points, OpenCV 4.x's variant.

    Ramer-Douglas-Peucker on the closed curve split at two far-apart points (3 rounds of "farthest
    from the last start"), with point-to-segment distances, then one pass dropping middle points of
    nearly straight, non-axis-aligned triples. Distances are compared squared, in float64, in the
    order OpenCV computes them.
    """
    n = len(points)
    eps2 = epsilon * epsilon
    pos, far = 0, 0
    for _ in range(3):
        pos = (pos + far) % n
        sx, sy = points[pos]
        best = 0.0
        for j in range(1, n):
            px, py = points[(pos + j) % n]
            dx, dy = float(px - sx), float(py - sy)
            if dx * dx + dy * dy > best:
                best, far = dx * dx + dy * dy, j
    if best <= eps2:
        out = [points[pos]]
    else:
        out = []
        split = (pos + far) % n
        stack = [(split, pos), (pos, split)]  # slices (start, end), walked forward around the curve
        while stack:
            a, b = stack.pop()
            (sx, sy), (ex, ey) = points[a], points[b]
            i = (a + 1) % n
            if i == b:
                out.append((sx, sy))
                continue
            dx, dy = float(ex - sx), float(ey - sy)
            seg2 = dx * dx + dy * dy
            best, cut = 0.0, a
            while i != b:
                px, py = points[i]
                projection = (px - sx) * dx + (py - sy) * dy
                if projection < 0:
                    d2 = ((px - sx) * (px - sx) + (py - sy) * (py - sy)) * seg2
                elif projection > seg2:
                    d2 = ((px - ex) * (px - ex) + (py - ey) * (py - ey)) * seg2
                else:
                    cross = (py - sy) * dx - (px - sx) * dy
                    d2 = cross * cross
                if d2 > best:
                    best, cut = d2, i
                i = (i + 1) % n
            if best <= eps2 * seg2:
                out.append((sx, sy))
            else:
                stack += [(cut, b), (a, cut)]
    # Clean-up, in place as OpenCV: drop a middle point close to the line of its neighbours.
    count = kept = len(out)
    read = count - 1
    start = out[read]
    read = write = 0
    mid = out[read]
    read = 1 % count
    i = 0
    while i < count and kept > 2:
        end = out[read]
        read = (read + 1) % count
        dx, dy = float(end[0] - start[0]), float(end[1] - start[1])
        dist = abs((mid[0] - start[0]) * dy - (mid[1] - start[1]) * dx)
        inner = (mid[0] - start[0]) * (end[0] - mid[0]) + (mid[1] - start[1]) * (end[1] - mid[1])
        if dist * dist <= 0.5 * eps2 * (dx * dx + dy * dy) and dx != 0 and dy != 0 and inner >= 0:
            kept -= 1
            out[write] = start = end
            write = (write + 1) % count
            mid = out[read]
            read = (read + 1) % count
            i += 2
            continue
        out[write] = start = mid
        write = (write + 1) % count
        mid = end
        i += 1
    return out[:kept]


def _square_corners(points: list[tuple[int, int]]) -> list[tuple]:
    """transformers' extract_custom_vertices: keeps the convex-on-screen corners only (cross < 0)
    and moves a 45-degree one out to where the two sides would meet at a right angle."""
    poly = np.array(points, dtype=np.int32)
    n = len(poly)
    out = []
    for i in range(n):
        here = poly[i]
        back, ahead = poly[i - 1] - here, poly[(i + 1) % n] - here
        if back[1] * ahead[0] - back[0] * ahead[1] >= 0:
            continue
        norm_back, norm_ahead = np.linalg.norm(back), np.linalg.norm(ahead)
        cos = np.clip((back @ ahead) / (norm_back * norm_ahead), -1.0, 1.0)
        if abs(np.degrees(np.arccos(cos)) - 45) < 1:
            direction = back / norm_back + ahead / norm_ahead
            direction = direction / np.linalg.norm(direction)
            out.append(tuple(here + direction * ((norm_back + norm_ahead) / 2)))
        else:
            out.append(tuple(here))
    return out


# ------------------------------------------------------------ the SDK's apply_layout_postprocess


@dataclass
class _Box:
    cls: int
    score: float
    coordinate: list[int]  # x1, y1, x2, y2 page pixels, clamped, truncated
    polygon: np.ndarray  # [K, 2] float32 page pixels, clamped


def _layout_postprocess(raw: _RawDetections, width: int, height: int) -> list[_Box]:
    """apply_layout_postprocess for one page, with the SDK's settings (see the constants)."""
    if len(raw.scores) == 0:
        return []
    # Rows [class, score, x1, y1, x2, y2, order] in float64, as the SDK stacks them.
    rows = np.column_stack([raw.labels, raw.scores, raw.boxes, raw.order]).astype(np.float64)
    rows = rows[_nms(rows)]
    if len(rows) > 1:
        large = LARGE_IMAGE_AREA_LANDSCAPE if width > height else LARGE_IMAGE_AREA_PORTRAIT
        x1, y1 = np.maximum(rows[:, 2], 0), np.maximum(rows[:, 3], 0)
        x2, y2 = np.minimum(rows[:, 4], width), np.minimum(rows[:, 5], height)
        too_large = (rows[:, 0] == LABELS.index("image")) & ((x2 - x1) * (y2 - y1) > large * (width * height))
        if not too_large.all():
            rows = rows[~too_large]
    rows = rows[_merge_keep(rows)]
    if len(rows) == 0:
        return []
    rows = rows[np.argsort(rows[:, 6])]  # reading order (the SDK's very sort, for its tie order)
    widths, heights = rows[:, 4] - rows[:, 2], rows[:, 5] - rows[:, 3]
    cx, cy = rows[:, 2] + widths / 2, rows[:, 3] + heights / 2
    new_w, new_h = widths * UNCLIP_RATIO[0], heights * UNCLIP_RATIO[1]
    unclipped = np.column_stack([cx - new_w / 2, cy - new_h / 2, cx + new_w / 2, cy + new_h / 2])

    boxes = []
    for row, coords in zip(rows, unclipped):
        x1, x2 = (max(0, min(float(v), width)) for v in coords[0::2])
        y1, y2 = (max(0, min(float(v), height)) for v in coords[1::2])
        if x1 >= x2 or y1 >= y2:
            continue
        boxes.append(_Box(int(row[0]), float(row[1]), [int(x1), int(y1), int(x2), int(y2)],
                          _box_polygon(raw, coords, (x1, y1, x2, y2), width, height)))
    return boxes


def _box_polygon(raw: _RawDetections, coords: np.ndarray, clamped: tuple, width: int, height: int) -> np.ndarray:
    """The polygon of the first raw box within 1 px of this one (np.allclose), clamped to the
    page, or the clamped box's corners. Several raw boxes can match: the first wins, as in the SDK."""
    polygon = None
    if raw.polygons:
        near = np.flatnonzero((np.abs(raw.boxes - coords) <= 1.0 + 1e-5 * np.abs(coords)).all(axis=1))
        if len(near) and near[0] < len(raw.polygons) and raw.polygons[near[0]] is not None:
            polygon = raw.polygons[near[0]].astype(np.float32)
    if polygon is None:
        x1, y1, x2, y2 = clamped
        return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32)
    polygon[:, 0] = np.clip(polygon[:, 0], 0, width)
    polygon[:, 1] = np.clip(polygon[:, 1], 0, height)
    return polygon


def _nms(rows: np.ndarray) -> list[int]:
    """Greedy NMS by score, IoU with +1-pixel areas, thresholds by same / different class."""
    remaining = np.argsort(rows[:, 1])[::-1]
    selected = []
    while len(remaining):
        best, remaining = remaining[0], remaining[1:]
        selected.append(best)
        b, others = rows[best], rows[remaining]
        inter = (np.maximum(0, np.minimum(b[4], others[:, 4]) - np.maximum(b[2], others[:, 2]) + 1)
                 * np.maximum(0, np.minimum(b[5], others[:, 5]) - np.maximum(b[3], others[:, 3]) + 1))
        area_b = (b[4] - b[2] + 1) * (b[5] - b[3] + 1)
        area_o = (others[:, 4] - others[:, 2] + 1) * (others[:, 5] - others[:, 3] + 1)
        iou = inter / (area_b + area_o - inter)
        remaining = remaining[iou < np.where(others[:, 0] == b[0], NMS_IOU_SAME, NMS_IOU_DIFF)]
    return selected


def _merge_keep(rows: np.ndarray) -> np.ndarray:
    """Which boxes survive the containment merge (MERGE_MODES; PRESERVED classes always stay)."""
    x1, y1, x2, y2 = (rows[:, k] for k in range(2, 6))
    area = (x2 - x1) * (y2 - y1)
    inter = (np.maximum(0, np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1))
             * np.maximum(0, np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(area[:, None] > 0, inter / area[:, None], 0)
    inside = share >= CONTAINED  # [i, j]: box i lies in box j
    np.fill_diagonal(inside, False)
    classes = rows[:, 0]
    inside[np.isin(classes, list(PRESERVED))] = False
    keep = np.ones(len(rows), dtype=bool)
    for cls, mode in MERGE_MODES.items():
        if mode == "large":  # drop boxes inside a box of this class
            keep &= ~inside[:, classes == cls].any(axis=1)
        else:  # drop boxes holding a box of this class, unless they are such a box inside another
            held = inside & (classes == cls)[:, None]
            keep &= ~held.any(axis=0) | held.any(axis=1)
    return keep


def _regions(boxes: list[_Box], width: int, height: int) -> list[LayoutRegion]:
    """Label -> task, abandoned labels dropped, re-indexed, normalised as the SDK's detector."""
    regions = []
    for box in boxes:
        label = LABELS[box.cls]
        task = LABEL_TASK[label]
        if task == "abandon":
            continue
        x1, y1, x2, y2 = box.coordinate
        regions.append(LayoutRegion(
            index=len(regions), label=label, task=task, score=box.score,
            bbox_2d=[int(float(x1) / width * 1000), int(float(y1) / height * 1000),
                     int(float(x2) / width * 1000), int(float(y2) / height * 1000)],
            polygon=[[int(float(x) / width * 1000), int(float(y) / height * 1000)] for x, y in box.polygon]))
    return regions
