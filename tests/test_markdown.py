"""glmrt.documents.markdown against the glmocr SDK itself: for fixed region inputs, format_document
equals ResultFormatter.process (default config) in JSON (text and key order), Markdown and figure
files, and write_document writes what PipelineResult.save writes, atomically."""
import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from glmocr.config import GlmOcrConfig
from glmocr.parser_result.pipeline_result import PipelineResult
from glmocr.pipeline.pipeline import Pipeline
from glmocr.postprocess import result_formatter
from glmrt.documents.markdown import (format_document, format_pages_without_layout, model_output_json,
                                      write_document)

BOX = [100, 100, 900, 160]


@pytest.fixture(scope="module")
def sdk():
    return result_formatter.ResultFormatter(GlmOcrConfig.from_yaml().pipeline.result_formatter)


@pytest.fixture(autouse=True)
def no_wordfreq(monkeypatch):
    # the SDK checks hyphen merges with wordfreq when that optional package is installed; glmrt uses
    # the SDK's dependency-free check only, which is what the SDK does without it
    monkeypatch.setattr(result_formatter, "zipf_frequency", None)


def page(*regions: tuple) -> list[dict]:
    """(label, content[, bbox[, extra]]) tuples -> one page's regions, indexed in order."""
    out = []
    for index, (label, content, *rest) in enumerate(regions):
        bbox = rest[0] if rest else [BOX[0], 100 + 70 * index, BOX[2], 160 + 70 * index]
        out.append({"index": index, "label": label, "content": content, "bbox_2d": bbox,
                    "task_type": "text", "score": 0.9, **(rest[1] if len(rest) > 1 else {})})
    return out


def check(sdk, pages, crops=None, prefix="cropped"):
    """Both formatters on the same input: equal outputs, same crop objects, input untouched."""
    before = copy.deepcopy(pages)
    want_json, want_md, want_images = sdk.process(copy.deepcopy(pages), cropped_images=crops, image_prefix=prefix)
    json_pages, markdown, images = format_document(pages, crops, prefix)
    assert json.dumps(json_pages, ensure_ascii=False) == want_json
    assert markdown == want_md
    assert list(images) == list(want_images) and all(images[k] is want_images[k] for k in images)
    assert pages == before
    return json_pages, markdown, images


LONG_LOOP = "Intro text. " + "the same clause, " * 150
LONG_LINES = "\n".join(["header line"] + ["repeated row | 1 | 2"] * 40 + ["tail"]) + "\n" + "x" * 1200
# one line in runs of five between distinct lines: no back-to-back loop of 10, but line repeats of
# 5/6 (cut) or of 3/4 (below the SDK's 80%: kept)
LONG_RUNS = "\n".join(["head", "", "  sub  "] + ["row | 1 | 2\n" * 5 + f"note {k}" for k in range(40)])
LONG_SPARSE = "\n".join("row | 1 | 2\n" * 3 + f"note {k}" for k in range(60))
LONG_PLAIN = " ".join(f"word{i}" for i in range(400))

