"""POST /glmocr/parse: whole documents, answered as the glmocr SDK's own server answers them.

Request: {"images": [url, ...]} (or one url), or the SDK's MaaS client's {"file": url}; a url is a
data: URI, an allowed http(s) URL or an allowed file:// URL (the server's media policy) of an
image or a PDF. Each is one unit: its pages are laid out (PP-DocLayoutV3, loaded on the first
request), every text/table/formula region is recognised by the server's engine (the regions of
all units at once, sharing steps with the chat requests), and the SDK's formatter output is returned:
{"json_result", "markdown_result", "layout_details", "md_results", "data_info": {"pages": []},
"usage", "model", "id", "created"} -- several units give a list of JSON results and Markdown
joined by "---", as the SDK's server does. Figures are linked in the Markdown but not returned.
When the engine speculates (--num-speculative-tokens), each region of a PDF page with a text layer
drafts from the text inside it (draft "auto", as `glmrt parse`): the output is the same, sooner.

Bounded like a chat request: at most --max-images-per-request units and --max-pages-per-request
pages (counted before any page is rendered: a 400 naming the limit); admitted against the same
in-flight limit (a 503 at capacity); a unit's pages are rendered a layout batch at a time, as its
recognition takes them, so a document holds a few pages in memory, not all of them; the
regions' engine requests are counted in /metrics as chat requests are; and everything is
cancelled when the client leaves, or answered 503 when a shutdown's drain timeout passes.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from ..engine import AsyncEngine, RequestFailed, gather_or_cancel
from .media import MediaLoader
from .metrics import RequestTimer, ServerMetrics
from .protocol import APIError, ImageRef

# Layout batches of one unit that may wait for recognition: the next batch is rendered and laid
# out while the previous one is recognised, and no further ahead.
BATCHES_AHEAD = 2
_CROP = Image.new("RGB", (1, 1))  # stands in for every figure crop (see recognise_batch)


def add_document_routes(app: FastAPI, engine: AsyncEngine, media: MediaLoader, metrics: ServerMetrics, *,
                        layout_model: str | None, max_units: int, max_pages: int, check_auth: Callable,
                        read_json: Callable, in_flight: Callable, until_done: Callable) -> None:
    """in_flight(): a context manager holding one of the server's in-flight places (503 when none
    is free); until_done(request, work): work's result, None if the client left (work cancelled)."""
    from ..documents.markdown import format_document
    from ..documents.pages import DocumentError, Page, count_pages
    from ..documents.pipeline import lay_out, layout_batches, page_record, recognise_pages, sdk_params
    from ..image_processor import load_image

    params = sdk_params(output_kind="stream")  # /metrics counts each region's tokens as they come
    # PDF pages bring their text layer, each region's reference to draft from, when the engine speculates.
    text_layer = engine.engine.options.num_speculative_tokens > 0
    counted = _CountedEngine(engine, metrics)
    detector: list = []  # the layout model, once loaded
    loading = asyncio.Lock()

    async def layout():
        from ..documents.layout import LayoutDetector

        async with loading:
            if not detector:
                detector.append(await asyncio.to_thread(LayoutDetector.from_pretrained, layout_model,
                                                        device=engine.engine.device))
        return detector[0]

    def open_unit(data: bytes, ref: ImageRef, folder: Path) -> tuple[Any, int]:
        """A unit's encoded bytes -> (what its pages come from: a PDF's path or the decoded image,
        its page count); errors name the field."""
        if not data.startswith(b"%PDF-"):
            try:  # as glmrt parse (and the SDK) read an image: no EXIF rotation, alpha dropped
                return load_image(data, exif_transpose=False).convert("RGB"), 1
            except ValueError as exc:
                raise APIError(f"'{ref.param}': {exc}", ref.param) from exc
        path = folder / f"{ref.param}.pdf"
        path.write_bytes(data)
        try:
            return path, count_pages(path)
        except DocumentError as exc:
            raise APIError(f"'{ref.param}': {str(exc).replace(str(path), 'the PDF')}", ref.param) from exc

    def batches(source: Any, total: int):
        """A unit's pages in the layout batches glmrt parse makes, each rendered when asked for; a
        page that cannot be rendered is a blank one."""
        if isinstance(source, Image.Image):
            yield [Page(Path("unit"), 0, source)]
            return
        for batch in layout_batches(source, total, text=text_layer):
            yield [Page(batch.source, batch.index, Image.new("RGB", (1, 1), "white"))] if isinstance(batch, Page) \
                else batch

    async def parse_unit(source: Any, total: int) -> tuple[list, str]:
        pages = batches(source, total)
        recognising: list[asyncio.Task] = []
        try:
            while True:
                while sum(not task.done() for task in recognising) >= BATCHES_AHEAD:
                    await asyncio.wait(recognising, return_when=asyncio.FIRST_COMPLETED)
                batch = await asyncio.to_thread(next, pages, None)  # rendered in a worker thread
                if batch is None:
                    break
                laid_out = await asyncio.to_thread(lay_out, await layout(), batch)
                failed = [page.error for page in laid_out if page.error is not None]
                if failed:
                    raise APIError(failed[0], status=500)
                recognising.append(asyncio.ensure_future(recognise_batch(laid_out)))
            results = await asyncio.gather(*recognising)
        finally:
            for task in recognising:  # a failure or a cancellation: the regions still going stop
                task.cancel()
        grouped, figures = [], {}
        for regions, page_figures in (page for batch in results for page in batch):
            grouped.append(regions)
            figures.update(page_figures)
        json_pages, markdown, _ = format_document(grouped, figures)  # the figure files are not returned
        return json_pages, markdown

    async def recognise_batch(laid_out: list) -> list[tuple[list, dict]]:
        """A laid-out batch -> per page: (its region dicts with content, {figure key: a stand-in
        for its crop}). No figure file is returned, so no crop is kept to the end of the document:
        the formatter only needs to know that a figure has one, to link it in the Markdown."""
        recognised = await recognise_pages(counted, laid_out, params)
        pages = [page_record(page, contents, with_layout=True) for page, (contents, _) in zip(laid_out, recognised)]
        return [(regions, {key: _CROP for key, _ in figures}) for regions, figures in pages]

    async def parse(refs: list[ImageRef]) -> list[tuple[list, str]]:
        datas = await media.load_all(refs, documents=True)
        with tempfile.TemporaryDirectory(prefix="glmrt-parse-") as tmp:
            units = await asyncio.gather(*(asyncio.to_thread(open_unit, data, ref, Path(tmp))
                                           for data, ref in zip(datas, refs)))
            num_pages = sum(total for _, total in units)
            if num_pages > max_pages:
                raise APIError(f"the request has {num_pages} pages, more than the limit of {max_pages} pages per "
                               f"request (--max-pages-per-request)", refs[0].param.split("[")[0])
            return await gather_or_cancel(parse_unit(source, total) for source, total in units)

    @app.post("/glmocr/parse")
    async def glmocr_parse(request: Request) -> Response:
        check_auth(request)
        if layout_model is None:
            raise APIError("this server was started without a layout model: it parses no documents", status=404)
        refs = _sources(await read_json(request), max_units)
        with in_flight():
            units = await until_done(request, parse(refs))
        if units is None:
            return Response(status_code=499)
        if len(units) == 1:
            json_result, markdown = units[0]
        else:
            json_result, markdown = [u[0] for u in units], "\n\n---\n\n".join(u[1] for u in units)
        return JSONResponse({
            "json_result": json_result, "markdown_result": markdown,
            "layout_details": json_result, "md_results": markdown, "data_info": {"pages": []},
            "usage": {}, "model": "glm-ocr", "id": f"chatcmpl-{uuid.uuid4().hex[:29]}", "created": int(time.time()),
        })


