"""`glmrt parse`: documents to Markdown and JSON, layout and recognition in one process.

Three stages overlap. A producer thread renders pages (pypdfium2), runs the layout model on
them in batches, crops their regions and preprocesses each region's recognition request (the
SDK's resize, then the engine's image processing); the main thread only hands every request of
every page ready so far to one engine (continuous batching: regions of many pages share each
step) and steps it, so it keeps the device busy;
a page whose regions are all recognised is recorded on disk, and a document whose pages are all
done is formatted into the glmocr SDK's Markdown and JSON. A bounded queue between the two
keeps at most `max_pages_in_flight` pages of crops in memory.

Drafting: with draft "auto" or "text" (SamplingParams.draft; glmrt parse --draft) the producer
also reads each PDF page's text layer (pages.PageText), and every region's request carries the
text inside the region as its reference_text, which a speculating engine drafts from: born-digital
pages are read in fewer steps, with the same output.

Resuming: each page that succeeded whole is kept as a small JSON record (plus its figure crops) in
`<out>/<name>/.pages/` until its document is written without failures; `<name>_status.json` holds
the settings the records and outputs were made with (`parse_settings`) and, once written, the
document's failed pages. A re-run skips recorded pages without rendering them, skips a document
written with the same settings and no failed pages, parses again the failed pages of one that had
some, and starts over a document whose settings differ. Failures stay local: a document that
cannot be opened, a page that cannot be rendered, a layout batch that fails or a region whose
recognition fails is reported and the rest of the job goes on; the document is still written
(a failed region has content None, which the formatter leaves out), its failed pages named in its
status and its result. Nothing is written outside `<out>`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import queue
import shutil
import threading
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from PIL import Image

from ..engine import Sequence
from ..llm import LLM
from ..outputs import Request as EngineRequest
from ..prompts import TASK_PROMPTS
from ..sampling_params import SamplingParams
from .layout import DEFAULT_MODEL as DEFAULT_LAYOUT
from .layout import LayoutDetector, LayoutRegion, crop_region, region_box
from .markdown import format_document, format_pages_without_layout, model_output_json, write_document
from .pages import DocumentError, Page, count_pages, find_documents, iter_pages

RECORDS = ".pages"  # per-document folder of finished page records, until the document is written
NAME_BYTES = 200  # of an output name: its files' names (<name>_model.json, temporaries) stay within 255
# The SDK's recognition request (its page_loader defaults): greedy, repetition penalty 1.1.
SDK_MAX_TOKENS = 8192
SDK_REPETITION_PENALTY = 1.1
# The SDK resizes each crop before sending it (load_image_to_base64): both sides to multiples of
# 28 (patch 14 x merge 2), two frames' worth of pixels within [MIN, MAX], PIL bicubic.
SDK_CROP_MIN_PIXELS = 112 * 112
SDK_CROP_MAX_PIXELS = 14 * 14 * 4 * 1280 * 71
_FACTOR = 28
LAYOUT_BATCH = 4  # pages per layout call
# Speculative drafting (SamplingParams.draft): the sources that draft from a region's PDF text, and
# the engine options each `draft` implies where none are given: the reference text and n-gram
# lookup need no MTP layer and propose long drafts; the MTP layer's drafts are short.
TEXT_DRAFTS = ("auto", "text")
SPECULATIVE_OPTIONS = ("num_speculative_tokens", "speculative_method")
_LOOKUP = {"num_speculative_tokens": 8, "speculative_method": "ngram"}
DRAFT_ENGINE_OPTIONS = {"auto": _LOOKUP, "text": _LOOKUP, "ngram": _LOOKUP,
                        "mtp": {"num_speculative_tokens": 3, "speculative_method": "mtp"}, "off": {}}


def sdk_params(max_tokens: int = SDK_MAX_TOKENS, draft: str = "auto", output_kind: str = "final_only",
               ) -> SamplingParams:
    """The SDK's recognition sampling: greedy, repetition penalty 1.1; `draft` the speculative
    drafts' source. output_kind: "final_only" where only a region's final text is read (glmrt
    parse, its Ray job); the server streams them ("stream"): /metrics counts a region's prompt and
    tokens as they are read, so a parse whose client leaves is seen at work."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=SDK_REPETITION_PENALTY,
                          draft=draft, output_kind=output_kind)


