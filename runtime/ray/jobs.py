"""`glmrt parse --ray`: the document job as a Ray Data pipeline, for many GPUs and hosts.

    documents --(CPU tasks: render)--> pages --(GPU actors: layout + recognition)--> page records
              --(the driver)--> <out>/<name>/<name>.md, .json, _model.json, imgs/

One row per document goes in (one block each, so a document that kills its render task twice
loses that document only). A render task streams the document's pages out as raw RGB rows, a
layout batch per row (as `glmrt parse` batches them: layout results depend on the batch in their
last bits), then one marker row with the page count (or why the document could not be opened). Each actor holds
one LLM engine (an AsyncEngine, its event loop on a thread of its own) and the layout model;
Ray Data hands it several batches of pages at once, and the regions of all of them share the
engine's steps.
What comes back per page is its record (regions with their text, figure crops as PNG): the
driver alone writes outputs, through the same DocumentOutputs as the single-process `glmrt parse`,
so the files are the same bytes and each document is written once, renamed into place.

Fault tolerance is Ray's: a render task that dies is retried; a recognition actor that dies is
restarted (Ray Data's default for actors) and its batches are redone, at most
`ACTOR_TASK_RETRIES` times; a page seen twice is recorded once. Blocks that still fail are
dropped (DataContext.max_errored_blocks = -1) and their documents reported as not written: one
bad document never fails the job. A re-run skips recorded pages and documents written with the
same settings and no failed pages (DocumentOutputs), and parses failed pages again.

Inputs are local paths (files or directories, as `glmrt parse` takes them) or URIs that pyarrow's
filesystems read (s3://, gs://, hdfs://, file://...) or fsspec's (zip://...::file:///a.zip);
outputs go to a directory of the driver's filesystem (a shared mount when the cluster has many
hosts).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image

from ..documents.layout import DEFAULT_MODEL as DEFAULT_LAYOUT
from ..documents.pages import SUPPORTED, DocumentError, Page, PageText, count_pages, find_documents
from ..documents.pipeline import (LAYOUT_BATCH, SDK_MAX_TOKENS, TEXT_DRAFTS, DocumentOutputs, DocumentResult,
                                  document_names, draft_engine_options, lay_out, layout_batches, page_record,
                                  parse_settings, recognise_pages, sdk_params)
from .cluster import init

ACTOR_TASK_RETRIES = 3  # a batch whose actor died this often is dropped (its documents are reported)
MARKER = -1  # pages_total of a row that is not a document's last (and the page of that last row)


# ----------------------------------------------------------------------------------- inputs

def is_uri(source: str | Path) -> bool:
    return isinstance(source, str) and "://" in source


def find_inputs(inputs: list[str | Path]) -> list[Path | str]:
    """Local files and directories as `glmrt parse` expands them; URIs listed through their
    filesystem (a directory: its supported files, recursively, sorted). Raises ValueError naming
    the input."""
    found: list[Path | str] = []
    for given in inputs:
        if not is_uri(given):
            found += [d for d in find_documents([given]) if d not in found]
            continue
        from pyarrow import fs as pafs

        try:
            filesystem, path = _filesystem(given)
            info = filesystem.get_file_info(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow and fsspec raise many kinds for a bad URI
            raise ValueError(f"{given}: cannot be read ({exc})") from exc
        if info.type == pafs.FileType.Directory:
            entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
            files = sorted(e.path for e in entries if e.type == pafs.FileType.File and _supported(e.path, path))
            if not files:
                raise ValueError(f"{given}: no PDF or image files in this directory")
        elif info.type == pafs.FileType.File:
            if PurePosixPath(path).suffix.lower() not in SUPPORTED:
                raise ValueError(f"{given}: unsupported file type (expected one of {', '.join(SUPPORTED)})")
            files = [path]
        else:
            raise ValueError(f"{given}: no such file or directory")
        found += [u for u in (_uri_of(given, f) for f in files) if u not in found]
    return found


def _filesystem(uri: str):
    """(a pyarrow filesystem, the path in it) for a URI pyarrow reads (s3://, gs://, hdfs://,
    file://...) or, where fsspec is installed, one fsspec reads (chained ones too, such as
    zip://docs::s3://bucket/archive.zip)."""
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, TypeError) as pyarrow_error:  # ArrowInvalid is a ValueError
        try:
            import fsspec
        except ImportError:
            raise pyarrow_error from None
        filesystem, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def _uri_of(given: str, path: str) -> str:
    """The URI of `path`, found under the URI `given`: the same scheme (and the same chain)."""
    scheme, rest = given.split("://", 1)
    chain = rest.split("::", 1)[1] if "::" in rest else None
    return f"{scheme}://{path}" + (f"::{chain}" if chain else "")


