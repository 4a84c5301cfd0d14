"""glmrt.documents.layout against the glmocr SDK and transformers, which it reimplements.

Oracles:
* preprocessing: transformers' PPDocLayoutV3ImageProcessor (torchvision), bit for bit;
* post-processing: the SDK's apply_layout_postprocess on hand-made and random raw detections;
* crops: the SDK's crop_image_region;
* the whole detector: the SDK's own PPDocLayoutDetector (its processor, transformers'
  post_process_object_detection, its patched polygon step, its thresholds and label mapping) on
  the tiny model, with OpenCV (glmrt reimplements the five cv2 calls they make, which are also
  compared with OpenCV on random masks and pinned to results recorded from OpenCV 4.14).
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glmrt.documents import layout
from glmrt.documents.layout import LABELS, LayoutDetector, LayoutRegion, crop_region, preprocess
from glmrt_testing.tiny_layout import PREPROCESSOR_CONFIG, synthetic_page


@pytest.fixture(scope="module")
def detector(tiny_layout_checkpoint):
    return LayoutDetector.from_pretrained(tiny_layout_checkpoint, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def sdk_config():
    import glmocr
    import yaml

    return yaml.safe_load((Path(glmocr.__file__).parent / "config.yaml").read_text())["pipeline"]["layout"]


def pages(seed: int = 0) -> list[Image.Image]:
    """Portrait, landscape, small, very tall and exactly-800 pages in several modes."""
    rng = np.random.default_rng(seed)
    return [synthetic_page(rng, 1240, 1754), synthetic_page(rng, 1754, 1240).convert("L"),
            synthetic_page(rng, 300, 2000).convert("RGBA"), synthetic_page(rng, 800, 800),
            synthetic_page(rng, 120, 90)]


# ------------------------------------------------------------------------------ SDK constants


def test_constants_are_the_sdks(sdk_config):
    assert list(LABELS) == [sdk_config["id2label"][i] for i in range(len(LABELS))]
    assert layout.LABEL_TASK == {label: task for task, labels in sdk_config["label_task_mapping"].items()
                                 for label in labels}
    assert layout.MERGE_MODES == sdk_config["layout_merge_bboxes_mode"]
    assert layout.THRESHOLD == sdk_config["threshold"] and sdk_config["layout_nms"]
    assert list(layout.UNCLIP_RATIO) == sdk_config["layout_unclip_ratio"]
    assert layout.DEFAULT_MODEL == sdk_config["model_dir"]
    assert set(layout.TASKS) | {"abandon"} == set(sdk_config["label_task_mapping"])


# ------------------------------------------------------------------------------ preprocessing


def test_tiny_preprocessor_config_is_what_the_processor_writes(torchvision_available, tmp_path):
    from transformers import PPDocLayoutV3ImageProcessor

    PPDocLayoutV3ImageProcessor().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()) == PREPROCESSOR_CONFIG


def noise_page(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels[rng.random((h, w)) < 0.5] = 255  # hard edges: over- and undershoot in the bicubic
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("size,mode", [((1240, 1754), "RGB"), ((1754, 1240), "L"), ((640, 480), "RGBA"),
                                       ((300, 2000), "RGB"), ((2000, 300), "P"), ((800, 800), "RGB"),
                                       ((57, 31), "RGB"), ((1, 1), "L")])
def test_preprocess_equals_transformers(torchvision_available, tiny_layout_checkpoint, size, mode):
    from transformers import AutoImageProcessor

    image = noise_page(*size, seed=size[0], mode=mode)
    ours = preprocess([image])
    # The SDK converts to RGB before calling the processor, which rejects other modes.
    theirs = AutoImageProcessor.from_pretrained(tiny_layout_checkpoint)(images=[image.convert("RGB")],
                                                                        return_tensors="pt")
    assert set(ours) == set(theirs) == {"pixel_values"}
    assert ours["pixel_values"].dtype == theirs["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])  # bit for bit


def test_preprocess_batch_equals_transformers(torchvision_available, tiny_layout_checkpoint):
    """The processor resizes same-shaped images as one stacked batch: same result."""
    from transformers import AutoImageProcessor

    images = [noise_page(300, 200, 1), noise_page(200, 300, 2), noise_page(300, 200, 3)]
    theirs = AutoImageProcessor.from_pretrained(tiny_layout_checkpoint)(images=images, return_tensors="pt")
    assert torch.equal(preprocess(images)["pixel_values"], theirs["pixel_values"])


def test_preprocess_needs_images():
    with pytest.raises(ValueError, match="images"):
        preprocess([])


# ---------------------------------------------------------------------- SDK post-processing


def sdk_raw(raw: layout._RawDetections) -> dict:
    """The same detections as transformers' post_process_object_detection hands them to the SDK."""
    return {"scores": torch.from_numpy(raw.scores), "labels": torch.from_numpy(raw.labels),
            "boxes": torch.from_numpy(raw.boxes), "order_seq": torch.from_numpy(raw.order),
            "polygon_points": list(raw.polygons)}