SINGLE = {
    "text": [("text", "A plain paragraph.")],
    "text-lines": [("text", "line one\nline two\n\nline three")],
    "text-tab-escapes": [("text", "\\t\\t  indented\\t")],
    "leaders": [("text", "Contents.......... 3 ····· 4 ______ 5 \\_\\_\\_\\_ 6 ... ok")],
    "inline-math": [("text", "Let$ x $be and $y$, sum $ a+b $.")],
    "inline-math-empty": [("text", "cost $ $ and $5 or $$x$$")],
    "code-unclosed": [("text", "```python\nprint(1)")],
    "code-closed": [("text", "```\nx = 1\n```")],
    "bullet-dot": [("text", "· first")],
    "bullet-round": [("text", "•second")],
    "bullet-star": [("text", "* third")],
    "enum-paren": [("text", "(1)first item")],
    "enum-fullwidth-paren": [("text", "（a）  lettered")],
    "enum-dot": [("text", "12.Twelfth")],
    "enum-letter": [("text", "b)bee")],
    "enum-fullwidth": [("text", "3）three")],
    "enum-decimal": [("text", "3.14 is pi")],
    "enum-multiline": [("text", "1.first\nsecond")],
    "long-loop": [("text", LONG_LOOP)],
    "long-line-repeats": [("text", LONG_LINES)],
    "long-line-runs": [("text", LONG_RUNS)],
    "long-line-sparse": [("text", LONG_SPARSE)],
    "long-plain": [("text", LONG_PLAIN)],
    "other-text-labels": [("abstract", "Abstract."), ("figure_title", "Figure 1: x"), ("vertical_text", "竖排"),
                          ("seal", "印"), ("reference_content", "[1] A. B."), ("algorithm", "for i"),
                          ("content", "1 Intro ... 3"), ("vision_footnote", "* note")],
    "doc-title": [("doc_title", "A Title")],
    "doc-title-hashes": [("doc_title", "## A Title")],
    "paragraph-title": [("paragraph_title", "1. Introduction")],
    "paragraph-title-dash": [("paragraph_title", "- # Methods")],
    "paragraph-title-star": [("paragraph_title", "*  ### Results")],
    "table-html": [("table", "<table><tr><td>1</td><td>$ x $</td></tr></table>")],
    "table-html-padded": [("table", " <table><tr><td>a</td></tr></table>\n")],
    "table-markdown": [("table", "| a | b |\n|---|---|\n| 1 | $ y $ |")],
    "formula-bare": [("display_formula", "E = mc^2")],
    "formula-dollars": [("display_formula", "$$E = mc^2$$")],
    "formula-dollars-lines": [("display_formula", "$$\n\\frac{a}{b}\n$$")],
    "formula-dollars-padded": [("display_formula", "  $$ x $$  ")],
    "formula-brackets": [("display_formula", "\\[ \\int_0^1 f \\]")],
    "formula-parens": [("inline_formula", "\\(a^2\\)")],
    "formula-inline-dollars": [("inline_formula", "$$a$$")],
    "formula-empty": [("display_formula", "")],
    "unknown-label": [("header", "Running header"), ("text", "body")],
    "chinese": [("doc_title", "标题"), ("text", "中文段落，第一行\n第二行。"), ("paragraph_title", "一、引言")],
}

MERGES = {
    "number-after": [("display_formula", "a=b"), ("formula_number", "(1)")],
    "number-before": [("formula_number", "（2）"), ("display_formula", "$$c=d$$")],
    "number-plain": [("display_formula", "e=f"), ("formula_number", "3")],
    "number-decimal": [("display_formula", "g"), ("formula_number", "(2.1)")],
    "number-between": [("display_formula", "x"), ("formula_number", "(4)"), ("display_formula", "y")],
    "number-alone": [("text", "text"), ("formula_number", "(5)"), ("text", "more")],
    "number-last": [("formula_number", "(6)")],
    "number-first-then-text": [("formula_number", "(7)"), ("text", "after")],
    "hyphen-merge": [("text", "the infor-"), ("text", "mation is here")],
    "hyphen-trailing-space": [("text", "a long sen-  "), ("text", "  tence here")],
    "hyphen-upper": [("text", "ends with-"), ("text", "Capital start")],
    "hyphen-not-word": [("text", "value x-"), ("text", "1y")],
    "hyphen-too-short": [("text", "a-"), ("text", "b c")],
    "hyphen-inner-hyphen": [("text", "well--"), ("text", "known")],
    "hyphen-double": [("text", "well---"), ("text", "known")],
    "hyphen-quotes": [("text", "it''-"), ("text", "s fine")],
    "hyphen-only-dash": [("text", "-"), ("text", "lower")],
    "hyphen-over-table": [("text", "struc-"), ("table", "<table></table>"), ("text", "ture follows")],
    "hyphen-skips-upper": [("text", "re-"), ("text", "Upper"), ("text", "port later")],
    "hyphen-taken-twice": [("text", "ab-"), ("text", "Cd-"), ("text", "cde here")],
    "hyphen-title": [("paragraph_title", "Pre-"), ("text", "amble text")],
    "hyphen-chinese": [("text", "中文-"), ("text", "文字")],
    "bullets-fill": [("text", "- one"), ("text", "two"), ("text", "· three")],
    "bullets-chain": [("text", "- one"), ("text", "two"), ("text", "- three"), ("text", "four"), ("text", "- five")],
    "bullets-misaligned": [("text", "- one", [100, 0, 900, 50]), ("text", "two", [120, 60, 900, 90]),
                           ("text", "- three", [100, 100, 900, 150])],
    "bullets-edge": [("text", "- one", [100, 0, 900, 50]), ("text", "two", [110, 60, 900, 90]),
                     ("text", "- three", [100, 100, 900, 150])],
    "bullets-no-box": [("text", "- one"), ("text", "two", None), ("text", "- three")],
    "bullets-title-between": [("text", "- one"), ("paragraph_title", "two"), ("text", "- three")],
    "bullets-already": [("text", "- one"), ("text", "- two"), ("text", "- three")],
}

