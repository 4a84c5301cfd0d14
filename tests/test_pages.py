"""glmrt.documents.pages: finding documents, and PDF pages rendered at the glmocr SDK's sizes.

The SDK renders with PyMuPDF (glmocr.utils.image_utils); where it imports, sizes are compared with
its own renders exactly and pixels within a rasteriser tolerance (different glyph hinting and
anti-aliasing: pdfium and MuPDF never agree bit for bit).
"""
import random
import threading
from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageOps

from glmrt.documents.pages import DocumentError, PageText, count_pages, find_documents, iter_pages, render_size
from glmrt_testing.documents import (PdfPage, make_corrupt_pdf, make_encrypted_pdf, make_images, make_pdf, make_scanned_pdf,
                             page_content, write_pdf)

LETTER, LETTER_LANDSCAPE = (1700, 2200), (2200, 1700)  # 612 x 792 pt at 200 DPI


def sdk_image_utils():
    """The SDK's PDF renderer module, or a skip where glmocr (and its PyMuPDF) is not installed."""
    pytest.importorskip("fitz", reason="the SDK renders with PyMuPDF")
    return pytest.importorskip("glmocr.utils.image_utils")


def odd_pages() -> list[PdfPage]:
    """Pages that stress the size arithmetic: fractional sizes, /Rotate, a MediaBox off the origin,
    a page over the 3500 px cap, and widths a hair either side of MuPDF's 0.001 px rounding slack."""
    specs = [(595.28, 841.89, 0, (0, 0)), (612, 792, 90, (0, 0)), (500.3, 700.7, 270, (30.2, -12.1)),
             (2000, 1200, 0, (0, 0)), (419.53, 595.28, 180, (0, 0)), (612.0003, 400, 0, (0, 0)),
             (612.0005, 400, 0, (0, 0)), (119.88038, 119.88034, 0, (0, 0)), (1260.0036, 100, 0, (0, 0))]
    return [PdfPage(w, h, b"", rotate=r, origin=o) for w, h, r, o in specs]


# --- finding documents ---------------------------------------------------------------------------

def test_find_documents_expands_directories_sorted_without_hidden_or_unsupported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images("in")
    make_pdf("in/b.pdf", pages=1)
    make_pdf("in/sub/a.PDF", pages=1)
    make_pdf("in/.hidden.pdf", pages=1)
    make_images("in/.cache")
    Path("in/notes.txt").write_text("not a document")
    Image.new("RGB", (8, 8)).save("in/scan.tiff")  # PIL reads it; the SDK does not accept it
    make_pdf("single.pdf", pages=1)

    # A file reached twice (relative, inside a folder, absolute) is kept once, at its first place.
    found = find_documents(["single.pdf", Path("in"), "in/b.pdf", tmp_path / "in" / "b.pdf"])

    names = ["alpha.webp", "b.pdf", "gray.bmp", "more/inner.jpeg", "palette.gif", "photo.jpg", "scan.png", "sub/a.PDF"]
    assert found == [Path("single.pdf")] + [Path("in", n) for n in names]


@pytest.mark.parametrize("name, message", [("missing.pdf", "no such file or directory"),
                                           ("notes.txt", "unsupported file type"),
                                           ("scan.tif", "unsupported file type"),
                                           ("empty", "no PDF or image files")])
def test_find_documents_rejects_what_the_sdk_rejects(tmp_path, name, message):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "scan.tif").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=message) as info:
        find_documents([tmp_path / name])
    assert str(tmp_path / name) in str(info.value)


# --- PDF pages -----------------------------------------------------------------------------------