def sdk_postprocess(raw: layout._RawDetections, width: int, height: int, config: dict) -> list[dict]:
    from glmocr.utils.layout_postprocess_utils import apply_layout_postprocess

    [boxes] = apply_layout_postprocess([sdk_raw(raw)], config["id2label"], [(width, height)], layout_nms=True,
                                       layout_unclip_ratio=config["layout_unclip_ratio"],
                                       layout_merge_bboxes_mode=config["layout_merge_bboxes_mode"])
    return boxes


def assert_same_boxes(ours: list[layout._Box], sdk: list[dict]):
    assert [(b.cls, b.score, b.coordinate) for b in ours] == [(d["cls_id"], d["score"], d["coordinate"]) for d in sdk]
    for b, d in zip(ours, sdk):
        assert b.polygon.dtype == d["polygon_points"].dtype == np.float32
        np.testing.assert_array_equal(b.polygon, d["polygon_points"])


def raw_detections(rows: list[tuple], polygons: list) -> layout._RawDetections:
    """rows: (label, score, x1, y1, x2, y2, order)."""
    return layout._RawDetections(
        scores=np.array([r[1] for r in rows], np.float32), labels=np.array([LABELS.index(r[0]) for r in rows]),
        boxes=np.array([r[2:6] for r in rows], np.float32), order=np.array([r[6] for r in rows]),
        polygons=polygons)


def test_postprocess_hand_made_page(sdk_config):
    """A 1000 x 1400 page exercising each rule, checked against the SDK and by hand."""
    octagon = np.array([[120, 100], [480, 100], [500, 120], [500, 280], [480, 300], [120, 300], [100, 280],
                        [100, 120]], np.float64)
    outside = np.array([[-30, 1290], [310, 1290], [310, 1460], [-30, 1460]], np.float64)
    decoy = np.array([[1, 1], [2, 1], [2, 2], [1, 2]], np.float64)
    rows = [
        ("doc_title", 0.5, 100.5, 100.4, 500.6, 299.5, 0),  # within 1 px of the text below: its polygon wins
        ("text", 0.9, 100, 100, 500, 300, 0),
        ("text", 0.8, 110, 105, 505, 305, 1),  # same class, IoU > 0.6: suppressed
        ("paragraph_title", 0.85, 101, 100, 500, 300, 2),  # other class, IoU > 0.98: suppressed
        ("table", 0.95, 550, 100, 950, 600, 3),
        ("image", 0.4, 550, 100, 950, 600, 3),  # the same query as another class: suppressed
        ("text", 0.7, 600, 150, 900, 400, 4),  # inside the table: merged away ("large")
        ("image", 0.6, 600, 450, 700, 550, 5),  # inside the table too, but images are kept
        ("reference", 0.6, 120, 700, 400, 760, 6),  # inside the text below ("large") ...
        ("text", 0.75, 100, 680, 600, 800, 7),  # ... which holds a reference ("small"): both go
        ("display_formula", 0.88, 100, 900, 500, 1000, 8),
        ("formula_number", 0.5, 450, 920, 495, 980, 9),  # inside the formula: merged away
        ("image", 0.55, 10, 10, 990, 1390, 10),  # > 93% of a portrait page: dropped
        ("header", 0.9, 0, 0, 1000, 50, 11),
        ("text", 0.65, -20, 1300, 300, 1450, 12),  # clamped to the page, polygon too
        ("text", 0.6, 1001, 10, 1100, 60, 13),  # outside the page: nothing left after clamping
    ]
    polygons = [decoy, octagon, None, None, None, None, None, None, None, None, None, None, None, None, outside,
                None]
    raw = raw_detections(rows, polygons)
    ours = layout._layout_postprocess(raw, 1000, 1400)
    assert_same_boxes(ours, sdk_postprocess(raw, 1000, 1400, sdk_config))
    assert [(LABELS[b.cls], b.coordinate) for b in ours] == [
        ("text", [100, 100, 500, 300]), ("table", [550, 100, 950, 600]), ("image", [600, 450, 700, 550]),
        ("display_formula", [100, 900, 500, 1000]), ("header", [0, 0, 1000, 50]), ("text", [0, 1300, 300, 1400])]
    np.testing.assert_array_equal(ours[0].polygon, decoy.astype(np.float32))
    np.testing.assert_array_equal(ours[1].polygon, [[550, 100], [950, 100], [950, 600], [550, 600]])
    np.testing.assert_array_equal(ours[5].polygon, [[0, 1290], [310, 1290], [310, 1400], [0, 1400]])

    regions = layout._regions(ours, 1000, 1400)  # the header is abandoned, the rest re-indexed
    assert [(r.index, r.label, r.task) for r in regions] == [
        (0, "text", "text"), (1, "table", "table"), (2, "image", "skip"), (3, "display_formula", "formula"),
        (4, "text", "text")]
    assert regions[4].bbox_2d == [0, 928, 300, 1000]  # int(1300 / 1400 * 1000) = 928
    assert regions[4].polygon == [[0, 921], [310, 921], [310, 1000], [0, 1000]]
    assert regions[0].to_dict() == {"index": 0, "label": "text", "score": regions[0].score,
                                    "bbox_2d": [100, 71, 500, 214], "polygon": [[1, 0], [2, 0], [2, 1], [1, 1]],
                                    "task_type": "text"}
    assert list(regions[0].to_dict()) == ["index", "label", "score", "bbox_2d", "polygon", "task_type"]