class _CountedEngine:
    """The engine as recognise_pages uses it, every region's request counted in /metrics as a chat
    request is: its tokens, latencies and finish reason ("abort" when it was cancelled)."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics

    async def generate(self, request, params) -> AsyncIterator:
        timer = RequestTimer(self.metrics)
        outputs = self.engine.generate(request, params)
        try:
            async for out in outputs:
                timer.observe(out)
                yield out
        except RequestFailed:
            timer.end("error")
            raise
        finally:
            await outputs.aclose()  # aborts the engine request if it is still going
            timer.end("abort")  # counts nothing if it ended


def _sources(body: Any, max_units: int) -> list[ImageRef]:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object with 'images' (or 'file')", "body")
    images = body.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(u, str) and u for u in images):
        raise APIError("'images' must be a URL or a list of URLs (strings)", "images")
    if len(images) > max_units:
        raise APIError(f"'images' has {len(images)} URLs, more than the limit of {max_units} per request "
                       f"(--max-images-per-request)", "images")
    refs = [ImageRef(url, f"images[{i}]") for i, url in enumerate(images)]
    if not refs and isinstance(body.get("file"), str) and body["file"]:
        refs = [ImageRef(body["file"], "file")]
    if not refs:
        raise APIError("no document given: send 'images' (a list of URLs) or 'file'", "images")
    return refs
