"""Recognised regions -> the glmocr SDK's JSON and Markdown, and its output folder.

Output-equal to the SDK's `ResultFormatter` (glmocr 0.1.5, default config: formula numbers,
hyphenated blocks and bullet points all merged) and to its `PipelineResult.save`.

A region as the pipeline hands it over: {"index", "label" (native PP-DocLayoutV3 label), "content"
(model text; None or "" when recognition failed), "bbox_2d" ([x1, y1, x2, y2] in 0..1000), and
optionally "polygon", "task_type", "score"}. Per page, regions are taken in index order, their
labels mapped to text / table / formula / image (the native one kept as "native_label"), contents
cleaned and formatted, empty ones dropped; formula numbers become the \\tag{} of their formula,
words hyphenated across two text blocks are joined, and list items that lost their bullet get it
back. The Markdown is every region's content, blank-line separated; figures become links to
imgs/<file>.
"""
from __future__ import annotations

import copy
import json
import os
import re
import secrets
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Callable

from PIL import Image

Region = dict[str, Any]

# The SDK config's label_visualization_mapping, inverted: native label -> category. Other labels
# (the layout model's abandoned kinds, should one arrive) keep their own name.
_CATEGORY = {
    "table": "table",
    "display_formula": "formula", "inline_formula": "formula",
    "chart": "image", "image": "image",
    **dict.fromkeys(("abstract", "algorithm", "content", "doc_title", "figure_title", "paragraph_title",
                     "reference_content", "text", "vertical_text", "vision_footnote", "seal", "formula_number"),
                    "text"),
}
_LIST_INDENT = 10  # bbox units (of 1000): how far a list item's left edge may be from its neighbours'

_LEADING_TABS = re.compile(r"^(?:\\t)+")  # literal backslash-t escapes, as the model sometimes writes
_TRAILING_TABS = re.compile(r"(?:\\t)+$")
_RUNS = [re.compile(p) for p in (r"(\.)\1{2,}", r"(·)\1{2,}", r"(_)\1{2,}", r"(\\_)\1{2,}")]  # leaders
_LONG = 2048  # chars: outputs this long are checked for a decoding loop
_INLINE_MATH = re.compile(r"(?<!\$)\$\s*((?:[^$\\]|\\.)+?)\s*\$(?!\$)")  # $...$, not $$
_HASHES = re.compile(r"^#+\s*")
_PAREN_ITEM = re.compile(r"[(（](\d+|[A-Za-z])[)）](.*)")  # "(1)x", "（a）x"
_ITEM = re.compile(r"(\d+|[A-Za-z])([.)）])(.*)")  # "1.x", "a)x", "2）x"
_LONE_NEWLINE = re.compile(r"(?<!\n)\n(?!\n)")
_WORD = re.compile(r"[a-z][a-z'\-]{2,30}")


# ----------------------------------------------------------------------------------- public API

def format_document(pages: list[list[Region]], cropped_images: dict[tuple, Image.Image] | None = None,
                    image_prefix: str = "cropped") -> tuple[list[list[Region]], str, dict[str, Image.Image]]:
    """-> (JSON pages, Markdown, figure files) as the SDK's ResultFormatter.process, its JSON before
    json.dumps. cropped_images: figure crops keyed by (page index, *bbox_2d); a figure region without
    one stays in the JSON but not in the Markdown. Figure files: filename -> the crop itself, saved as
    imgs/<filename> and linked from the Markdown; numbered across the whole document."""
    json_pages = [_format_page(regions) for regions in pages]
    image_files: dict[str, Image.Image] = {}
    page_texts = []
    for page_idx, regions in enumerate(json_pages):
        blocks = []
        for region in regions:
            if region["label"] != "image":
                blocks.append(region["content"])  # never empty: empty regions were dropped
                continue
            bbox = region.get("bbox_2d")
            crop = cropped_images.get((page_idx, *bbox)) if cropped_images and bbox else None
            if crop is None:
                continue
            number = len(image_files)
            filename = f"{image_prefix}_page{page_idx}_idx{number}.jpg"
            image_files[filename] = crop
            region["image_path"] = f"imgs/{filename}"
            blocks.append(f"![Image {page_idx}-{number}](imgs/{filename})")
        page_texts.append("\n\n".join(blocks))
    return json_pages, "\n\n".join(page_texts), image_files


def format_pages_without_layout(contents: list[str | None]) -> tuple[list[list[Region]], str]:
    """Whole-page recognition (no layout) -> (JSON pages, Markdown) as the SDK's
    format_multi_page_results: each page one cleaned text region; pages split by a rule."""
    texts = [_clean(content) for content in contents]
    json_pages = [[{"index": 0, "label": "text", "content": text, "bbox_2d": None}] for text in texts]
    return json_pages, "\n\n---\n\n".join(texts)