def random_page(rng: np.random.Generator, width: int, height: int) -> layout._RawDetections:
    """Boxes with nesting, near-duplicates, ties in score and order, and all kinds of polygons."""
    n = int(rng.integers(1, 30))
    boxes = []
    for _ in range(n):
        if boxes and rng.random() < 0.5:  # derived from an earlier box: nested, shifted or near-equal
            x1, y1, x2, y2 = boxes[int(rng.integers(len(boxes)))]
            w, h = x2 - x1, y2 - y1
            shrink = rng.choice([0.0, 0.05, 0.1, 0.3]) * np.array([w, h, -w, -h])
            box = np.array([x1, y1, x2, y2]) + shrink + rng.normal(0, rng.choice([0.3, 3, 30]), 4)
        else:
            cx, cy = rng.uniform(-0.05, 1.05) * width, rng.uniform(-0.05, 1.05) * height
            w, h = rng.uniform(0.01, 1.0) * width, rng.uniform(0.01, 1.0) * height
            box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        boxes.append(box)
    common = [LABELS.index(x) for x in ("text", "image", "reference", "table", "seal", "chart", "header")]
    labels = np.where(rng.random(n) < 0.6, rng.choice(common, n), rng.integers(0, len(LABELS), n))
    scores = np.round(rng.uniform(0.3, 1.0, n), 1).astype(np.float32)  # many ties
    polygons = []
    for box in boxes:
        kind = rng.random()
        if kind < 0.3:  # empty mask
            polygons.append(None)
        elif kind < 0.4:  # the box's own corners
            polygons.append(np.asarray(box, np.float32)[[[0, 1], [2, 1], [2, 3], [0, 3]]])
        else:  # anything, partly off the page
            polygons.append(rng.uniform(-50, max(width, height) + 50, (int(rng.integers(4, 9)), 2)))
    return layout._RawDetections(scores, labels.astype(np.int64), np.array(boxes, np.float32),
                                 rng.integers(0, n, n), polygons if rng.random() < 0.9 else [])