def test_pdf_pages_come_in_order_at_200_dpi(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf", pages=5)
    assert count_pages(pdf) == 5
    got = list(iter_pages(pdf))
    assert [(p.source, p.index, p.error) for p in got] == [(pdf, i, None) for i in range(5)]
    assert [p.image.size for p in got] == [LETTER, LETTER_LANDSCAPE] * 2 + [LETTER]
    assert all(p.image.mode == "RGB" for p in got)
    assert got[0].image.getpixel((5, 5)) == (255, 255, 255)  # the white page, no alpha
    assert len({p.image.tobytes() for p in got}) == 5  # each page its own content


def test_render_size_follows_mupdf_arithmetic():
    assert render_size(612, 792) == (200 / 72, 1700, 2200)
    assert render_size(612, 792, dpi=72) == (1.0, 612, 792)
    assert render_size(595.28, 841.89)[1:] == (1654, 2339)  # A4: 1653.56 and 2338.58 px, rounded up
    assert render_size(2000, 1200) == (3500 / 2000, 3500, 2100)  # 5556 px long side, capped at 3500
    assert render_size(1200, 2000, max_side=1000)[1:] == (600, 1000)
    assert render_size(612.0003, 1)[1] == 1700  # 1700.0008 px: within MuPDF's 0.001 px slack
    assert render_size(612.0005, 1)[1] == 1701  # 1700.0014 px: a partial extra column


def test_sizes_equal_the_sdks_renders(tmp_path):
    image_utils = sdk_image_utils()
    pdf = write_pdf(tmp_path / "odd.pdf", odd_pages())
    ours = [p.image.size for p in iter_pages(pdf)]
    sdk = [im.size for im in image_utils.pdf_to_images_pil_iter(str(pdf), dpi=200, max_width_or_height=3500)]
    assert ours == sdk
    assert ours[1] == LETTER_LANDSCAPE and ours[3] == (3500, 2100)


def test_pixels_match_the_sdks_renders(tmp_path):
    image_utils = sdk_image_utils()
    rng = random.Random(0)
    specs = [PdfPage(w, h, page_content(w, h, rng, "Title"), rotate=r, origin=o)
             for w, h, r, o in [(612, 792, 0, (0, 0)), (595.28, 841.89, 90, (0, 0)), (500.3, 700.7, 0, (30.2, -12.1))]]
    specs[2].form_text = "Filled in 1234"
    pdf = write_pdf(tmp_path / "doc.pdf", specs)
    sdk = list(image_utils.pdf_to_images_pil_iter(str(pdf)))
    for page, ref in zip(iter_pages(pdf), sdk, strict=True):
        ours, theirs = np.asarray(page.image, np.int16), np.asarray(ref, np.int16)
        diff = np.abs(ours - theirs)
        # Glyph edges differ between rasterisers; shapes and their positions do not.
        assert diff.mean() < 3.5, diff.mean()
        assert (diff.max(-1) > 64).mean() < 0.02
        shifted = np.abs(ours[:, 1:] - theirs[:, :-1]).mean()  # one pixel off would be far worse
        assert diff.mean() < 0.7 * shifted


def test_scanned_pages_render_back_pixel_for_pixel_here_and_in_the_sdk(tmp_path):
    """A scanner's PDF (lossless page images at 200 DPI): both renderers give the images back, so
    glmrt parse and the SDK's pipeline see the same pixels (benchmarks/documents.py relies on it)."""
    image_utils = sdk_image_utils()
    rng = np.random.default_rng(0)
    scans = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
             for w, h in [(1700, 2200), (2200, 1700), (333, 517)]]
    pdf = make_scanned_pdf(tmp_path / "scan.pdf", scans)
    sdk = list(image_utils.pdf_to_images_pil_iter(str(pdf), dpi=200, max_width_or_height=3500))
    for page, ref, scan in zip(iter_pages(pdf), sdk, scans, strict=True):
        assert np.array_equal(np.asarray(page.image), np.asarray(scan))
        assert np.array_equal(np.asarray(ref.convert("RGB")), np.asarray(scan))


def test_form_fields_are_drawn(tmp_path):
    """pdfium draws form widgets only through the form environment (MuPDF always draws them)."""
    pdf = write_pdf(tmp_path / "form.pdf", [PdfPage(612, 792, b"", form_text="Filled in 1234")])
    [page] = iter_pages(pdf)
    gray = np.asarray(page.image.convert("L"))
    field = gray[416:501, 200:1500]  # its box, 612..642 pt from the bottom, 72 pt from either side
    assert (field < 128).sum() > 1000 and (gray < 128).sum() == (field < 128).sum()