def model_output_json(pages: list[list[Region]]) -> list[list[Region]]:
    """The SDK's <name>_model.json: the same regions in index order, renumbered, with the model's
    text before any formatting."""
    return [[{"index": i, "label": r.get("label", "text"), "content": r.get("content", ""),
              "bbox_2d": r.get("bbox_2d"), "polygon": r.get("polygon")}
             for i, r in enumerate(sorted(regions, key=lambda r: r.get("index", 0)))]
            for regions in pages]


def write_document(out_dir: Path, name: str, json_pages: list, markdown: str,
                   image_files: dict[str, Image.Image], model_json: list | None = None) -> list[Path]:
    """Write the SDK's result files into out_dir: imgs/<filename> (JPEG, quality 95), <name>.json
    (indent 2, unescaped unicode), <name>_model.json when model_json is given, and <name>.md.
    -> the paths written.

    Each file goes to a temporary name beside it and is renamed into place, and the Markdown comes
    last, so an interrupted run leaves no half file and a present .md means a complete set. Unlike
    the SDK, an empty Markdown is written too (as an empty file): the .md marks a finished document."""
    for part in (name, *image_files):
        if part in ("", ".", "..") or Path(part).name != part:
            raise ValueError(f"output file name {part!r} is not a plain file name")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if image_files:
        (out_dir / "imgs").mkdir(exist_ok=True)
    for filename, image in image_files.items():
        rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")  # JPEG has no alpha
        written.append(_write_atomic(out_dir / "imgs" / filename,
                                     lambda f, im=rgb: im.save(f, format="JPEG", quality=95)))
    written.append(_write_atomic(out_dir / f"{name}.json", _dump_json(json_pages)))
    if model_json is not None:
        written.append(_write_atomic(out_dir / f"{name}_model.json", _dump_json(model_json)))
    written.append(_write_atomic(out_dir / f"{name}.md", lambda f: f.write(markdown.encode("utf-8"))))
    return written


# ------------------------------------------------------------------------------ one page's regions

def _format_page(regions: list[Region]) -> list[Region]:
    kept = []
    for item in sorted(regions, key=lambda r: r.get("index", 0)):  # stable: equal indices keep order
        region = copy.deepcopy(item)  # the JSON is the caller's to keep; inputs stay untouched
        native = region["label"]
        region["native_label"] = native
        region["label"] = label = _CATEGORY.get(native, native)
        region["content"] = content = _format_content(region["content"], label, native)
        if label != "image" and (content is None or not content.strip()):
            continue  # failed or blank; figures stay, their content is not shown
        region.pop("task_type", None)
        region.pop("score", None)
        kept.append(region)
    kept = _join_hyphenated(_fold_formula_numbers(kept))
    _restore_bullets(kept)
    for index, region in enumerate(kept):
        region["index"] = index
    return kept


def _format_content(content: str | None, label: str, native: str) -> str | None:
    """One region's text as the SDK shows it: cleaned (an HTML table or a $$-wrapped formula as
    is), titles as # / ## headings, formulas as $$ blocks, text with list markers normalised and
    every line its own paragraph."""
    if content is None:
        return None
    as_is = ((label == "table" and content.startswith("<table") and content.endswith("</table>"))
             or (label == "formula" and content.startswith("$$") and content.endswith("$$")))
    if not as_is:
        content = _clean(content)

    if native == "doc_title":
        content = "# " + _HASHES.sub("", content)
    elif native == "paragraph_title":
        if content.startswith(("- ", "* ")):
            content = content[2:].lstrip()
        content = "## " + _HASHES.sub("", content).lstrip()

    if label == "formula":
        if content.startswith(("$$", "\\[", "\\(")):
            content = content[2:].strip()
        if content.endswith(("$$", "\\]", "\\)")):
            content = content[:-2].strip()
        content = f"$$\n{content}\n$$"

    if label == "text":
        if content.startswith("```") and not content.endswith("```"):
            content += "\n```"  # a code block cut off by the token limit
        if content.startswith(("·", "•", "* ")):
            content = "- " + content[1:].lstrip()
        if m := _PAREN_ITEM.fullmatch(content):  # single-line items only, as the SDK's ^...$ match
            content = f"({m[1]}) {m[2].lstrip()}"
        if m := _ITEM.fullmatch(content):
            content = f"{m[1]}{')' if m[2] == '）' else m[2]} {m[3].lstrip()}"
        content = _LONE_NEWLINE.sub("\n\n", content)
    return content


def _clean(content: str | None) -> str:
    """Edge whitespace and literal \\t escapes off, leader runs (..., ···, ___) cut to three, a
    decoding loop cut (long outputs only), inline math tidied."""
    if content is None:
        return ""
    content = _LEADING_TABS.sub("", content).lstrip()
    content = _TRAILING_TABS.sub("", content).rstrip()
    for run in _RUNS:
        content = run.sub(r"\1\1\1", content)
    if len(content) >= _LONG:
        content = _cut_loop(content)
    return _tidy_inline_math(content).strip()