EMPTY = {
    "none": [("text", None), ("text", "kept")],
    "blank": [("text", ""), ("text", "   \n "), ("text", "\\t"), ("table", ""), ("text", "kept")],
    "title-empty": [("doc_title", ""), ("paragraph_title", None)],
    "all-empty": [("text", None), ("table", None)],
    "figure-no-content": [("image", None), ("chart", ""), ("image", "caption-ish text")],
}


@pytest.mark.parametrize("regions", SINGLE.values(), ids=SINGLE.keys())
def test_region_formatting(sdk, regions):
    check(sdk, [page(*regions)])


@pytest.mark.parametrize("regions", MERGES.values(), ids=MERGES.keys())
def test_merges(sdk, regions):
    check(sdk, [page(*regions)])


@pytest.mark.parametrize("regions", EMPTY.values(), ids=EMPTY.keys())
def test_empty_regions(sdk, regions):
    check(sdk, [page(*regions)])


def test_merge_results(sdk):
    """Spot checks that the cases above exercise the merges, not only agree."""
    _, md, _ = check(sdk, [page(*MERGES["number-after"])])
    assert md == "$$\na=b \\tag{1}\n$$"
    json_pages, md, _ = check(sdk, [page(*MERGES["hyphen-merge"])])
    assert md == "the information is here" and [r["index"] for r in json_pages[0]] == [0]
    _, md, _ = check(sdk, [page(*MERGES["bullets-fill"])])
    assert md == "- one\n\n- two\n\n- three"


def test_region_fields(sdk):
    """Out-of-order indices sorted, task_type and score dropped, polygon and extras kept, renumbered."""
    regions = page(("text", "second"), ("text", None), ("table", "<table></table>"),
                   ("text", "first", BOX, {"polygon": [[1, 2], [3, 4]], "extra": {"k": [1]}}))
    regions[0]["index"], regions[3]["index"] = 7, -1
    json_pages, _, _ = check(sdk, [regions])
    assert [(r["index"], r["content"]) for r in json_pages[0]] == [(0, "first"), (1, "<table></table>"), (2, "second")]
    assert "score" not in json_pages[0][0] and json_pages[0][0]["polygon"] == [[1, 2], [3, 4]]
    json_pages[0][0]["extra"]["k"].append(2)
    assert regions[3]["extra"] == {"k": [1]}  # the JSON is a copy


def crop(color: str) -> Image.Image:
    return Image.new("RGB", (8, 6), color)


FIG_A, FIG_B, FIG_C = [50, 200, 500, 600], [520, 200, 950, 600], [50, 50, 400, 300]


@pytest.mark.parametrize("prefix", ["cropped", "doc"])
def test_figures(sdk, prefix):
    pages = [page(("text", "before"), ("image", None, FIG_A), ("chart", "", FIG_B), ("text", "after")),
             page(("image", None, FIG_C), ("image", None, FIG_A), ("image", None, None))]
    crops = {(0, *FIG_A): crop("red"), (0, *FIG_B): crop("green"), (1, *FIG_C): crop("blue")}  # (1, *FIG_A) absent
    json_pages, md, images = check(sdk, pages, crops, prefix)
    assert list(images) == [f"{prefix}_page0_idx0.jpg", f"{prefix}_page0_idx1.jpg", f"{prefix}_page1_idx2.jpg"]
    assert f"![Image 1-2](imgs/{prefix}_page1_idx2.jpg)" in md
    assert "image_path" not in json_pages[1][1] and len(json_pages[1]) == 3


def test_figures_without_crops(sdk):
    pages = [page(("image", None, FIG_A), ("text", "caption"))]
    check(sdk, pages)
    check(sdk, pages, {})
    check(sdk, pages, {(1, *FIG_A): crop("red")})  # another page's crop


