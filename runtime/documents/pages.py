"""The input side of `glmrt parse`: find the documents, count their pages, render them one at a time.

PDF pages come out as the glmocr SDK renders them (utils/image_utils.py: PyMuPDF there, pypdfium2
here): 200 DPI, scaled down so that the long side is at most 3500 px, white background, no alpha,
annotations and form fields drawn. The bitmap size follows MuPDF's arithmetic (`render_size`), so
every page has exactly the SDK's size and scale; the pixels differ only by rasteriser (glyph
hinting and anti-aliasing, a mean of about 2 levels out of 255).

Images are read as the SDK reads them: `Image.open` (the first frame of a GIF), no EXIF rotation,
then `convert("RGB")`, which drops an alpha channel rather than compositing it; but only in the
formats glmrt decodes anywhere (image_processor.IMAGE_FORMATS), whatever the file's suffix says:
PostScript named `.png` never reaches Ghostscript.

A PDF page can also bring its text layer (`PageText`: pdfium's characters placed on the rendered
bitmap), from which each layout region's text is read (`PageText.within`): the reference a
region's recognition drafts from. Scanned pages and images have none.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import struct
import threading
import unicodedata
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from ..image_processor import ImageFormatError, open_image

SUPPORTED = (".pdf", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")  # the SDK CLI's list

# pdfium is not thread-safe (global state shared by all documents): every pdfium call here holds
# this lock. Reentrant, so that a half-read `iter_pages` generator finalised by the garbage
# collector inside a locked section can still close its document from the same thread.
_PDFIUM = threading.RLock()
# Annotations drawn (MuPDF's default); RGB byte order, so that PIL reads the bitmap without a swap.
_RENDER_FLAGS = pdfium_c.FPDF_ANNOT | pdfium_c.FPDF_REVERSE_BYTE_ORDER
_OPEN_ERRORS = {
    pdfium_c.FPDF_ERR_FILE: "the file cannot be read",
    pdfium_c.FPDF_ERR_FORMAT: "not a valid PDF (corrupt or truncated)",
    pdfium_c.FPDF_ERR_PASSWORD: "the PDF is password-protected",
    pdfium_c.FPDF_ERR_SECURITY: "the PDF uses an unsupported encryption scheme",
}


@dataclass
class PageText:
    """A PDF page's text layer as plain data (no pdfium object, so it may cross threads): every
    character pdfium reads on the page, in its order (the content stream's, which born-digital
    documents write in reading order), with the spaces and line breaks pdfium infers between
    them, and each character's centre on the rendered bitmap."""

    chars: str  # one per pdfium character index
    centres: np.ndarray  # [N, 2] float32 (x, y) in rendered pixels; NaN for the characters pdfium infers

    def within(self, box: tuple[float, float, float, float]) -> str | None:
        """The text whose characters' centres lie in `box` (x1, y1, x2, y2 in rendered pixels, as
        a region is cropped), in pdfium's order, one line per line of the page, spaces collapsed:
        as GLM-OCR writes a text region. None when there is none."""
        x1, y1, x2, y2 = box
        x, y = self.centres[:, 0], self.centres[:, 1]
        kept = np.flatnonzero((x >= x1) & (x < x2) & (y >= y1) & (y < y2))  # NaN compares False
        if kept.size == 0:
            return None
        pieces = [self.chars[kept[0]]]
        for before, after in zip(kept[:-1].tolist(), kept[1:].tolist()):
            if after > before + 1:  # characters left out or inferred between: a line break or a space
                between = self.chars[before + 1:after]
                pieces.append("\n" if "\n" in between or "\r" in between else " ")
            pieces.append(self.chars[after])
        return _plain_text("".join(pieces))


# Ligatures as the model spells them out; U+0002: pdfium's mark for a hyphen that ends a line (the
# line break after it is not reported).
_SPELLED = {**{chr(c): unicodedata.normalize("NFKC", chr(c)) for c in range(0xFB00, 0xFB07)}, "\x02": "-\n"}
_SPACES = re.compile(r"[^\S\n]+")