def _cut_loop(text: str) -> str:
    """text: stripped, >= _LONG chars. A unit of 10+ chars repeated 10+ times back to back is kept
    once and what follows dropped; else, when one line makes >= 80% of >= 10 non-empty lines,
    the text ends at the first line of that line's first run of three."""
    loop = re.search(r"(.{10,%d}?)\1{9,}" % (len(text) // 10), text, re.DOTALL)
    if loop:
        return text[:loop.start()] + loop[1]
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 10:
        return text
    common, count = Counter(lines).most_common(1)[0]
    if count < 10 or count / len(lines) < 0.8:
        return text
    first = next((i for i in range(len(lines) - 2) if lines[i] == lines[i + 1] == lines[i + 2] == common), None)
    if first is None:
        return text
    raw_lines = text.split("\n")
    non_empty = [n for n, line in enumerate(raw_lines) if line.strip()]  # lines[i] is raw_lines[non_empty[i]]
    return "\n".join(raw_lines[:non_empty[first] + 1])


def _tidy_inline_math(text: str) -> str:
    """"$ x $" -> "$x$", spaced off an adjoining letter or digit: "a$x$b" -> "a $x$ b"."""
    def tidy(m: re.Match) -> str:
        formula = m[1].strip()
        if not formula:
            return m[0]
        before = " " if m.start() > 0 and text[m.start() - 1].isalnum() else ""
        after = " " if m.end() < len(text) and text[m.end()].isalnum() else ""
        return f"{before}${formula}${after}"
    return _INLINE_MATH.sub(tidy, text)


# ------------------------------------------------------------------------- merges across regions

def _fold_formula_numbers(regions: list[Region]) -> list[Region]:
    """A formula_number right before or after a formula becomes its \\tag{} (one between two
    formulas tags the first); a formula_number beside no formula is dropped."""
    out = []
    i = 0
    while i < len(regions):
        region, after = regions[i], regions[i + 1] if i + 1 < len(regions) else None
        if region["native_label"] == "formula_number":
            if after is not None and after["label"] == "formula":
                out.append(_tagged(after, region))
                i += 1  # the formula is used up too
        elif region["label"] == "formula" and after is not None and after["native_label"] == "formula_number":
            out.append(_tagged(region, after))
            i += 1  # the number is used up too
        else:
            out.append(region)
        i += 1
    return out


def _tagged(formula: Region, number: Region) -> Region:
    tag = number["content"].strip()
    if (tag.startswith("(") and tag.endswith(")")) or (tag.startswith("（") and tag.endswith("）")):
        tag = tag[1:-1]
    # formula content is always "$$\n...\n$$" (see _format_content): the tag goes inside
    return {**formula, "content": formula["content"][:-3] + f" \\tag{{{tag}}}\n$$"}


def _join_hyphenated(regions: list[Region]) -> list[Region]:
    """A text region ending in "-" takes in the first later text region (other kinds passed over)
    that starts in lower case, when the two fragments join into a plausible English word:
    "... infor-" + "mation ..." -> "... information ...". As in the SDK, a region already taken in
    by an earlier one can be taken in again."""
    out, taken = [], set()
    for i, region in enumerate(regions):
        if i in taken:
            continue
        head = region["content"].rstrip() if region["label"] == "text" else ""
        if head.endswith("-"):
            j = next((j for j in range(i + 1, len(regions))
                      if regions[j]["label"] == "text" and regions[j]["content"].lstrip()[:1].islower()), None)
            if j is not None:
                words_before, words_after = head[:-1].split(), regions[j]["content"].split()
                if words_before and _is_word(words_before[-1] + words_after[0]):
                    region = {**region, "content": head[:-1] + regions[j]["content"].lstrip()}
                    taken.add(j)
        out.append(region)
    return out


def _is_word(token: str) -> bool:
    """The SDK's dependency-free test (it uses wordfreq only when that optional package is there)."""
    token = token.lower()
    return bool(_WORD.fullmatch(token)) and "--" not in token and "''" not in token


def _restore_bullets(regions: list[Region]) -> None:
    """In place: a text region between two "- " items, its left edge within _LIST_INDENT of both,
    is an item too."""
    for before, region, after in zip(regions, regions[1:], regions[2:]):
        if any(r["native_label"] != "text" for r in (before, region, after)):
            continue
        if region["content"].startswith("- ") or not (before["content"].startswith("- ")
                                                       and after["content"].startswith("- ")):
            continue
        left, own, right = (r.get("bbox_2d") for r in (before, region, after))
        if left and own and right and abs(own[0] - left[0]) <= _LIST_INDENT and abs(own[0] - right[0]) <= _LIST_INDENT:
            region["content"] = "- " + region["content"]


# ---------------------------------------------------------------------------------------- files

def _dump_json(data: list) -> Callable[[BinaryIO], Any]:
    return lambda f: f.write(json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8"))


def _write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """write(file) into a hidden temporary beside path, then rename it over path."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path