def test_multi_page(sdk):
    pages = [page(("doc_title", "报告"), ("text", "第一页。")), [], page(("text", None)),
             page(("display_formula", "x"), ("formula_number", "(1)"), ("text", "end-"), ("text", "ing words"))]
    check(sdk, pages)
    check(sdk, [])


@pytest.mark.parametrize("contents", [["page one\n\n$ x $", None, "  \\tpage three"], [], ["中文"]])
def test_without_layout(sdk, contents):
    want_json, want_md = sdk.format_multi_page_results(contents)
    json_pages, markdown = format_pages_without_layout(contents)
    assert json.dumps(json_pages, ensure_ascii=False) == want_json and markdown == want_md


def test_model_output_json():
    pages = [page(("text", "b"), ("image", None, FIG_A, {"polygon": [[0, 0]]})), []]
    pages[0][0]["index"] = 5
    assert model_output_json(pages) == Pipeline._build_raw_json(pages)


# ------------------------------------------------------------------------------------------- files

def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_document_matches_sdk_save(sdk, tmp_path):
    pages = [page(("doc_title", "Überschrift 标题"), ("image", None, FIG_A), ("text", "body")),
             page(("chart", None, FIG_B))]
    crops = {(0, *FIG_A): crop("red"), (1, *FIG_B): Image.new("RGBA", (4, 4), (0, 0, 255, 255)).convert("RGB")}
    json_pages, markdown, images = format_document(pages, crops)
    raw = model_output_json(pages)
    sdk_json, sdk_md, sdk_images = sdk.process(copy.deepcopy(pages), cropped_images=crops)
    PipelineResult(json_result=sdk_json, markdown_result=sdk_md, original_images=["/in/report.pdf"],
                   image_files=sdk_images, raw_json_result=raw).save(tmp_path / "sdk", save_layout_visualization=False)

    out = tmp_path / "out" / "report"
    written = write_document(out, "report", json_pages, markdown, images, model_json=raw)
    expected = tree(tmp_path / "sdk" / "report")
    assert tree(out) == expected  # same files, byte for byte, and no temporaries
    assert sorted(str(p.relative_to(out)) for p in written) == sorted(expected)
    assert written[-1] == out / "report.md"  # the Markdown last: it marks a complete document
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sdk"]  # nothing beside out_dir


def test_write_document_minimal(tmp_path):
    written = write_document(tmp_path, "doc", [[]], "", {})
    assert written == [tmp_path / "doc.json", tmp_path / "doc.md"]
    assert tree(tmp_path) == {"doc.json": b"[\n  []\n]", "doc.md": b""}  # empty Markdown written too


def test_write_document_converts_for_jpeg(tmp_path):
    write_document(tmp_path, "doc", [], "x", {"a.jpg": Image.new("RGBA", (4, 4)), "b.jpg": Image.new("P", (4, 4))})
    assert {Image.open(tmp_path / "imgs" / n).format for n in ("a.jpg", "b.jpg")} == {"JPEG"}


def test_write_document_replaces(tmp_path):
    write_document(tmp_path, "doc", [[{"a": 1}]], "old", {})
    write_document(tmp_path, "doc", [], "new", {})
    assert tree(tmp_path) == {"doc.json": b"[]", "doc.md": b"new"}


def test_write_document_interrupted(tmp_path):
    class Broken:
        mode = "RGB"

        def save(self, f, **kwargs):
            f.write(b"half a jpeg")
            raise KeyboardInterrupt

    write_document(tmp_path, "doc", [], "old", {})
    with pytest.raises(KeyboardInterrupt):
        write_document(tmp_path, "doc", [], "new", {"a.jpg": Broken()})
    assert tree(tmp_path) == {"doc.json": b"[]", "doc.md": b"old"}  # no half file, no temporary


@pytest.mark.parametrize("name, files", [("../up", {}), ("a/b", {}), ("", {}), (".", {}),
                                         ("doc", {"../x.jpg": None}), ("doc", {"sub/x.jpg": None})])
def test_write_document_stays_inside(tmp_path, name, files):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="plain file name"):
        write_document(out, name, [], "x", files)
    assert list(tmp_path.iterdir()) == []