def region_params(params: SamplingParams, reference: str | None) -> SamplingParams:
    """A region's sampling: `params` with the region's PDF text to draft from (None: none)."""
    return dataclasses.replace(params, reference_text=reference)


def draft_engine_options(draft: str, engine_options: dict) -> dict:
    """The engine options for parsing with `draft`: the speculative ones it implies
    (DRAFT_ENGINE_OPTIONS) unless `engine_options` gives any, which then stand as given. Raises
    ValueError for draft "mtp" on an engine without the MTP layer (speculative_method "ngram")."""
    if draft not in DRAFT_ENGINE_OPTIONS:
        raise ValueError(f"draft must be one of {', '.join(DRAFT_ENGINE_OPTIONS)}, got {draft!r}")
    if not any(name in engine_options for name in SPECULATIVE_OPTIONS):
        return {**engine_options, **DRAFT_ENGINE_OPTIONS[draft]}
    if draft == "mtp" and engine_options.get("speculative_method") == "ngram":
        raise ValueError("draft 'mtp' drafts with the MTP layer, which speculative_method 'ngram' does not load")
    return engine_options


def region_reference(page: Page, region: LayoutRegion, whole_page: bool = False) -> str | None:
    """The PDF text inside a region, its recognition's reference to draft from; None for a page
    without a text layer (a scan, an image) and a region without text. whole_page: the region
    covers the page (no layout)."""
    if page.text is None:
        return None
    return page.text.within((0, 0, *page.image.size) if whole_page else region_box(page.image.size, region.bbox_2d))


def region_requests(page: Image.Image, regions: list[LayoutRegion],
                    whole_page: bool = False) -> tuple[dict[int, Image.Image], dict[int, dict]]:
    """A laid-out page -> (figures: region index -> crop, for the "skip" regions; requests: region
    index -> the recognition request the SDK sends for it, for the others). whole_page: one region
    covering the page, used as is (no layout)."""
    figures, requests = {}, {}
    for i, region in enumerate(regions):
        crop = page if whole_page else crop_region(page, region.bbox_2d)
        if region.task == "skip":
            figures[i] = crop
        else:
            requests[i] = {"images": [sdk_region_image(crop)], "prompt": TASK_PROMPTS[region.task]}
    return figures, requests