def _plain_text(text: str) -> str | None:
    """pdfium's text -> plain text: \\n line breaks, each line's spaces (tabs, no-break spaces)
    collapsed and trimmed, empty lines and control characters dropped."""
    text = "".join(_SPELLED.get(ch, ch) for ch in text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cn"))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line) or None


@dataclass
class Page:
    """One page of a document: its RGB image, or why it could not be rendered (image None); a PDF
    page's text layer when it was asked for and the page has one."""

    source: Path
    index: int  # 0-based
    image: Image.Image | None
    error: str | None = None
    text: PageText | None = None


class DocumentError(Exception):
    """A whole document cannot be opened; the message is one line, "<file>: <reason>"."""


def find_documents(inputs: list[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their supported files (recursively, sorted, hidden
    files and folders skipped); a file reached twice is kept at its first place.

    Raises ValueError naming the input for a missing path, a file with an unsupported suffix or a
    directory without any supported file (the SDK CLI rejects the same three).
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files = _documents_in(path)
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED:
                raise ValueError(f"{path}: unsupported file type (expected one of {', '.join(SUPPORTED)})")
            files = [path]
        else:
            raise ValueError(f"{path}: no such file or directory")
        for file in files:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                found.append(file)
    return found


def _documents_in(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in SUPPORTED]
    if not files:
        raise ValueError(f"{folder}: no PDF or image files in this directory")
    return sorted(files, key=Path.as_posix)  # the SDK sorts path strings


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def render_size(width_pt: float, height_pt: float, dpi: int = 200, max_side: int = 3500) -> tuple[float, int, int]:
    """(scale in px per point, width px, height px) of a page rendered as the SDK renders it.

    The SDK's scale is dpi / 72, lowered to max_side / long side when the page would exceed
    max_side. MuPDF then sizes the pixmap in float32: the page box times the (float32) scale,
    rounded up after subtracting 0.001 (fz_round_rect), so 612 pt at 200 DPI is 1700 px even
    where the product comes out a hair above 1700.
    """
    scale = dpi / 72.0
    long_side = max(width_pt, height_pt)
    if long_side * scale > max_side:
        scale = max_side / long_side
    s32, eps = _f32(scale), _f32(0.001)
    # A float32 times a float32 is exact in float64, so _f32 of it is MuPDF's rounded float32 product.
    width, height = (math.ceil(_f32(_f32(_f32(side) * s32) - eps)) for side in (width_pt, height_pt))
    return scale, max(width, 1), max(height, 1)


def count_pages(path: Path) -> int:
    """The number of pages: a PDF's page count, 1 for an image. Raises DocumentError."""
    path = Path(path)
    if not _is_pdf(path):
        _open_image(path).close()
        return 1
    with _PDFIUM:
        pdf = _open_pdf(path)
        try:
            return len(pdf)
        finally:
            pdf.close()


def iter_pages(path: Path, dpi: int = 200, max_side: int = 3500, skip: Collection[int] = (),
               text: bool = False) -> Iterator[Page]:
    """Streams the pages of one PDF or image, rendering each only when it is asked for.

    Page indices in `skip` (already done, when resuming) are neither loaded nor rendered. The
    document is opened once, when iteration starts (DocumentError then if it cannot be), and
    closed when the generator is exhausted or closed. A page that fails to load comes back with
    `error` set and no image, and the following pages still come. text: also read each PDF page's
    text layer (Page.text; None for a page without any, and for an image).

    Threads: one document must be iterated from one thread at a time. Different documents may be
    iterated from different threads; their pdfium calls take turns on a module-level lock.
    """
    path, skip = Path(path), set(skip)
    if not _is_pdf(path):
        if 0 not in skip:
            yield _image_page(path)
        return
    with _PDFIUM:
        pdf = _open_pdf(path)
        count = len(pdf)
    try:
        for index in range(count):
            if index not in skip:
                with _PDFIUM:
                    page = _render(pdf, path, index, dpi, max_side, text)
                yield page
    finally:
        with _PDFIUM:
            pdf.close()


def _is_pdf(path: Path) -> bool:
    return path.suffix.lower() == ".pdf"  # as the SDK decides


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DocumentError(f"{path}: no such file")


def _open_image(path: Path) -> Image.Image:
    _require_file(path)
    try:
        return open_image(path)
    except ImageFormatError as exc:
        raise DocumentError(f"{path}: {exc}") from None
    except Exception as exc:  # untrusted bytes: whatever a plugin raises, the document alone fails
        raise DocumentError(f"{path}: not a readable image ({exc})") from exc


def _image_page(path: Path) -> Page:
    with _open_image(path) as image:
        try:
            return Page(path, 0, image.convert("RGB"))  # decodes the pixels: truncated files fail here
        except Exception as exc:  # as in _open_image
            raise DocumentError(f"{path}: not a readable image ({exc})") from exc


def _open_pdf(path: Path) -> pdfium.PdfDocument:
    """The document with its form environment (form fields are drawn); call with _PDFIUM held."""
    _require_file(path)
    # Loaded here rather than by PdfDocument(path), which reports a PDF without pages as a format
    # error (and leaves it open).
    raw = pdfium_c.FPDF_LoadDocument(os.fsencode(path) + b"\0", None)
    if not raw:
        code = pdfium_c.FPDF_GetLastError()
        raise DocumentError(f"{path}: {_OPEN_ERRORS.get(code, f'pdfium cannot open it (error {code})')}")
    pdf = pdfium.PdfDocument(raw)  # owns and closes it
    if len(pdf) == 0:
        pdf.close()
        raise DocumentError(f"{path}: the PDF has no pages")
    try:
        pdf.init_forms()  # before any page is loaded, or its widgets are not drawn
    except pdfium.PdfiumError as exc:
        pdf.close()
        raise DocumentError(f"{path}: pdfium cannot set up its form fields ({exc})") from exc
    return pdf


def _render(pdf: pdfium.PdfDocument, path: Path, index: int, dpi: int, max_side: int, text: bool = False) -> Page:
    """Renders one page at the SDK's size and exact scale (and reads its text layer if `text`);
    call with _PDFIUM held."""
    try:
        page = pdf[index]
    except pdfium.PdfiumError as exc:
        return Page(path, index, None, f"the page cannot be loaded ({exc})")
    try:
        scale, width, height = render_size(*page.get_size(), dpi=dpi, max_side=max_side)
        bitmap = pdfium.PdfBitmap.new_native(width, height, pdfium_c.FPDFBitmap_BGR, rev_byteorder=True)
        try:
            bitmap.fill_rect((255, 255, 255, 255), 0, 0, width, height)
            # The page at exactly `scale` (as MuPDF draws it), not stretched to the rounded bitmap
            # size as FPDF_RenderPageBitmap would; the bitmap's last row and column are partial.
            matrix = pdfium_c.FS_MATRIX(scale, 0, 0, scale, 0, 0)
            clip = pdfium_c.FS_RECTF(0, 0, width, height)
            pdfium_c.FPDF_RenderPageBitmapWithMatrix(bitmap, page, matrix, clip, _RENDER_FLAGS)
            # Form widgets need the form environment; pdfium draws them only to a whole-pixel box.
            pdfium_c.FPDF_FFLDraw(pdf.formenv, bitmap, page, 0, 0, width, height, 0, _RENDER_FLAGS)
            image = bitmap.to_pil()  # a copy for 3-byte pixels: it outlives the bitmap
        finally:
            bitmap.close()
        try:
            layer = _text_layer(page, scale) if text else None
        except pdfium.PdfiumError:  # the page is still read, without a reference to draft from
            layer = None
    finally:
        page.close()
    return Page(path, index, image, text=layer)


def _text_layer(page: pdfium.PdfPage, scale: float) -> PageText | None:
    """The page's characters placed as _render draws them; None without any. Call with _PDFIUM held."""
    # Read unrotated: pdfium orders the lines of text that runs down the display (a page with
    # /Rotate 90 or 270) as columns, left to right, which reverses them on one of the two.
    rotation = page.get_rotation()
    page.set_rotation(0)
    try:
        textpage = page.get_textpage()
    finally:
        page.set_rotation(rotation)
    try:
        count = textpage.count_chars()
        if count <= 0:
            return None
        to_pixels = _pixel_transform(page, scale)
        chars, centres, box = [], np.full((count, 2), np.nan, np.float32), pdfium_c.FS_RECTF()
        for i in range(count):
            code = pdfium_c.FPDFText_GetUnicode(textpage, i)
            # One character per index; a UTF-16 half or no character at all as NUL (dropped from the text)
            chars.append(chr(code) if code <= 0x10FFFF and not 0xD800 <= code < 0xE000 else "\0")
            # The loose box spans the font's ascent to descent: its centre is mid-line for every glyph.
            if pdfium_c.FPDFText_IsGenerated(textpage, i) == 0 and pdfium_c.FPDFText_GetLooseCharBox(textpage, i, box):
                centres[i] = ((box.left + box.right) / 2, (box.bottom + box.top) / 2)
        centres = (centres @ to_pixels[:, :2].T + to_pixels[:, 2]).astype(np.float32)
        return PageText("".join(chars), centres)
    finally:
        textpage.close()


def _pixel_transform(page: pdfium.PdfPage, scale: float) -> np.ndarray:
    """[2, 3] affine map from page space (points) to the rendered bitmap's pixels: pdfium's own
    display matrix (rotation, crop box, y flip) times `scale`. FPDF_PageToDevice gives whole device
    units, so it maps onto a display of 1024 units per point."""
    width, height = page.get_size()
    size_x, size_y = round(width * 1024), round(height * 1024)
    x, y = ctypes.c_int(), ctypes.c_int()

    def device(px: float, py: float) -> np.ndarray:
        if not pdfium_c.FPDF_PageToDevice(page, 0, 0, size_x, size_y, 0, px, py, x, y):
            raise pdfium.PdfiumError("FPDF_PageToDevice failed")
        return np.array([x.value * width / size_x, y.value * height / size_y]) * scale

    origin = device(0.0, 0.0)
    return np.stack([(device(1000.0, 0.0) - origin) / 1000, (device(0.0, 1000.0) - origin) / 1000, origin], axis=1)