def test_postprocess_random_pages(sdk_config):
    rng = np.random.default_rng(0)
    for _ in range(300):
        width, height = int(rng.integers(50, 3000)), int(rng.integers(50, 3000))
        raw = random_page(rng, width, height)
        assert_same_boxes(layout._layout_postprocess(raw, width, height),
                          sdk_postprocess(raw, width, height, sdk_config))


def test_postprocess_empty_page(sdk_config):
    raw = layout._RawDetections.empty()
    assert layout._layout_postprocess(raw, 100, 100) == [] == sdk_postprocess(raw, 100, 100, sdk_config)


# --------------------------------------------------------------------------------- crops


@pytest.mark.parametrize("size", [(1240, 1754), (333, 777), (7, 5)])
def test_crop_region_equals_sdk(size):
    from glmocr.utils.image_utils import crop_image_region

    image = noise_page(*size, seed=1)
    for bbox in ([0, 0, 1000, 1000], [123, 456, 789, 999], [1, 1, 2, 2], [500, 0, 1000, 333], [999, 999, 1000, 1000]):
        ours, sdk = crop_region(image, bbox), crop_image_region(image, bbox)
        assert ours.size == sdk.size and ours.tobytes() == sdk.tobytes()


# ------------------------------------------------------------------- the OpenCV calls, by hand


def mask(*rows: str) -> np.ndarray:
    return np.array([[int(c) for c in row] for row in rows], np.uint8)


# Recorded from OpenCV 4.14: findContours(RETR_EXTERNAL, CHAIN_APPROX_SIMPLE), contourArea, arcLength.
CONTOURS = [
    (mask("000", "010", "000"), [[(1, 1)]], [0.0], [0.0]),
    (mask("00000", "01110", "01110", "00000"), [[(1, 1), (1, 2), (3, 2), (3, 1)]], [2.0], [6.0]),
    (mask("11", "11"), [[(0, 0), (0, 1), (1, 1), (1, 0)]], [1.0], [4.0]),
    (mask("100", "010", "001"), [[(0, 0), (2, 2)]], [0.0], [5.656854152679443]),
    (mask("1000", "1000", "1111"), [[(0, 0), (0, 2), (3, 2), (1, 2), (0, 1)]], [0.5], [9.41421353816986]),
    (mask("1111111", "1000001", "1010001", "1000001", "1111111"),  # the island in the hole is not external
     [[(0, 0), (0, 4), (6, 4), (6, 0)]], [24.0], [20.0]),
    (mask("110000", "110000", "000000", "000111", "000111"),  # last found first
     [[(3, 3), (3, 4), (5, 4), (5, 3)], [(0, 0), (0, 1), (1, 1), (1, 0)]], [2.0, 1.0], [6.0, 4.0]),
    (mask("10001", "10001", "11111"),
     [[(0, 0), (0, 2), (4, 2), (4, 0), (4, 1), (3, 2), (1, 2), (0, 1)]], [1.0], [14.828427076339722]),
]


@pytest.fixture(params=["python", "c++"])
def contour_impl(request, monkeypatch):
    """Runs a test with the Python twins of the contour steps, then with glmrt._C's."""
    if request.param == "c++" and not layout.HAS_CPP_CONTOURS:
        pytest.skip("glmrt._C was not built")
    monkeypatch.setattr(layout, "HAS_CPP_CONTOURS", request.param == "c++")
    return request.param


@pytest.mark.parametrize("image,contours,areas,lengths", CONTOURS)
def test_contours_as_opencv(image, contours, areas, lengths, contour_impl):
    found = layout._external_contours(image)
    assert found == contours
    assert [layout._contour_area(c) for c in found] == areas
    assert [layout._arc_length(c) for c in found] == lengths


def test_resize_nearest_as_opencv():
    src = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    assert layout._resize_nearest(src, 5, 4).tolist() == [[1, 1, 2, 2, 3]] * 2 + [[4, 4, 5, 5, 6]] * 2
    assert layout._resize_nearest(src, 7, 3).tolist() == [[1, 1, 1, 2, 2, 3, 3]] * 2 + [[4, 4, 4, 5, 5, 6, 6]]
    assert layout._resize_nearest(src, 2, 1).tolist() == [[1, 2]]
    same = layout._resize_nearest(src, 3, 2)
    assert same.tolist() == src.tolist() and same is not src