def test_skip_loads_no_skipped_page_and_the_document_opens_once(tmp_path, monkeypatch):
    pdf = make_pdf(tmp_path / "doc.pdf", pages=5)
    calls = {"open": 0, "close": 0, "load": []}
    open_, close, get_page = pdfium.PdfDocument.__init__, pdfium.PdfDocument.close, pdfium.PdfDocument.get_page

    def counting_open(self, *args, **kwargs):
        calls["open"] += 1
        open_(self, *args, **kwargs)

    def counting_close(self, *args, **kwargs):
        calls["close"] += 1
        close(self, *args, **kwargs)

    def counting_load(self, index):
        calls["load"].append(index)
        return get_page(self, index)

    monkeypatch.setattr(pdfium.PdfDocument, "__init__", counting_open)
    monkeypatch.setattr(pdfium.PdfDocument, "close", counting_close)
    monkeypatch.setattr(pdfium.PdfDocument, "get_page", counting_load)

    stream = iter_pages(pdf, skip={0, 2, 4, 9})
    assert calls == {"open": 0, "close": 0, "load": []}  # nothing happens before iteration
    assert next(stream).index == 1 and calls["load"] == [1]  # one page at a time
    assert [p.index for p in stream] == [3]
    assert calls == {"open": 1, "close": 1, "load": [1, 3]}


def test_a_page_that_fails_to_load_is_reported_and_the_rest_follow(tmp_path, monkeypatch):
    pdf = make_pdf(tmp_path / "doc.pdf", pages=3)
    get_page = pdfium.PdfDocument.get_page

    def flaky(self, index):
        if index == 1:
            raise pdfium.PdfiumError("Failed to load page.")
        return get_page(self, index)

    monkeypatch.setattr(pdfium.PdfDocument, "get_page", flaky)
    got = list(iter_pages(pdf, dpi=36))
    assert [(p.index, p.image is None) for p in got] == [(0, False), (1, True), (2, False)]
    assert "Failed to load page" in got[1].error


@pytest.mark.parametrize("make, reason", [(make_corrupt_pdf, "not a valid PDF"),
                                          (lambda path: make_encrypted_pdf(path, "s3cret"), "password-protected"),
                                          (lambda path: path.write_bytes(b""), "not a valid PDF"),
                                          (lambda path: write_pdf(path, []), "the PDF has no pages"),
                                          (lambda path: path, "no such file")])
def test_unopenable_pdfs_raise_one_line_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.pdf"
    make(path)
    for attempt in (lambda: count_pages(path), lambda: next(iter_pages(path))):
        with pytest.raises(DocumentError) as info:
            attempt()
        message = str(info.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message


def test_the_encrypted_pdf_is_valid_with_its_password(tmp_path):
    """Guards the hand-written security handler: the password-protected PDF is one pdfium can open."""
    pdf = pdfium.PdfDocument(make_encrypted_pdf(tmp_path / "secret.pdf", "s3cret"), password="s3cret")
    try:
        text = pdf[0].get_textpage().get_text_range()
    finally:
        pdf.close()
    assert text.startswith("Secret")


def test_two_threads_render_two_pdfs_as_one_thread_does(tmp_path):
    pdfs = [make_pdf(tmp_path / f"doc{i}.pdf", pages=4, seed=i) for i in range(2)]

    def render(pdf):
        return [p.image.tobytes() for p in iter_pages(pdf, dpi=72)]

    expected = [render(pdf) for pdf in pdfs]
    for _ in range(5):  # without the lock, pdfium crashes the process within two rounds
        got: dict[int, list[bytes]] = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, render(pdfs[i]))) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [got[0], got[1]] == expected


# --- images --------------------------------------------------------------------------------------

def test_images_are_one_rgb_page_as_the_sdk_converts_them(tmp_path):
    for path in make_images(tmp_path):
        assert count_pages(path) == 1
        [page] = iter_pages(path)
        assert (page.source, page.index, page.error, page.image.mode) == (path, 0, None, "RGB")
        assert page.image.tobytes() == Image.open(path).convert("RGB").tobytes()
    assert list(iter_pages(tmp_path / "scan.png", skip={0})) == []