def _supported(path: str, root: str) -> bool:
    """A supported file, with no hidden part below the listed directory."""
    parts = PurePosixPath(path).relative_to(root).parts
    return PurePosixPath(path).suffix.lower() in SUPPORTED and not any(p.startswith(".") for p in parts)


@contextmanager
def _local(source: str) -> Iterator[Path]:
    """A local path holding the document: itself, or a temporary copy of a URI's bytes."""
    if not is_uri(source):
        yield Path(source)
        return
    filesystem, path = _filesystem(source)
    with tempfile.TemporaryDirectory(prefix="glmrt-ray-") as tmp:
        local = Path(tmp) / f"document{PurePosixPath(path).suffix.lower()}"
        with filesystem.open_input_stream(path) as src, open(local, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        yield local


# ------------------------------------------------------------------------ stage 1: render (CPU)

def render_document(row: dict, dpi: int = 200, max_side: int = 3500, layout_batch: int = LAYOUT_BATCH,
                    text: bool = False) -> Iterator[dict]:
    """One document row {"key", "source", "skip" (JSON list of recorded pages)} -> a row per layout
    batch, as glmrt parse forms them: {"key", "pages": JSON [[index, width, height, recorded],
    ...], "pixels": their RGB bytes one after the other, "texts": JSON [each page's text layer's
    characters, or null], "centres": the text layers' character centres (float32 bytes one after
    the other)} (recorded pages are only the batch's neighbours in layout), or a page that could
    not be rendered (no pixels, "error" set); then the marker row {"pages": "[]", "pages_total",
    "error"}. text: read the pages' text layers (iter_pages)."""
    key, source, skip = int(row["key"]), str(row["source"]), set(json.loads(row["skip"]))
    blank = {"key": key, "pages": "[]", "pixels": b"", "texts": "[]", "centres": b"", "pages_total": MARKER,
             "error": ""}
    try:
        with _local(source) as path:
            try:
                total = count_pages(path)
                for batch in layout_batches(path, total, layout_batch, dpi=dpi, max_side=max_side, skip=skip,
                                            text=text):
                    if isinstance(batch, Page):
                        yield {**blank, "pages": json.dumps([[batch.index, 0, 0]]),
                               "error": f"page {batch.index + 1}: {batch.error}"}
                    else:
                        yield {**blank, "pages": json.dumps([[p.index, *p.image.size, p.index in skip] for p in batch]),
                               "pixels": b"".join(p.image.tobytes() for p in batch),
                               "texts": json.dumps([p.text and p.text.chars for p in batch]),
                               "centres": b"".join(p.text.centres.tobytes() for p in batch if p.text)}
            except DocumentError as exc:  # named by its source, not by a temporary copy
                yield {**blank, "pages_total": 0, "error": str(exc).replace(str(path), source)}
                return
    except OSError as exc:  # a URI that cannot be read
        yield {**blank, "pages_total": 0, "error": f"{source}: cannot be read ({exc})"}
        return
    yield {**blank, "pages_total": total}


# ------------------------------------------------------------ stage 2: layout + recognition (GPU)

class PageRecognizer:
    """A Ray Data actor: one GLM-OCR engine and one layout model; a batch of render rows -> a row
    per page {"key", "page", "pages_total", "error", "record"} (record: the page's regions and
    figures as JSON, figures as base64 PNG), or the marker passed on (page MARKER). Called from
    several threads at once (Ray Data's concurrent calls per actor): layout takes turns,
    recognition of every call shares the one engine."""

    def __init__(self, model: str, layout_model: str | None, max_tokens: int, engine_kwargs: dict,
                 draft: str = "auto"):
        from ..documents.layout import LayoutDetector
        from ..engine import AsyncEngine

        self.engine = AsyncEngine(model, **engine_kwargs)
        self.engine.engine.require_text_model("glmrt parse --ray")
        self.layout = None if layout_model is None else LayoutDetector.from_pretrained(
            layout_model, device=self.engine.engine.device)
        self.params = sdk_params(max_tokens, draft)
        self._layout_turn = threading.Lock()
        self._loop = asyncio.new_event_loop()  # the engine's: one loop for every call's requests
        threading.Thread(target=self._loop.run_forever, daemon=True, name="glmrt-ray-engine").start()

    def __call__(self, batch: dict) -> dict:
        out = {"key": [], "page": [], "pages_total": [], "error": [], "record": []}

        def emit(key: int, page: int, pages_total: int = MARKER, error: str = "", record: str = "") -> None:
            for name, value in zip(out, (key, page, pages_total, error, record)):
                out[name].append(value)

        work = []
        for i in range(len(batch["key"])):
            key, pages, error = int(batch["key"][i]), json.loads(str(batch["pages"][i])), str(batch["error"][i])
            if int(batch["pages_total"][i]) != MARKER:
                emit(key, MARKER, int(batch["pages_total"][i]), error)
            elif error:
                emit(key, pages[0][0], error=error)
            else:
                images, pixels, offset = [], memoryview(batch["pixels"][i]), 0
                texts, centres, at = json.loads(str(batch["texts"][i])), memoryview(batch["centres"][i]), 0
                for (index, w, h, _), chars in zip(pages, texts):  # a page's source is its document's key, as a path
                    image = Image.frombytes("RGB", (w, h), pixels[offset:offset + 3 * w * h])
                    text = None
                    if chars is not None:
                        text = PageText(chars, np.frombuffer(centres[at:at + 8 * len(chars)], np.float32).reshape(-1, 2))
                        at += 8 * len(chars)
                    images.append(Page(Path(str(key)), index, image, text=text))
                    offset += 3 * w * h
                recorded = {index for index, _, _, was_recorded in pages if was_recorded}
                with self._layout_turn:
                    work += [w for w in lay_out(self.layout, images) if w.index not in recorded]
        laid_out = [w for w in work if w.error is None]
        recognised = asyncio.run_coroutine_threadsafe(recognise_pages(self.engine, laid_out, self.params),
                                                      self._loop).result()
        results = dict(zip(map(id, laid_out), recognised))
        for page in work:
            if page.error is not None:
                emit(int(page.doc.name), page.index, error=page.error)
                continue
            contents, region_errors = results[id(page)]
            regions, figures = page_record(page, contents, self.layout is not None)
            emit(int(page.doc.name), page.index, record=json.dumps(
                {"regions": regions, "errors": region_errors,
                 "figures": [{"key": list(k), "png": _png(crop)} for k, crop in figures]}, ensure_ascii=False))
        return out


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------- the job

def parse(inputs: str | Path | list[str | Path], output_dir: str | Path, *, address: str | None = None,
          model: str = "zai-org/GLM-OCR", layout_model: str | Path | None = DEFAULT_LAYOUT,
          device: str | None = None, dtype: str | None = None, backend: str = "auto", dpi: int = 200,
          max_tokens: int = SDK_MAX_TOKENS, actors: int | None = None, actors_per_gpu: int = 1,
          render_tasks: int | None = None, batches_per_actor: int = 4,
          progress: bool = True, draft: str = "auto", **engine_options) -> list[DocumentResult]:
    """`glmrt.parse` on a Ray cluster: the same outputs, written by this process (the driver).

    address: the cluster (None: the one this process is connected to, else RAY_ADDRESS or a new
    local one). actors: recognition actors (default: one per GPU per `actors_per_gpu`, or 1 on a
    cluster without GPUs); each takes 1/actors_per_gpu of a GPU. render_tasks: at most this many
    documents rendered at once (default: as many as the cluster's CPUs allow). batches_per_actor:
    actor calls in flight at once, each one layout batch (up to 4 pages of a document, as glmrt
    parse batches them), whose regions share the actor's engine. Engine options are glmrt.LLM's; draft as
    glmrt.parse's. -> one result per document, in input order."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    inputs = inputs if isinstance(inputs, list) else [inputs]
    engine_options = draft_engine_options(draft, engine_options)
    sizes = {"actors": actors, "actors_per_gpu": actors_per_gpu, "render_tasks": render_tasks,
             "batches_per_actor": batches_per_actor}
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    docs = find_inputs(inputs)  # a missing or unsupported input fails now, before anything starts
    outputs = DocumentOutputs(output_dir, parse_settings(model, layout_model, layout=layout_model is not None, dpi=dpi,
                                                         max_tokens=max_tokens))
    states = [outputs.open(doc, name) for doc, name in document_names(docs).items()]
    todo = {key: st for key, st in enumerate(states) if st.result.markdown_path is None}
    if todo:
        if not ray.is_initialized():
            init(address=address, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus and "gpu_memory_utilization" not in engine_options and actors_per_gpu > 1:
            engine_options["gpu_memory_utilization"] = 0.9 / actors_per_gpu  # engines sharing a GPU split it
        engine_kwargs = {"device": device, "dtype": dtype, "backend": backend, **engine_options}
        context = DataContext.get_current()
        saved = context.max_errored_blocks, context.enable_progress_bars
        context.max_errored_blocks = -1  # a block that keeps failing drops its documents, not the job
        context.enable_progress_bars = progress
        try:
            items = [{"key": key, "source": str(st.result.source), "skip": json.dumps(sorted(outputs.load_records(st)))}
                     for key, st in todo.items()]
            pages = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
                render_document, fn_kwargs={"dpi": dpi, "text": draft in TEXT_DRAFTS}, num_cpus=1,
                concurrency=render_tasks)
            with warnings.catch_warnings():  # max_task_retries has no named parameter of its own yet
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                records = pages.map_batches(
                    PageRecognizer, batch_size=1, batch_format="numpy",
                    fn_constructor_kwargs={"model": model, "max_tokens": max_tokens, "engine_kwargs": engine_kwargs,
                                           "layout_model": None if layout_model is None else str(layout_model),
                                           "draft": draft},
                    compute=ActorPoolStrategy(size=actors or max(1, gpus * actors_per_gpu),
                                              max_concurrent_calls_per_actor=batches_per_actor,
                                              enable_true_multi_threading=True),
                    num_gpus=1 / actors_per_gpu if gpus else 0, max_task_retries=ACTOR_TASK_RETRIES)
            for row in records.iter_rows():
                _take(row, todo[int(row["key"])], outputs)
        finally:  # the caller's other Ray Data jobs keep their settings
            context.max_errored_blocks, context.enable_progress_bars = saved
    for st in todo.values():
        if st.result.markdown_path is None and not st.result.errors:
            missing = st.pages_total - len(st.pages) if st.rendered_all else None
            st.result.errors.append(f"{missing} page(s) lost: a Ray task failed on them (see Ray's logs)" if missing
                                    else "not processed: a Ray task failed on this document (see Ray's logs)")
    return [st.result for st in states]


def _take(row: dict, st, outputs: DocumentOutputs) -> None:
    """One row back from the actors, on the driver: a page record (kept once), a page's failure or
    the document's marker."""
    index, error = int(row["page"]), str(row["error"])
    if index == MARKER:
        if error and error not in st.result.errors:  # (a redone batch brings it again)
            st.result.errors.append(error)
        elif not st.rendered_all:
            outputs.rendered(st, int(row["pages_total"]))
        return
    if index in st.pages:  # a redone batch: done already
        return
    if error:
        regions, figures, errors = [], [], [error]
    else:
        record = json.loads(row["record"])
        regions, errors = record["regions"], record["errors"]
        figures = [(tuple(f["key"]), Image.open(io.BytesIO(base64.b64decode(f["png"])), formats=["PNG"]).convert("RGB"))
                   for f in record["figures"]]
    outputs.record_page(st, index, regions, figures, errors)