DENT = [(0, 0), (0, 10), (5, 11), (10, 10), (10, 0)]
STAIR = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (4, 4), (4, 0)]


@pytest.mark.parametrize("points,epsilon,expected", [  # recorded from OpenCV 4.14's approxPolyDP
    (DENT, 0.5, DENT),
    (DENT, 1.5, [(0, 0), (0, 10), (10, 10), (10, 0)]),
    (STAIR, 0.5, [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (4, 4), (4, 0)]),  # the clean-up pass
    (STAIR, 1.0, [(0, 0), (4, 4), (4, 0)]),
    ([(0, 0), (0, 20), (1, 21), (2, 20), (20, 20), (20, 0)], 1.0, [(0, 0), (0, 20), (20, 20), (20, 0)]),
    ([(3, 4)], 0.0, [(3, 4)]),
])
def test_approx_poly_dp_as_opencv(points, epsilon, expected, contour_impl):
    assert layout._approx_poly_dp(points, epsilon) == expected


def test_mask_polygon_as_opencv(contour_impl):
    """A box's polygon from a hand-made mask: its contour and simplification as recorded from
    OpenCV 4.14, corners squared off, then moved to the box's corner."""
    shape = np.zeros((40, 60), bool)
    shape[5:30, 10:50] = True
    shape[12:20, 20:30] = False  # a hole: ignored
    shape[30:35, 10:20] = True
    cells = np.zeros((200, 200), bool)
    cells[:40, 40:100] = shape
    box = np.array([40.0, 0.0, 100.0, 40.0], np.float32)  # 60 x 40 pixels over the same cells: 1:1
    polygon = layout._mask_polygon(box, cells, [np.float32(1.0), np.float32(1.0)])
    contour = [(10, 5), (10, 34), (19, 34), (19, 30), (20, 29), (49, 29), (49, 5)]
    assert layout._external_contours(shape.astype(np.uint8)) == [contour]
    assert layout._approx_poly_dp(contour, 0.004 * layout._arc_length(contour)) == contour
    corners = [(10, 5), (10, 34), (19, 34), (49, 29), (49, 5)]  # the two inward turns are dropped
    assert [tuple(int(v) for v in p) for p in layout._square_corners(contour)] == corners
    np.testing.assert_array_equal(polygon, np.array(corners) + [40, 0])


def test_mask_polygon_fallbacks():
    scale = [np.float32(0.25), np.float32(0.25)]
    empty = np.zeros((200, 200), bool)
    full = np.ones((200, 200), bool)
    assert layout._mask_polygon(np.array([10, 10, 50, 50], np.float32), empty, scale) is None
    degenerate = layout._mask_polygon(np.array([10.7, 10, 10.9, 50], np.float32), full, scale)
    np.testing.assert_array_equal(degenerate, [[10, 10], [10, 10], [10, 50], [10, 50]])
    off_mask = layout._mask_polygon(np.array([900, 10, 950, 50], np.float32), full, scale)  # no mask cells
    np.testing.assert_array_equal(off_mask, [[900, 10], [950, 10], [950, 50], [900, 50]])


def test_square_corners_equals_transformers(torchvision_available):
    from transformers import PPDocLayoutV3ImageProcessor

    processor = PPDocLayoutV3ImageProcessor()
    rng = np.random.default_rng(0)
    chamfer = [(0, 0), (0, 10), (5, 15), (20, 15), (20, 0)]  # two 135-degree corners
    for points in [chamfer, [(0, 0), (10, 10), (20, 0)], *[
            [tuple(p) for p in rng.integers(0, 8, (int(rng.integers(3, 9)), 2)) * 5] for _ in range(200)]]:
        ours = layout._square_corners(points)
        theirs = processor.extract_custom_vertices(np.array(points, np.int32))
        np.testing.assert_array_equal(np.array(ours), np.array(theirs))