def test_exif_orientation_is_not_applied_as_in_the_sdk(tmp_path):
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.png", exif=exif)
    assert ImageOps.exif_transpose(Image.open(tmp_path / "rotated.png")).size == (20, 40)  # the tag is there
    [page] = iter_pages(tmp_path / "rotated.png")
    assert page.image.size == (40, 20) and page.image.tobytes() == image.tobytes()


def test_unreadable_images_raise_one_line_naming_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    truncated = tmp_path / "truncated.jpg"
    Image.effect_noise((200, 200), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    for path in (broken, truncated):
        with pytest.raises(DocumentError) as info:
            list(iter_pages(path))
        assert str(info.value).startswith(f"{path}: not a readable image") and "\n" not in str(info.value)
    with pytest.raises(DocumentError, match="not a readable image"):
        count_pages(broken)


# --- text layer ----------------------------------------------------------------------------------

LINES = ["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]


def lines_page(rotate: int = 0, origin: tuple[float, float] = (0, 0)) -> PdfPage:
    """A 300 x 200 pt page with LINES in 12 pt Helvetica, 20 pt apart, top to bottom."""
    x, y = origin
    content = "\n".join(f"BT /F1 12 Tf {x + 20} {y + 150 - 20 * i} Td ({line}) Tj ET" for i, line in enumerate(LINES))
    return PdfPage(300, 200, content.encode(), rotate=rotate, origin=origin)


@pytest.mark.parametrize("rotate, origin", [(0, (0, 0)), (90, (30.5, -12.25)), (180, (0, 0)), (270, (-7, 40))])
def test_the_text_layer_gives_a_regions_words_in_reading_order(tmp_path, rotate, origin):
    """The text inside a box of rendered pixels: the whole page gives every line in order, one per
    line; a box around the middle line's ink (found in the render, whatever the page's /Rotate
    and MediaBox) gives that line alone."""
    pdf = write_pdf(tmp_path / "lines.pdf", [lines_page(rotate, origin)])
    [page] = iter_pages(pdf, text=True)
    width, height = page.image.size
    assert page.text.within((0, 0, width, height)) == "\n".join(LINES)
    axis = 1 if rotate in (0, 180) else 0  # lines run across the rows, or (turned) down the columns
    ink = (np.asarray(page.image.convert("L")) < 128).any(axis=axis)
    edges = np.flatnonzero(np.diff(ink.astype(int)))  # where the ink bands start and end
    assert len(edges) == 6  # three lines
    start, end = edges[2] - 5, edges[3] + 5  # the middle band, with a margin
    box = (0, start, width, end) if axis == 1 else (start, 0, end, height)
    assert page.text.within(box) == LINES[1]
    assert page.text.within((0, 0, 1, 1)) is None
    [plain] = iter_pages(pdf)
    assert plain.text is None  # read only when asked for


def test_scans_and_images_have_no_text_layer(tmp_path):
    scan = make_scanned_pdf(tmp_path / "scan.pdf", [Image.new("RGB", (300, 200), "white")])
    image = tmp_path / "page.png"
    Image.new("RGB", (300, 200), "white").save(image)
    assert [page.text for path in (scan, image) for page in iter_pages(path, text=True)] == [None, None]


def test_region_text_is_plain_text_as_the_model_writes_it():
    """pdfium's inferred breaks, its mark for a line-end hyphen, ligatures and odd spaces -> plain
    lines; characters left out of the box between kept ones are a space, or a line break when a
    line ended among them."""
    def layer(chars: str, kept=lambda i, ch: ch not in "\r\n") -> PageText:
        centres = np.array([[i, 0.0] if kept(i, ch) else [np.nan, np.nan] for i, ch in enumerate(chars)], np.float32)
        return PageText(chars, centres)

    text = layer("Ef\ufb01cient\x02ly  done,\r\n\tnext\xa0line!\r\n\r\nend")
    assert text.within((0, -1, 100, 1)) == "Efficient-\nly done,\nnext line!\nend"
    assert text.within((0, -1, 3, 1)) == "Effi"  # characters 0-2
    chars = "one two three\r\nfour five"
    text = layer(chars, lambda i, ch: i < 3 or 8 <= i < 13 or i >= chars.index("five"))
    assert text.within((0, -1, 100, 1)) == "one three\nfive"