def sdk_region_image(crop: Image.Image) -> Image.Image:
    """A region crop as the SDK sends it to the model, minus the JPEG round trip."""
    crop = crop.convert("RGB")
    w, h = crop.size
    frames = 2  # the SDK counts the temporal patch (2 frames) against its pixel bounds
    h_bar, w_bar = round(h / _FACTOR) * _FACTOR, round(w / _FACTOR) * _FACTOR
    if frames * h_bar * w_bar > SDK_CROP_MAX_PIXELS:
        beta = (frames * h * w / SDK_CROP_MAX_PIXELS) ** 0.5
        h_bar, w_bar = int(h / beta / _FACTOR) * _FACTOR, int(w / beta / _FACTOR) * _FACTOR
    elif frames * h_bar * w_bar < SDK_CROP_MIN_PIXELS:
        beta = (SDK_CROP_MIN_PIXELS / (frames * h * w)) ** 0.5
        h_bar, w_bar = -(-h * beta // _FACTOR) * _FACTOR, -(-w * beta // _FACTOR) * _FACTOR
    return crop.resize((int(w_bar), int(h_bar)), Image.Resampling.BICUBIC)


def parse_settings(model: str | Path, layout_model: str | Path | None, *, layout: bool = True, dpi: int = 200,
                   max_side: int = 3500, max_tokens: int = SDK_MAX_TOKENS) -> dict:
    """What a document's outputs depend on, recorded with its progress: a re-run with other settings
    parses it again. A local checkpoint is named by its absolute path (a Hub snapshot's names its
    revision), a Hub id as given. layout False: --no-layout."""
    def named(checkpoint):
        path = Path(checkpoint).expanduser()
        return str(path.resolve()) if path.is_dir() else str(checkpoint)

    return {"model": named(model), "layout": layout,
            "layout_model": named(layout_model) if layout and layout_model is not None else None,
            "dpi": dpi, "max_side": max_side, "max_tokens": max_tokens}


@dataclass
class DocumentResult:
    source: Path
    name: str  # outputs: <output_dir>/<name>/<name>.md, .json, _status.json, imgs/
    num_pages: int = 0
    resumed_pages: int = 0  # recorded by an earlier run, not parsed again
    markdown_path: Path | None = None
    json_path: Path | None = None
    errors: list[str] = field(default_factory=list)  # one line each: page, layout or region failures
    failed_pages: list[int] = field(default_factory=list)  # 1-based; written without them, a re-run retries them


@dataclass
class _PageWork:
    """A rendered page's regions, ready for recognition (or its failure)."""

    doc: Path
    index: int
    size: tuple[int, int] = (0, 0)
    regions: list[LayoutRegion] = field(default_factory=list)
    figures: dict[int, Image.Image] = field(default_factory=dict)  # region index -> crop, for "skip" regions
    # region index -> its recognition request (a request dict; in glmrt parse preprocessed into a
    # Sequence, or why it could not be)
    requests: dict[int, dict | Sequence | str] = field(default_factory=dict)
    references: dict[int, str | None] = field(default_factory=dict)  # region index -> region_reference
    error: str | None = None


@dataclass
class _DocState:
    result: DocumentResult
    folder: Path
    pages_total: int = 0
    pages: dict[int, list[dict]] = field(default_factory=dict)  # page index -> region dicts with content
    figures: dict[tuple, Image.Image] = field(default_factory=dict)  # (page, *bbox_2d) -> crop
    failed: dict[int, list[str]] = field(default_factory=dict)  # page index -> its errors (not recorded)
    rendered_all: bool = False
    started: bool = False  # its status names this job's settings, so its records are this job's


@dataclass
class _Recognising:
    """A page whose regions are being recognised."""

    work: _PageWork
    outstanding: int  # regions not finished yet
    contents: list[str | None]  # per region: its text, None for a figure or a failed region
    errors: list[str] = field(default_factory=list)


def layout_batches(doc: Path, total: int, size: int = LAYOUT_BATCH, skip: Collection[int] = (),
                   **render) -> Iterator[list[Page] | Page]:
    """The pages of a document as the layout model takes them: the rendered pages of each block
    of page indices [0, size), [size, 2 size), ..., in order; a page that could not be rendered
    comes alone, as its Page (image None). Layout results depend (in their last bits) on which
    pages share a forward pass, so every path that parses documents batches them here, and a
    block with a page still to do is rendered whole, its pages in `skip` (recorded by an earlier
    run) included: each page meets the same neighbours as in an uninterrupted run. The caller
    drops the `skip` pages after layout. total: the document's page count (count_pages);
    `render`: iter_pages' options."""
    skip = set(skip)
    blocks = [range(start, min(start + size, total)) for start in range(0, total, size)]
    done = {i for block in blocks if all(i in skip for i in block) for i in block}  # not even rendered
    batch: list[Page] = []
    for page in iter_pages(doc, skip=done, **render):
        if page.image is None:
            if page.index not in skip:
                yield page
        else:
            batch.append(page)
        if page.index % size == size - 1 or page.index == total - 1:
            if batch:
                yield batch
            batch = []


def lay_out(layout: LayoutDetector | None, pages: list[Page]) -> list[_PageWork]:
    """A batch of rendered pages -> each page's regions, figure crops, recognition requests
    (request dicts, not yet preprocessed) and their references (region_reference). layout None:
    each whole page is one text region. A failed layout batch fails its pages only (their `error`
    is set)."""
    if layout is None:
        detected = [[_whole_page()] for _ in pages]
    else:
        try:
            detected = layout.detect([p.image for p in pages])
        except Exception as exc:  # noqa: BLE001 - reported per page, the job goes on
            return [_PageWork(p.source, p.index, error=f"page {p.index + 1}: layout failed: {exc}") for p in pages]
    work = []
    for page, regions in zip(pages, detected):
        item = _PageWork(page.source, page.index, page.image.size, regions)
        item.figures, item.requests = region_requests(page.image, regions, whole_page=layout is None)
        item.references = {i: region_reference(page, regions[i], whole_page=layout is None) for i in item.requests}
        work.append(item)
    return work


def page_record(page: _PageWork, contents: list[str | None], with_layout: bool) -> tuple[list[dict], list[tuple]]:
    """A recognised page -> (its region dicts with their content, [((page, *bbox_2d), crop)] of its
    figures): what the page's record and the formatter take."""
    regions, figures = [], []
    for i, (region, content) in enumerate(zip(page.regions, contents)):
        if not with_layout:  # the SDK's layout-free result: one region, no box
            regions.append({"index": 0, "label": "text", "content": content, "bbox_2d": None})
        else:
            regions.append({**region.to_dict(), "content": content})
        if i in page.figures:
            figures.append(((page.index, *region.bbox_2d), page.figures[i]))
    return regions, figures


async def recognise_pages(engine, pages: list[_PageWork], params: SamplingParams) -> list[tuple[list, list[str]]]:
    """Every region of `pages` recognised at once by an AsyncEngine (sharing its steps with
    whatever else it runs), each with `params` and its reference (region_params) -> per page: its
    contents (None for a figure or a failed region) and one line per failed region."""
    async def recognise(request: dict, reference: str | None) -> str:
        final = None
        async for out in engine.generate(EngineRequest(**request), region_params(params, reference)):
            final = out
        if final is None or final.finish_reason == "error":
            raise RuntimeError(getattr(final, "error", None) or "recognition failed")
        return final.text.strip()

    jobs = [(p, i, recognise(request, page.references[i]))
            for p, page in enumerate(pages) for i, request in page.requests.items()]
    texts = await asyncio.gather(*(job for _, _, job in jobs), return_exceptions=True)
    results = [([None] * len(page.regions), []) for page in pages]
    for (p, i, _), text in zip(jobs, texts):
        if isinstance(text, BaseException):
            results[p][1].append(f"page {pages[p].index + 1} region {i}: {text}")
        else:
            results[p][0][i] = text
    return results


class DocumentOutputs:
    """The output side of a parse job: `<out>/<name>/` per document, the records of its pages that
    succeeded while it is in progress, and once every page is done its Markdown and JSON (each
    file renamed into place) and `<name>_status.json`: {"settings", "pages", "failed_pages"
    (1-based), "errors"}. A document is done (skipped by a re-run) only when written with these
    `settings` (parse_settings) and no failed pages; records made with other settings are dropped."""

    def __init__(self, output_dir: str | Path, settings: dict):
        self.out = Path(output_dir)
        self.settings = settings
        self.with_layout = settings["layout"]

    def open(self, doc, name: str) -> _DocState:
        """The state of one document, already done if an earlier run wrote it with these settings
        and no failed pages; the page records of an earlier run with other settings are removed."""
        folder = self.out / name
        st = _DocState(DocumentResult(source=doc, name=name), folder)
        try:
            status = json.loads(self._status_path(st).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            status = None  # none, or unreadable: parsed again
        if not isinstance(status, dict) or status.get("settings") != self.settings:
            shutil.rmtree(folder / RECORDS, ignore_errors=True)
            return st
        st.started = True
        md, js = folder / f"{name}.md", folder / f"{name}.json"
        written = status.get("failed_pages") == [] and isinstance(status.get("pages"), int)
        if written and md.is_file() and js.is_file() and not (folder / RECORDS).exists():
            st.result.markdown_path, st.result.json_path = md, js
            st.result.num_pages = status["pages"]
        return st

    def load_records(self, st: _DocState) -> set[int]:
        """Page records left by an earlier run with these settings -> their indices (not rendered
        again)."""
        folder = st.folder / RECORDS
        done = set()
        for path in sorted(folder.glob("page-*.json")) if st.started and folder.is_dir() else []:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                figures = {tuple(f["key"]): Image.open(folder / f["file"], formats=["PNG"]).convert("RGB")
                           for f in record["figures"]}
            except (OSError, ValueError, KeyError):
                continue  # unreadable: the page is parsed again
            st.pages[record["page"]] = record["regions"]
            st.figures.update(figures)
            done.add(record["page"])
        st.result.resumed_pages = len(done)
        return done

    def record_page(self, st: _DocState, index: int, regions: list[dict], figures: list[tuple],
                    errors: list[str]) -> None:
        """A page done (regions with content, [(key, crop)] figures, one line per failure of its
        render, layout or regions): kept in memory for its document and, when nothing of it failed,
        recorded on disk; the document is written when it was the last one."""
        for key, crop in figures:
            st.figures[key] = crop
        st.pages[index] = regions
        st.result.errors.extend(errors)
        if errors:
            st.failed[index] = errors
        else:
            self._record(st, index, figures, {"page": index, "regions": regions})
        self.maybe_write(st)

    def _record(self, st: _DocState, index: int, figures: list[tuple], record: dict) -> None:
        folder = st.folder / RECORDS
        folder.mkdir(parents=True, exist_ok=True)
        if not st.started:  # before the first record: the records are this job's settings'
            self._write_status(st, {"settings": self.settings})
            st.started = True
        files = []
        for n, (key, crop) in enumerate(figures):
            name = f"page-{index:05d}-figure-{n}.png"
            _atomic_write(folder / name, lambda f, crop=crop: crop.save(f, format="PNG"), binary=True)
            files.append({"key": list(key), "file": name})
        record["figures"] = files
        _atomic_write(folder / f"page-{index:05d}.json", lambda f: f.write(json.dumps(record, ensure_ascii=False)))

    def rendered(self, st: _DocState, pages_total: int) -> None:
        """Every page of the document has been handed out; it has `pages_total` pages."""
        st.pages_total, st.rendered_all = pages_total, True
        self.maybe_write(st)

    def maybe_write(self, st: _DocState) -> None:
        """Once every page is done: the Markdown, JSON, figures and status; the records are removed
        unless a page failed (a re-run parses only that page again)."""
        if not st.rendered_all or len(st.pages) < st.pages_total or st.result.markdown_path is not None:
            return
        pages = [st.pages[i] for i in range(st.pages_total)]
        name, folder = st.result.name, st.folder
        if not self.with_layout:
            json_pages, markdown = format_pages_without_layout([p[0]["content"] if p else None for p in pages])
            images: dict[str, Image.Image] = {}
        else:
            json_pages, markdown, images = format_document(pages, st.figures)
        # <name>_model.json: the regions as recognised, before formatting (the SDK saves it too)
        write_document(folder, name, json_pages, markdown, images, model_json=model_output_json(pages))
        failed = sorted(st.failed)
        self._write_status(st, {"settings": self.settings, "pages": st.pages_total,
                                "failed_pages": [i + 1 for i in failed],
                                "errors": [e for i in failed for e in st.failed[i]]})
        if not failed:
            shutil.rmtree(folder / RECORDS, ignore_errors=True)
        st.result.num_pages, st.result.failed_pages = st.pages_total, [i + 1 for i in failed]
        st.result.markdown_path, st.result.json_path = folder / f"{name}.md", folder / f"{name}.json"

    def _status_path(self, st: _DocState) -> Path:
        return st.folder / f"{st.result.name}_status.json"

    def _write_status(self, st: _DocState, status: dict) -> None:
        st.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(status, ensure_ascii=False, indent=2)
        _atomic_write(self._status_path(st), lambda f: f.write(text))


class DocumentParser:
    """Parses documents with one LLM (GLM-OCR) and, unless `layout` is None, a layout detector.
    draft: the regions' SamplingParams.draft; with "auto" or "text" each region of a PDF page
    with a text layer has that text as its reference_text (the engine drafts from it when it
    speculates; the output is the same)."""

    def __init__(self, llm: LLM, layout: LayoutDetector | None, *, dpi: int = 200, max_side: int = 3500,
                 max_tokens: int = SDK_MAX_TOKENS, layout_batch_size: int = LAYOUT_BATCH, max_pages_in_flight: int = 8,
                 draft: str = "auto"):
        self.llm = llm
        self.layout = layout
        self.dpi, self.max_side = dpi, max_side
        self.params = sdk_params(max_tokens, draft)
        self.text_layer = draft in TEXT_DRAFTS
        self.settings = parse_settings(llm.engine.model_path, None if layout is None else layout.checkpoint,
                                       layout=layout is not None, dpi=dpi, max_side=max_side, max_tokens=max_tokens)
        self.layout_batch_size = layout_batch_size
        self.max_pages_in_flight = max_pages_in_flight

    # ------------------------------------------------------------------------------ the job

    def parse(self, inputs: list[str | Path], output_dir: str | Path,
              on_progress: Callable[[str, int], None] | None = None) -> list[DocumentResult]:
        """Parse every document of `inputs` (files, directories) into `output_dir`; -> one result
        per document, in input order. on_progress(kind, n) is called with ("pages", n) for pages
        finished and ("regions", n) for regions recognised (a progress bar's updates)."""
        docs = find_documents(inputs)
        self.outputs = DocumentOutputs(output_dir, self.settings)
        states = {doc: self.outputs.open(doc, name) for doc, name in document_names(docs).items()}
        todo = [doc for doc, st in states.items() if st.result.markdown_path is None]
        report = on_progress or (lambda kind, n: None)
        for st in states.values():
            if st.result.markdown_path is not None:
                report("pages", st.result.num_pages)
        work: queue.Queue = queue.Queue(maxsize=self.max_pages_in_flight)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(todo, states, work, stop), daemon=True,
                                    name="glmrt-parse-pages")
        producer.start()
        try:
            self._recognise(states, work, report)
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    work.get(timeout=0.05)
                except queue.Empty:
                    pass
            producer.join()
        return [states[doc].result for doc in docs]

    # ------------------------------------------------------------------- producer: pages, layout

    def _produce(self, docs: list[Path], states: dict[Path, _DocState], work: queue.Queue,
                 stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    work.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            self._produce_pages(docs, states, put, stop)
        except BaseException as exc:  # a bug or MemoryError: the consumer re-raises it rather than wait forever
            put(("crashed", exc))

    def _produce_pages(self, docs: list[Path], states: dict[Path, _DocState], put: Callable[[object], bool],
                       stop: threading.Event) -> None:
        for doc in docs:
            st = states[doc]
            try:
                st.pages_total = count_pages(doc)
                done = self.outputs.load_records(st)
                for batch in layout_batches(doc, st.pages_total, self.layout_batch_size, skip=done,
                                            dpi=self.dpi, max_side=self.max_side, text=self.text_layer):
                    if stop.is_set():
                        return
                    if isinstance(batch, Page):  # not rendered
                        work = [_PageWork(doc, batch.index, error=f"page {batch.index + 1}: {batch.error}")]
                    else:
                        work = self._layout_pages(batch, skip=done)
                    if not all(put(w) for w in work):
                        return
            except DocumentError as exc:
                if not put(("failed", doc, str(exc))):
                    return
                continue
            if not put(("rendered", doc)):
                return
        put(("end",))

    def _layout_pages(self, pages: list[Page], skip: Collection[int] = ()) -> list[_PageWork]:
        """Regions of a batch of pages, their figures cropped and their recognition requests
        preprocessed here, off the engine's thread; the pages in `skip` are laid out (as the
        batch's neighbours) and dropped."""
        work = [item for item in lay_out(self.layout, pages) if item.index not in skip]
        for item in work:
            for i, request in item.requests.items():
                try:
                    item.requests[i] = self.llm.engine.prepare(request, region_params(self.params, item.references[i]))
                except (ValueError, TypeError, OSError) as exc:  # reported with the page, the rest goes on
                    item.requests[i] = str(exc)
            # the page's crops in one buffer: the step that admits them does not concatenate them
            self.llm.engine.pack_pixels([r for r in item.requests.values() if not isinstance(r, str)])
        return work

    # --------------------------------------------------------------- consumer: recognition

    def _recognise(self, states: dict[Path, _DocState], work: queue.Queue,
                   report: Callable[[str, int], None]) -> None:
        pending: dict[str, tuple[_Recognising, int]] = {}  # request id -> (its page, region index)
        try:
            self._recognise_loop(states, work, report, pending)
        finally:  # interrupted or failed: the engine keeps nothing of this job
            for request_id in pending:
                self.llm.engine.abort(request_id)

    def _recognise_loop(self, states: dict[Path, _DocState], work: queue.Queue, report: Callable[[str, int], None],
                        pending: dict[str, tuple[_Recognising, int]]) -> None:
        engine = self.llm.engine
        ended = False
        while not ended or engine.has_unfinished():
            # Take the pages that are ready; block only when the engine has nothing to do.
            while not ended:
                try:
                    item = work.get(block=not engine.has_unfinished(), timeout=None)
                except queue.Empty:
                    break
                if isinstance(item, tuple):
                    ended = self._control(item, states, report)
                    continue
                if item.error is not None:
                    self._finish_page(states[item.doc], _Recognising(item, 0, [], [item.error]), report)
                    continue
                page = self._submit(item, pending)
                if page.outstanding == 0:
                    self._finish_page(states[item.doc], page, report)
                    continue
                if engine.stats().num_waiting >= engine.options.max_num_seqs:
                    break  # enough queued for the next steps: let the engine run
            if not engine.has_unfinished():
                continue
            for out in engine.step():
                if not out.finished or out.request_id not in pending:
                    continue
                page, i = pending.pop(out.request_id)
                if out.finish_reason == "error":
                    page.errors.append(f"page {page.work.index + 1} region {i}: {out.error}")
                else:
                    page.contents[i] = out.text.strip()
                    report("regions", 1)
                page.outstanding -= 1
                if page.outstanding == 0:
                    self._finish_page(states[page.work.doc], page, report)

    def _submit(self, work: _PageWork, pending: dict[str, tuple[_Recognising, int]]) -> _Recognising:
        """Queue the recognition of the page's regions (figures need none) -> the page, being
        recognised; a region whose request could not be built is one of its failures."""
        page = _Recognising(work, 0, [None] * len(work.regions))
        for i, request in work.requests.items():
            if isinstance(request, str):
                page.errors.append(f"page {work.index + 1} region {i}: {request}")
            else:
                pending[self.llm.engine.enqueue(request)] = (page, i)
                page.outstanding += 1
        return page

    def _finish_page(self, st: _DocState, page: _Recognising, report) -> None:
        """A page whose regions are all finished (or that failed whole) -> its document's outputs."""
        regions, figures = page_record(page.work, page.contents, self.layout is not None)
        self.outputs.record_page(st, page.work.index, regions, figures, page.errors)
        report("pages", 1)

    def _control(self, item: tuple, states: dict[Path, _DocState], report) -> bool:
        """A producer message: ("failed", doc, why), ("rendered", doc), ("end",) -> whether it ended;
        ("crashed", exception) is raised here."""
        if item[0] == "end":
            return True
        if item[0] == "crashed":
            raise RuntimeError(f"glmrt parse: reading pages failed: {item[1]!r}") from item[1]
        st = states[item[1]]
        if item[0] == "failed":
            st.result.errors.append(item[2])
        else:
            self.outputs.rendered(st, st.pages_total)
        return False


def _whole_page() -> LayoutRegion:
    return LayoutRegion(index=0, label="text", task="text", score=1.0, bbox_2d=[0, 0, 1000, 1000], polygon=[])


def document_names(docs: list) -> dict:
    """Output names (<out>/<name>/<name>.md ...), one per document, each a plain folder name inside
    <out>: the file's stem without leading dots (never "", "." or ".."; "document" when nothing is
    left) and at most NAME_BYTES bytes. Documents whose stems are equal, ignoring case as some file
    systems do, each add "-" and 8 hex digits of a hash of their path, so that a name does not
    depend on the order of the inputs. docs: paths, or URIs whose path, before any "::" chain,
    ends in the file name."""
    stems = {doc: _safe_stem(doc) for doc in docs}
    shared = Counter(stem.casefold() for stem in stems.values())
    names = {doc: stem for doc, stem in stems.items() if shared[stem.casefold()] == 1}
    taken = {name.casefold() for name in names.values()}
    for doc, stem in stems.items():
        if doc not in names:
            key = str(doc) if isinstance(doc, str) else str(Path(doc).resolve())
            name = f"{stem}-{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
            while name.casefold() in taken:  # a stem that reads like another's name and hash
                name += "_"
            names[doc] = name
            taken.add(name.casefold())
    return {doc: names[doc] for doc in docs}


def _safe_stem(doc) -> str:
    stem = PurePosixPath(doc.split("::", 1)[0]).stem if isinstance(doc, str) else Path(doc).stem
    # At most NAME_BYTES bytes of UTF-8 (room for "-<hash>_model.json"), no partial characters.
    stem = stem.lstrip(".").encode("utf-8", "surrogateescape")[:NAME_BYTES].decode("utf-8", "ignore")
    return stem or "document"


def _atomic_write(path: Path, write: Callable, binary: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
        write(f)
    os.replace(tmp, path)


def parse(inputs: str | Path | list[str | Path], output_dir: str | Path, *, model: str = "zai-org/GLM-OCR",
          layout_model: str | Path | None = DEFAULT_LAYOUT, device=None, dtype=None, backend: str = "auto",
          dpi: int = 200, max_tokens: int = SDK_MAX_TOKENS, progress: bool = False, draft: str = "auto",
          **engine_options) -> list[DocumentResult]:
    """PDFs, images and directories of them -> Markdown and JSON under `output_dir` (one folder
    per document). layout_model=None recognises each whole page as one region. Engine options are
    glmrt.LLM's. progress: a tqdm bar over pages (with regions/s). draft: speculative decoding's
    draft source (SamplingParams.draft; "auto" drafts from each region's PDF text, then n-gram
    lookup); without speculative engine options it implies them (DRAFT_ENGINE_OPTIONS: "off" none)."""
    inputs = inputs if isinstance(inputs, list) else [inputs]
    engine_options = draft_engine_options(draft, engine_options)
    find_documents(inputs)  # a missing or unsupported input fails now, before any model loads
    llm = LLM(model, device=device, dtype=dtype, backend=backend, **engine_options)
    llm.engine.require_text_model("glmrt parse")
    layout = None if layout_model is None else LayoutDetector.from_pretrained(layout_model, device=llm.engine.device)
    parser = DocumentParser(llm, layout, dpi=dpi, max_tokens=max_tokens, draft=draft)
    if not progress:
        return parser.parse(inputs, output_dir)
    from tqdm import tqdm

    total = 0
    for doc in find_documents(inputs):
        try:
            total += count_pages(doc)
        except DocumentError:
            pass
    with tqdm(total=total, unit="page", dynamic_ncols=True) as bar:
        regions = [0]

        def update(kind: str, n: int) -> None:
            if kind == "pages":
                bar.update(n)
            else:
                regions[0] += n
            bar.set_postfix(regions=regions[0], refresh=False)

        return parser.parse(inputs, output_dir, on_progress=update)