def test_primitives_equal_opencv_on_random_masks(contour_impl):
    import cv2

    rng = np.random.default_rng(0)
    for _ in range(300):
        cells = (rng.random(tuple(rng.integers(1, 30, 2))) < rng.uniform(0.2, 0.9)).astype(np.uint8)
        width, height = (int(v) for v in rng.integers(1, 200, 2))
        image = cv2.resize(cells, (width, height), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(layout._resize_nearest(cells, width, height), image)
        contours, _ = cv2.findContours(image, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        ours = layout._external_contours(image)
        assert ours == [[tuple(p) for p in c.reshape(-1, 2).tolist()] for c in contours]
        for c, points in zip(contours, ours):
            assert layout._contour_area(points) == cv2.contourArea(c)
            assert layout._arc_length(points) == cv2.arcLength(c, True)
            epsilon = 0.004 * cv2.arcLength(c, True)
            assert layout._approx_poly_dp(points, epsilon) == [
                tuple(p) for p in cv2.approxPolyDP(c, epsilon, True).reshape(-1, 2).tolist()]


@pytest.mark.skipif(not layout.HAS_CPP_CONTOURS, reason="glmrt._C was not built")
def test_cpp_contours_equal_the_python_twins():
    """Page-sized masks as _mask_polygon makes them (cells stretched by nearest resize), blobs with
    holes, islands, single pixels and diagonal links, and curves for approx_poly_dp of all sizes."""
    from glmrt import _C

    rng = np.random.default_rng(1)
    for trial in range(60):
        cells = (rng.random(tuple(rng.integers(1, 60, 2))) < rng.uniform(0.05, 0.95)).astype(np.uint8)
        width, height = (int(v) for v in rng.integers(1, 900, 2))
        image = np.ascontiguousarray(layout._resize_nearest(cells, width, height) if trial % 3 else cells)
        ours = [[tuple(p) for p in c.tolist()] for c in _C.external_contours(image)]
        assert ours == layout._external_contours_py(image)
        for points in ours:
            for epsilon in (0.0, 0.5, 0.004 * layout._arc_length(points), float(rng.uniform(0, 40))):
                assert [tuple(p) for p in _C.approx_poly_dp(np.array(points, np.int32), epsilon).tolist()] == \
                    layout._approx_poly_dp_py(points, epsilon)
    with pytest.raises(ValueError, match="uint8"):
        _C.external_contours(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="int32"):
        _C.approx_poly_dp(np.zeros((0, 2), np.int32), 1.0)


# ------------------------------------------------------------------- the detector, end to end


def test_detect_runs_on_cpu_and_is_sane(detector):
    first, second = detector.detect(pages()), detector.detect(pages())
    assert first == second  # deterministic
    assert len(first) == 5 and sum(len(regions) for regions in first) >= 5
    for regions in first:
        assert [r.index for r in regions] == list(range(len(regions)))
        for r in regions:
            assert r.task == layout.LABEL_TASK[r.label] and r.task in layout.TASKS
            assert layout.THRESHOLD <= r.score <= 1
            x1, y1, x2, y2 = r.bbox_2d
            assert 0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 1000
            assert len(r.polygon) >= 4 and all(0 <= v <= 1000 for point in r.polygon for v in point)
    assert detector.detect([]) == []


@pytest.fixture(scope="module")
def sdk_detector_class(torchvision_available):
    """The SDK's PPDocLayoutDetector, with the real OpenCV (a test dependency)."""
    import cv2  # noqa: F401 -- the SDK's polygon step and transformers' need it

    return importlib.import_module("glmocr.layout.layout_detector").PPDocLayoutDetector


def sdk_detector(cls, checkpoint, config: dict, **overrides):
    from glmocr.config import LayoutConfig

    sdk = cls(LayoutConfig(**{**config, "model_dir": str(checkpoint), "device": "cpu", **overrides}))
    sdk.start()
    return sdk


def test_detect_equals_the_sdk_detector(sdk_detector_class, tiny_layout_checkpoint, detector, sdk_config):
    images = pages(1)
    sdk = sdk_detector(sdk_detector_class, tiny_layout_checkpoint, sdk_config, batch_size=2)
    expected, _ = sdk.process(images)
    assert [[r.to_dict() for r in regions] for regions in detector.detect(images)] == expected
    assert sum(len(regions) for regions in expected) >= 5

    # The first stage alone: transformers' post_process_object_detection with the SDK's polygon patch.
    outputs, sizes = detector._forward([image.convert("RGB") for image in images[:2]])
    theirs = sdk._image_processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=sizes)
    for ours, ref in zip(detector._raw(outputs, sizes), theirs):
        assert len(ours.scores) > 0
        np.testing.assert_array_equal(ours.scores, ref["scores"].numpy())
        np.testing.assert_array_equal(ours.labels, ref["labels"].numpy())
        np.testing.assert_array_equal(ours.boxes, ref["boxes"].numpy())
        np.testing.assert_array_equal(ours.order, ref["order_seq"].numpy())
        assert len(ours.polygons) == len(ref["polygon_points"])
        for p, q in zip(ours.polygons, ref["polygon_points"]):
            assert (p is None and q is None) or (p.dtype == q.dtype and np.array_equal(p, q))


def test_class_thresholds_equal_the_sdk(sdk_detector_class, tiny_layout_checkpoint, sdk_config):
    by_class = {"text": 0.6, LABELS.index("image"): 0.2, "display_formula": 0.9}
    ours = LayoutDetector.from_pretrained(tiny_layout_checkpoint, device="cpu", threshold_by_class=by_class)
    sdk = sdk_detector(sdk_detector_class, tiny_layout_checkpoint, sdk_config, threshold_by_class=by_class)
    images = pages(2)[:3]
    assert [[r.to_dict() for r in regions] for regions in ours.detect(images)] == sdk.process(images)[0]


def test_failed_batch_is_retried_page_by_page(detector, monkeypatch, caplog):
    images = pages()[:2]
    expected = detector.detect(images)
    real = layout._raw_detections
    calls = []

    def fails_for_batches(logits, *args):
        calls.append(len(logits))
        if len(logits) > 1:
            raise RuntimeError("boom")
        return real(logits, *args)

    monkeypatch.setattr(layout, "_raw_detections", fails_for_batches)
    with caplog.at_level(logging.WARNING, logger=layout.__name__):
        assert detector.detect(images) == expected
    assert calls == [2, 1, 1] and "retrying page by page" in caplog.text

    monkeypatch.setattr(layout, "_raw_detections", lambda *args: 1 / 0)
    assert detector.detect(images) == [[], []]


# --------------------------------------------------------------------------------- loading


def test_from_pretrained_refuses_what_it_cannot_do(tiny_layout_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="model"):
        LayoutDetector.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="threshold_by_class"):
        LayoutDetector.from_pretrained(tiny_layout_checkpoint, device="cpu", threshold_by_class={"caption": 0.5})
    with pytest.raises(ValueError, match="batch_size"):
        LayoutDetector.from_pretrained(tiny_layout_checkpoint, device="cpu", batch_size=0)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).symlink_to(Path(tiny_layout_checkpoint) / name)
    (other / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR_CONFIG, "size": {"height": 640,
                                                                                               "width": 640}}))
    with pytest.raises(ValueError, match="size"):
        LayoutDetector.from_pretrained(other, device="cpu")


