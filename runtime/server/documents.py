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
from ..outputs import Request as EngineRequest
from .media import MediaLoader
from .protocol import APIError, ImageRef


def add_document_routes(app: FastAPI, engine: AsyncEngine, media: MediaLoader, check_auth: Callable,
                        read_json: Callable, layout_model: str | None) -> None:
    from ..documents.layout import crop_region
    from ..documents.markdown import format_document
    from ..documents.pipeline import SDK_MAX_TOKENS, SDK_REPETITION_PENALTY, sdk_region_image
    from ..processor import TASK_PROMPTS
    from ..sampling_params import SamplingParams

    params = SamplingParams(max_tokens=SDK_MAX_TOKENS, temperature=0.0, repetition_penalty=SDK_REPETITION_PENALTY)
    detector: list = []  # the layout model, once loaded
    loading = asyncio.Lock()

    async def layout():
        from ..documents.layout import LayoutDetector

        async with loading:
            if not detector:
                detector.append(await asyncio.to_thread(LayoutDetector.from_pretrained, layout_model,
                                                        device=engine.engine.device))
        return detector[0]

    async def recognise(image: Image.Image, task: str) -> str | None:
        final = None
        async for out in engine.generate(EngineRequest(images=[sdk_region_image(image)], prompt=TASK_PROMPTS[task]),
                                         params):
            final = out
        return None if final is None or final.finish_reason == "error" else final.text.strip()

    async def parse_unit(pages: list[Image.Image]) -> tuple[list, str]:
        detected = await asyncio.to_thread((await layout()).detect, pages) if pages else []
        jobs, grouped, figures = [], [], {}
        for index, (page, regions) in enumerate(zip(pages, detected)):
            entries = []
            for region in regions:
                crop = crop_region(page, region.bbox_2d)
                entry = {**region.to_dict(), "content": None}
                if region.task == "skip":
                    figures[(index, *region.bbox_2d)] = crop
                else:
                    jobs.append((entry, recognise(crop, region.task)))
                entries.append(entry)
            grouped.append(entries)
        for (entry, _), text in zip(jobs, await asyncio.gather(*(job for _, job in jobs), return_exceptions=True)):
            entry["content"] = text if isinstance(text, str) else None
        json_pages, markdown, _ = format_document(grouped, figures)
        return json_pages, markdown

    @app.post("/glmocr/parse")
    async def glmocr_parse(request: Request) -> JSONResponse:
        check_auth(request)
        if layout_model is None:
            raise APIError("this server was started without a layout model: it parses no documents", status=404)
        body = await read_json(request)
        refs = _sources(body)
        pages = [await asyncio.to_thread(_pages, data, ref)
                 for ref, data in zip(refs, await media.load_all(refs, documents=True))]
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
