"""Test inputs for the document pipeline: small vector PDFs, a corrupt and a password-protected PDF,
and a folder of images.

The PDFs are written by hand (`write_pdf`) rather than through PIL's PDF saver, whose pages are
embedded raster images: text in the standard Helvetica font and filled/stroked paths are what a
renderer comparison needs. The password-protected PDF uses the standard security handler, revision
2 (RC4, 40-bit key), the one every reader supports and the only one simple enough to write here.
"""
from __future__ import annotations

import hashlib
import zlib
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

WORDS = ("glyph layout region table formula figure caption header footer column margin "
         "paragraph reading order scan page render token").split()


@dataclass
class PdfPage:
    """One page: its MediaBox size in points, content stream, /Rotate, MediaBox origin, and the
    value of a filled-in text field near its top (an AcroForm widget), if any."""

    width: float
    height: float
    content: bytes
    rotate: int = 0
    origin: tuple[float, float] = (0, 0)
    form_text: str | None = None
    scan: Image.Image | None = None  # an RGB image drawn over the whole page (a scanned page), lossless


def page_content(width: float, height: float, rng: random.Random, title: str) -> bytes:
    """A title, a shaded box, a few lines of words and a small ruled table, scaled to the page."""
    ops = [f"0.15 0.35 0.75 rg 36 {height - 96:.2f} {width - 72:.2f} 40 re f",
           f"BT /F1 22 Tf 1 1 1 rg 48 {height - 84:.2f} Td ({title}) Tj ET", "0 0 0 rg"]
    y = height - 130
    while y > height * 0.45:
        line = " ".join(rng.choice(WORDS) for _ in range(max(3, int(width / 60))))
        ops.append(f"BT /F1 11 Tf 48 {y:.2f} Td ({line}) Tj ET")
        y -= 16
    rows, cols, cell_w, cell_h = 4, 3, (width - 96) / 3, 22
    top = y - 20
    for r in range(rows + 1):
        ops.append(f"48 {top - r * cell_h:.2f} m {48 + cols * cell_w:.2f} {top - r * cell_h:.2f} l S")
    for c in range(cols + 1):
        ops.append(f"{48 + c * cell_w:.2f} {top:.2f} m {48 + c * cell_w:.2f} {top - rows * cell_h:.2f} l S")
    for r in range(rows):
        for c in range(cols):
            ops.append(f"BT /F1 9 Tf {54 + c * cell_w:.2f} {top - (r + 1) * cell_h + 7:.2f} Td "
                       f"({rng.randint(0, 9999)}) Tj ET")
    return "\n".join(ops).encode("latin-1")


def make_pdf(path: str | Path, pages: int, size: tuple[float, float] = (612, 792), seed: int = 0) -> Path:
    """A `pages`-page PDF of text and shapes; every second page is landscape (size swapped)."""
    rng = random.Random(seed)
    specs = []
    for i in range(pages):
        w, h = size if i % 2 == 0 else size[::-1]
        specs.append(PdfPage(w, h, page_content(w, h, rng, f"Document {seed} page {i + 1}")))
    return write_pdf(path, specs)


def make_scanned_pdf(path: str | Path, pages: list[Image.Image], dpi: float = 200,
                     texts: list[list[str]] | None = None) -> Path:
    """A PDF whose pages are the given RGB images at `dpi` (losslessly embedded, as a scanner's
    PDF): rendered at that DPI, every renderer gives the images back pixel for pixel. texts: per
    page, lines of invisible text over the image, top to bottom (an OCR'd scan's text layer)."""
    specs = []
    for n, image in enumerate(pages):
        w, h = (v * 72 / dpi for v in image.size)
        content = f"q {w:.4f} 0 0 {h:.4f} 0 0 cm /Scan Do Q"
        if texts is not None:
            lead = h / (len(texts[n]) + 1)
            content += "".join(f"\nBT 3 Tr /F1 {lead * 0.8:.4f} Tf 1 {h - lead * (i + 1):.4f} Td ({_pdf_string(line)}) Tj ET"
                               for i, line in enumerate(texts[n]))
        specs.append(PdfPage(w, h, content.encode("latin-1"), scan=image.convert("RGB")))
    return write_pdf(path, specs)