# The preprocessor_config.json that PaddleOCR's safetensors converter writes for PP-DocLayoutV3 (the
# shape of the published PaddlePaddle/PP-DocLayoutV3_safetensors), integer means and all.
PUBLISHED_PREPROCESSOR_CONFIG = {
    "_valid_processor_keys": ["images", "do_resize", "size", "resample", "do_rescale", "rescale_factor",
                              "do_normalize", "image_mean", "image_std", "return_tensors", "data_format",
                              "input_data_format"],
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type": "PPDocLayoutV3ImageProcessor",
    "image_mean": [0, 0, 0], "image_std": [1, 1, 1], "rescale_factor": 1.0 / 255, "resample": 3,
    "size": {"height": 800, "width": 800},
}


def test_the_published_preprocessor_config_is_accepted_and_others_named(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PREPROCESSOR_CONFIG))
    layout._check_processor_config(tmp_path)
    for key, value in [("resample", 2), ("image_std", [0.5, 0.5, 0.5]), ("rescale_factor", 1.0), ("do_pad", True)]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**PUBLISHED_PREPROCESSOR_CONFIG, key: value}))
        with pytest.raises(ValueError, match=f"preprocessor_config.json {key}"):
            layout._check_processor_config(tmp_path)


def test_region_dataclass_defaults():
    region = LayoutRegion(index=0, label="text", task="text", score=1.0, bbox_2d=[0, 0, 1000, 1000])
    assert region.polygon == [] and region.to_dict()["task_type"] == "text"
