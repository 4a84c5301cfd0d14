"""POST /glmocr/parse: whole documents, answered as the glmocr SDK's own server answers them.

Request: {"images": [url, ...]} (or one url), or the SDK's MaaS client's {"file": url}; a url is a
data: URI, an allowed http(s) URL or an allowed file:// URL (the server's media policy) of an
image or a PDF. Each is one unit: its pages are laid out (PP-DocLayoutV3, loaded on the first
request), every text/table/formula region is recognised by the server's engine (all regions of
all units at once, sharing steps with the chat requests), and the SDK's formatter output is returned:
{"json_result", "markdown_result", "layout_details", "md_results", "data_info": {"pages": []},
"usage", "model", "id", "created"} -- several units give a list of JSON results and Markdown
joined by "---", as the SDK's server does. Figures are linked in the Markdown but not returned.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from ..engine.async_engine import AsyncEngine
from .media import MediaLoader
from .protocol import APIError, ImageRef


def add_document_routes(app: FastAPI, engine: AsyncEngine, media: MediaLoader, check_auth: Callable,
                        read_json: Callable, layout_model: str | None) -> None:
    from ..documents.markdown import format_document
    from ..documents.pages import Page
    from ..documents.pipeline import LAYOUT_BATCH, lay_out, page_record, recognise_pages, sdk_params

    params = sdk_params()
    detector: list = []  # the layout model, once loaded
    loading = asyncio.Lock()

    async def layout():
        from ..documents.layout import LayoutDetector

        async with loading:
            if not detector:
                detector.append(await asyncio.to_thread(LayoutDetector.from_pretrained, layout_model,
                                                        device=engine.engine.device))
        return detector[0]

    async def parse_unit(images: list[Image.Image]) -> tuple[list, str]:
        pages = [Page(Path("unit"), i, image) for i, image in enumerate(images)]
        laid_out = []
        for start in range(0, len(pages), LAYOUT_BATCH):  # the batches glmrt parse lays out
            laid_out += await asyncio.to_thread(lay_out, await layout(), pages[start:start + LAYOUT_BATCH])
        failed = [page.error for page in laid_out if page.error is not None]
        if failed:
            raise APIError(failed[0], status=500)
        grouped, figures = [], {}
        for page, (contents, _) in zip(laid_out, await recognise_pages(engine, laid_out, params)):
            regions, page_figures = page_record(page, contents, with_layout=True)
            grouped.append(regions)
            figures.update(page_figures)
        json_pages, markdown, _ = format_document(grouped, figures)
        return json_pages, markdown

    @app.post("/glmocr/parse")
    async def glmocr_parse(request: Request) -> JSONResponse:
        check_auth(request)
        if layout_model is None:
            raise APIError("this server was started without a layout model: it parses no documents", status=404)
        body = await read_json(request)
        refs = _sources(body)
        pages = await asyncio.gather(*(asyncio.to_thread(_pages, data, ref)
                                       for ref, data in zip(refs, await media.load_all(refs, documents=True))))
        units = await asyncio.gather(*(parse_unit(unit) for unit in pages))  # their regions share the engine
        if len(units) == 1:
            json_result, markdown = units[0]
        else:
            json_result, markdown = [u[0] for u in units], "\n\n---\n\n".join(u[1] for u in units)
        return JSONResponse({
            "json_result": json_result, "markdown_result": markdown,
            "layout_details": json_result, "md_results": markdown, "data_info": {"pages": []},
            "usage": {}, "model": "glm-ocr", "id": f"chatcmpl-{uuid.uuid4().hex[:29]}", "created": int(time.time()),
        })


def _sources(body: Any) -> list[ImageRef]:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object with 'images' (or 'file')", "body")
    images = body.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(u, str) and u for u in images):
        raise APIError("'images' must be a URL or a list of URLs (strings)", "images")
    refs = [ImageRef(url, f"images[{i}]") for i, url in enumerate(images)]
    if not refs and isinstance(body.get("file"), str) and body["file"]:
        refs = [ImageRef(body["file"], "file")]
    if not refs:
        raise APIError("no document given: send 'images' (a list of URLs) or 'file'", "images")
    return refs


def _pages(data: bytes, ref: ImageRef) -> list[Image.Image]:
    """A PDF's pages (rendered as `glmrt parse` does) or the image (read as it reads one); errors
    name the field."""
    from ..documents.pages import DocumentError, iter_pages
    from ..image_processor import load_image

    if not data.startswith(b"%PDF-"):
        try:  # as glmrt parse (and the SDK) read an image: no EXIF rotation, alpha dropped
            return [load_image(data, exif_transpose=False).convert("RGB")]
        except ValueError as exc:
            raise APIError(f"'{ref.param}': {exc}", ref.param) from exc
    with tempfile.TemporaryDirectory(prefix="glmrt-parse-") as tmp:
        path = Path(tmp) / "document.pdf"
        path.write_bytes(data)
        try:
            return [page.image if page.image is not None else Image.new("RGB", (1, 1), "white")
                    for page in iter_pages(path)]
        except DocumentError as exc:
            raise APIError(f"'{ref.param}': {str(exc).replace(str(path), 'the PDF')}", ref.param) from exc