def _pdf_string(text: str) -> str:
    """A literal string's body: backslashes and parentheses escaped."""
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_corrupt_pdf(path: str | Path) -> Path:
    """A file with a PDF header and no parsable objects."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"%PDF-1.7\n" + random.Random(0).randbytes(2048) + b"\n%%EOF\n")
    return path


def make_encrypted_pdf(path: str | Path, password: str) -> Path:
    """A one-page PDF that opens only with `password` (user and owner password alike)."""
    rng = random.Random(1)
    page = PdfPage(612, 792, page_content(612, 792, rng, "Secret"))
    return write_pdf(path, [page], password=password)


# Encapsulated PostScript that Pillow identifies as EPS whatever the file is named; decoding it
# would hand it to Ghostscript.
POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\n%%EOF\n"


def fake_ghostscript(folder: str | Path) -> tuple[Path, Path]:
    """An executable `gs` in `folder` that answers --version as Ghostscript does and records every
    call in a marker file -> (the folder, to put first on PATH; the marker, absent until gs runs)."""
    folder, marker = Path(folder), Path(folder) / "gs-ran"
    folder.mkdir(parents=True, exist_ok=True)
    gs = folder / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\n[ "$1" = --version ] && echo 10.02.1\nexit 0\n')
    gs.chmod(0o755)
    return folder, marker


def make_images(folder: str | Path) -> list[Path]:
    """A scan-like image in each supported raster format and colour mode, one of them in a subfolder."""
    folder = Path(folder)
    (folder / "more").mkdir(parents=True, exist_ok=True)
    base = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(base)
    draw.rectangle((20, 20, 300, 60), fill=(40, 90, 190))
    draw.text((30, 30), "Scanned page", fill="white")
    for y in range(80, 220, 20):
        draw.line((20, y, 300, y), fill="black")
    files = {
        "scan.png": base,
        "photo.jpg": base,
        "gray.bmp": base.convert("L"),
        "alpha.webp": base.convert("RGBA"),
        "palette.gif": base.convert("P"),
        "more/inner.jpeg": base,
    }
    paths = []
    for name, image in files.items():
        image.save(folder / name)
        paths.append(folder / name)
    return paths


# --- a minimal PDF writer ------------------------------------------------------------------------

# Standard security handler password padding (PDF 32000-1, 7.6.3.3, algorithm 2).
_PAD = bytes.fromhex("28bf4e5e4e758a4164004e56fffa01082e2e00b6d0683e802f0ca9fe6453697a")
_FILE_ID = bytes(range(16))


def _rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def _security(password: str) -> tuple[bytes, bytes, bytes, int]:
    """(file key, /O, /U, /P) for revision 2 with the same user and owner password."""
    padded = (password.encode("latin-1") + _PAD)[:32]
    permissions = -4  # every permission
    owner = _rc4(hashlib.md5(padded).digest()[:5], padded)  # algorithm 3
    key = hashlib.md5(padded + owner + (permissions & 0xFFFFFFFF).to_bytes(4, "little") + _FILE_ID).digest()[:5]
    return key, owner, _rc4(key, _PAD), permissions  # algorithm 4: /U is the encrypted padding


def write_pdf(path: str | Path, pages: list[PdfPage], password: str | None = None) -> Path:
    """Writes pages as a PDF (Helvetica as /F1 everywhere); creates the parent folder.

    With a password only streams are encrypted, not strings in dictionaries: form fields and
    passwords do not mix here.
    """
    if password is not None and any(page.form_text is not None for page in pages):
        raise ValueError("write_pdf: a password-protected PDF cannot have form fields here")
    objects: list[tuple[bytes, bytes | None]] = []  # (dictionary, stream data or None); number = place + 1

    def add(dictionary: bytes, stream: bytes | None = None) -> int:
        objects.append((dictionary, stream))
        return len(objects)

    catalog, tree = add(b""), add(b"")  # filled in once the pages and fields are known
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    resources = f"<< /Font << /F1 {font} 0 R >> >>"
    kids, fields = [], []
    for page in pages:
        x, y = page.origin
        content = add(b"<< >>", page.content)
        page_resources = resources
        if page.scan is not None:
            w, h = page.scan.size
            image = add(f"<< /Type /XObject /Subtype /Image /Width {w} /Height {h} /ColorSpace /DeviceRGB "
                        f"/BitsPerComponent 8 /Filter /FlateDecode >>".encode(), zlib.compress(page.scan.tobytes()))
            page_resources = resources[:-3] + f" /XObject << /Scan {image} 0 R >> >>"
        annots = ""
        if page.form_text is not None:  # a filled text field, drawn by its appearance stream
            box = (72, page.height - 180, page.width - 72, page.height - 150)
            appearance = add(f"<< /Type /XObject /Subtype /Form /BBox [0 0 {box[2] - box[0]} 30] "
                             f"/Resources {resources} >>".encode(),
                             f"/Tx BMC BT /F1 14 Tf 0 g 4 9 Td ({page.form_text}) Tj ET EMC".encode("latin-1"))
            field = add(f"<< /Type /Annot /Subtype /Widget /FT /Tx /T (field{len(fields)}) /V ({page.form_text}) "
                        f"/DA (/F1 14 Tf 0 g) /F 4 /Rect [{x + box[0]} {y + box[1]} {x + box[2]} {y + box[3]}] "
                        f"/AP << /N {appearance} 0 R >> >>".encode("latin-1"))
            fields.append(f"{field} 0 R")
            annots = f"/Annots [{field} 0 R] "
        number = add(f"<< /Type /Page /Parent {tree} 0 R /MediaBox [{x} {y} {x + page.width} {y + page.height}] "
                     f"/Rotate {page.rotate} /Resources {page_resources} {annots}/Contents {content} 0 R >>".encode())
        kids.append(f"{number} 0 R")
    form = f" /AcroForm << /Fields [{' '.join(fields)}] /DA (/F1 12 Tf 0 g) /DR {resources} >>" if fields else ""
    objects[catalog - 1] = (f"<< /Type /Catalog /Pages {tree} 0 R{form} >>".encode(), None)
    objects[tree - 1] = (f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode(), None)
    trailer_extra, key = b"", None
    if password is not None:
        key, owner, user, permissions = _security(password)
        encrypt = add(b"<< /Filter /Standard /V 1 /R 2 /O <" + owner.hex().encode() + b"> /U <"
                      + user.hex().encode() + b"> /P " + str(permissions).encode() + b" >>")
        trailer_extra = f" /Encrypt {encrypt} 0 R /ID [<{_FILE_ID.hex()}> <{_FILE_ID.hex()}>]".encode()

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for num, (dictionary, stream) in enumerate(objects, start=1):
        offsets.append(len(out))
        body = dictionary
        if stream is not None:
            if key is not None:  # per-object key: algorithm 1
                stream = _rc4(hashlib.md5(key + num.to_bytes(3, "little") + b"\0\0").digest()[:10], stream)
            body = dictionary[:-2] + b"/Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
        out += b"%d 0 obj\n" % num + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R" % (len(objects) + 1, catalog) + trailer_extra + b" >>\n"
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path
