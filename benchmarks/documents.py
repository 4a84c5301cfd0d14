"""`glmrt parse` throughput: pages/s over generated multi-page PDFs, beside the glmocr SDK's own
pipeline pointed at `glmrt serve`, in one run on one device.

    python benchmarks/documents.py [--model DIR] [--layout-model DIR] [--key] [--documents N] [--pages N]
                                   [--tokens-per-region N] [--sdk|--no-sdk] [--draft MODE ...] [--reader] [--out DIR]
                                   [--smoke]

Runs, each over the same N generated PDFs (scans: text, shaded boxes, ruled tables rendered and
embedded losslessly at 200 DPI; every second page landscape), after a warm-up document:
(a) glmrt parse, full throughput: every document in one job, all regions sharing the engine;
(b) glmrt parse, single concurrency (the model card's setting): documents one after another, each
    parsed alone (its pages and regions still overlap inside the pipeline);
(c, d) the same two with the glmocr SDK's self-hosted pipeline (`glmocr.GlmOcr(mode="selfhosted")`:
    PyMuPDF rendering, its PP-DocLayoutV3 through transformers in this process, every region crop
    re-encoded as JPEG and sent over HTTP by its 32 workers) against `glmrt serve` on the same
    checkpoint, with the same layout checkpoint and the same tokens per region. Skipped, with a
    note, where glmocr, OpenCV or torchvision is missing, and by default with --key.
Key numbers (results["key"], quoted by the GPU suite): pages/s of (a) and (b), each made as soon
as its run ends (a run cut off later keeps them), with (c) and (d) as their peers where they ran.
--key measures only them: glmrt parse alone (--sdk adds the SDK's runs), at the default sizes
(sized for about 60 s on an H100, most of it the engine's start with its CUDA graphs and the
warm-up). These runs do not speculate (--draft off).
--draft off mtp text ngram auto (any of them, repeatable): glmrt parse --draft MODE, full
throughput, over the same documents born-digital (the generated PDFs themselves: their text is
PDF text, which draft auto and text draft from) and scanned (the scans above: no text layer), each
mode on the engine `glmrt parse --draft MODE` starts (draft_engine_options: off no speculation,
mtp 3 MTP tokens, the others 8 tokens from the text and n-gram lookup, one engine for the three),
side by side: pages/s, mean accepted tokens per speculative step (accepted drafts + 1, over the
rows that drafted) and decode steps per page (the forward passes its regions' sequences took:
tokens generated less drafts accepted). With auto and off: the key number "documents pages/s
draft auto vs off, born-digital" (off as its peer). Random weights write random text, which the
PDF's text never predicts: only a trained checkpoint (--model, or --reader) shows what drafting gains.
--reader: the --draft comparison alone (default modes off ngram text auto, with --key off auto;
off always, as the reference), CPU-capable and without a layout model (each page one region), on a checkpoint that
reads: the tiny test checkpoint fine-tuned here (~10 s, glmrt_testing.page_reader) to read three
small rendered pages. Its PDFs repeat those pages, born-digital (the page images with their text as
an invisible text layer, as an OCR'd scan has) and scanned (the same images, no text layer). The
pages are 196 x 84, which the SDK's crop resize leaves as they are: the reader sees its training
pixels. In fp32 it fails unless every mode writes the files --draft off writes (drafts are
lossless); in bf16 (GPU) a difference is recorded (outputs_differ_from_off). Results: drafts-*.json.
Without --model / --layout-model, GLM-OCR's real config with random weights (on a GPU; the tiny
test checkpoint on CPU) and a tiny random PP-DocLayoutV3 are built on the fly (no weights can be
downloaded here). Random weights find random regions and write random text: every region gets
--tokens-per-region tokens (the SDK's max_tokens set to it; random weights almost never emit an
eos), so pages/s measures the pipeline at that many tokens per region, not real documents; tokens
per page is reported beside it. The model card reports 1.86 PDF pages/s (full pipeline, single
concurrency). Writes <out>/documents-<device>-<timestamp>.json and .md. `--smoke` runs tiny sizes
on the tiny checkpoint to prove the code paths (numbers meaningless).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import SUMMARIZERS, key_row, metadata, output_dir, provenance, write_report  # noqa: E402

from glmrt_testing.vendored_torchvision import use_vendored_torchvision  # noqa: E402

use_vendored_torchvision()  # the SDK's layout processor needs torchvision (before transformers loads)

import glmrt  # noqa: E402
from glmrt.documents.layout import LayoutDetector  # noqa: E402
from glmrt.documents.pipeline import DRAFT_ENGINE_OPTIONS, DocumentParser, draft_engine_options  # noqa: E402
from serve import SERVER_FLAGS, counter, glmrt_server, write_checkpoint  # noqa: E402
from glmrt_testing.documents import make_pdf, make_scanned_pdf  # noqa: E402
from glmrt_testing.page_reader import train_page_reader  # noqa: E402
from glmrt_testing.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402
from glmrt_testing.tiny_layout import build_tiny_layout_checkpoint  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
MAX_NUM_SEQS = 64 if CUDA else 16  # glmrt parse's engine and glmrt serve's alike
SMOKE = dict(documents=2, pages=2, tokens=4)
DEFAULTS = dict(documents=8, pages=4, tokens=64) if CUDA else dict(documents=3, pages=2, tokens=8)
READER = dict(documents=8, pages=24, tokens=64)  # its pages are 35-36 tokens with eos: all end with it
READER_SMOKE = dict(documents=2, pages=3, tokens=64)
# Full throughput first: the key number, kept should the single-concurrency run be cut off.
MODES = ("full throughput", "single concurrency")
SDK_PEER = "glmocr SDK pipeline -> glmrt serve"
DRAFT_MODES = tuple(DRAFT_ENGINE_OPTIONS)  # off, mtp, text, ngram, auto
KINDS = ("born-digital", "scanned")


def jobs(mode: str, pdfs: list[Path]) -> list[list[Path]]:
    """The parse calls of a run: every PDF in one (full throughput), or one each."""
    return [pdfs] if mode == "full throughput" else [[pdf] for pdf in pdfs]


class GlmrtParse:
    """glmrt parse in this process: its engine (started with `engine_options`) and layout model
    (None: each page one region), warmed up on a document with `draft`, counting the tokens the
    engine generates."""

    def __init__(self, model: str | Path, layout: Path | None, tokens: int, warm_up: Path, tmp: Path,
                 engine_options: dict | None = None, draft: str = "off"):
        started = time.perf_counter()
        llm = glmrt.LLM(str(model), device=DEVICE, dtype=DTYPE, max_num_seqs=MAX_NUM_SEQS, **(engine_options or {}))
        self.engine_start_s = time.perf_counter() - started
        self.llm, self.tokens = llm, tokens
        self.layout = None if layout is None else LayoutDetector.from_pretrained(layout, device=DEVICE)
        self.parser = DocumentParser(llm, self.layout, max_tokens=tokens, draft=draft)
        self.generated = 0
        step = llm.engine.step

        def counting_step():
            outputs = step()
            self.generated += sum(len(out.token_ids) for out in outputs if out.finished)
            return outputs

        llm.engine.step = counting_step
        started = time.perf_counter()
        self.parser.parse([warm_up], tmp / "warm-up")
        self.warm_up_s = time.perf_counter() - started
        self.tmp = tmp
        print(f"glmrt parse: engine started in {self.engine_start_s:.1f} s, warm-up document in {self.warm_up_s:.1f} s")

    def run(self, mode: str, pdfs: list[Path]) -> dict:
        """(a) or (b) -> its row."""
        name = f"glmrt parse, {mode}"
        regions, seconds = self.timed(self.parser, jobs(mode, pdfs), name)
        return row(name, len(pdfs), pages_of(pdfs), regions, self.generated, seconds)

    def run_draft(self, draft: str, kind: str, pdfs: list[Path]) -> dict:
        """glmrt parse --draft `draft`, full throughput, over `kind` PDFs -> its row, with the
        drafts' acceptance, the decode steps per page and a digest of the files written."""
        parser = DocumentParser(self.llm, self.layout, max_tokens=self.tokens, draft=draft)
        stats = self.llm.engine.spec_stats
        drafts, accepted = stats.num_drafts, stats.num_accepted_tokens
        name = f"glmrt parse --draft {draft}, {kind}"
        regions, seconds = self.timed(parser, [pdfs], name)
        drafts, accepted = stats.num_drafts - drafts, stats.num_accepted_tokens - accepted
        out = row(name, len(pdfs), pages_of(pdfs), regions, self.generated, seconds)
        return {**out, "draft": draft, "kind": kind, "mean_accepted_length": 1 + accepted / max(drafts, 1),
                "decode_steps_per_page": (self.generated - accepted) / out["pages"],
                "outputs_sha256": digest(self.tmp / name)}

    def timed(self, parser: DocumentParser, calls: list[list[Path]], name: str) -> tuple[int, float]:
        """Each parse call in turn -> (regions recognised, seconds); self.generated: their tokens."""
        regions, self.generated = [0], 0
        count = lambda kind, n: regions.__setitem__(0, regions[0] + n) if kind == "regions" else None  # noqa: E731
        start = time.perf_counter()
        for i, job in enumerate(calls):
            results = parser.parse(job, self.tmp / name / str(i), on_progress=count)
            assert all(not r.errors for r in results), [r.errors for r in results]
        return regions[0], time.perf_counter() - start


def draft_runs(modes: list[str], model: str | Path, layout: Path | None, tokens: int, pdfs: dict[str, list[Path]],
               tmp: Path, plain: GlmrtParse) -> list[dict]:
    """--draft: every mode over every kind of PDF -> rows (mode by mode); `plain` (no speculation)
    serves draft off, one engine per other set of draft_engine_options."""
    engines: dict[str, GlmrtParse] = {}
    rows = []
    for draft in modes:
        options = draft_engine_options(draft, {})
        key = json.dumps(options, sort_keys=True)
        if not options:
            engine = plain
        elif key not in engines:
            print(f"--draft {draft}: engine options {options}")
            engine = engines[key] = GlmrtParse(model, layout, tokens, pdfs["born-digital"][0],
                                               tmp / f"engine{len(engines)}", options, draft=draft)
        else:
            engine = engines[key]
        rows += [engine.run_draft(draft, kind, pdfs[kind]) for kind in KINDS]
    return rows


def sdk_runs(model: str | Path, layout: Path, pdfs: list[Path], tokens: int,
             tmp: Path) -> tuple[list[dict], str | None]:
    """(c) and (d): the glmocr SDK's pipeline against glmrt serve -> rows (in MODES' order), or none
    and why not."""
    try:
        import cv2  # noqa: F401 -- transformers' PP-DocLayoutV3 polygons, in the SDK's layout step
        import torchvision  # noqa: F401 -- its PPDocLayoutV3ImageProcessor
        from glmocr import GlmOcr
    except ImportError as exc:
        return [], f"the SDK pipeline was not run: {exc}"
    rows = []
    with glmrt_server(model, tmp / "server.log", "--max-num-seqs", str(MAX_NUM_SEQS)) as url:
        settings = {"pipeline.layout.model_dir": str(layout), "pipeline.page_loader.max_tokens": tokens}
        with GlmOcr(mode="selfhosted", ocr_api_host="127.0.0.1", ocr_api_port=int(url.rsplit(":", 1)[1]),
                    model="glm-ocr", layout_device=DEVICE, log_level="WARNING", _dotted=settings) as sdk:
            sdk.parse(str(pdfs[0]))  # warm-up
            for mode in MODES:
                before = counter(url, "glmrt:generation_tokens_total")
                regions, start = 0, time.perf_counter()
                for job in jobs(mode, pdfs):
                    results = sdk.parse([str(pdf) for pdf in job])
                    for result in results:
                        if getattr(result, "_error", None):
                            raise RuntimeError(f"the SDK failed on {result.original_images}: {result._error}")
                        regions += sum(region["label"] != "image" for page in result.json_result for region in page)
                seconds = time.perf_counter() - start
                rows.append(row(f"glmocr SDK -> glmrt serve, {mode}", len(pdfs), pages_of(pdfs), regions,
                                int(counter(url, "glmrt:generation_tokens_total") - before), seconds))
    return rows, None


def reader_pdfs(folder: Path, documents: int, pages: int, cases: list[tuple]) -> dict[str, list[Path]]:
    """PDFs of the page reader's pages (`cases`: train_page_reader's), `pages` a document, each
    document starting one page later -> {kind: PDFs}: born-digital (their text as the text layer)
    and scanned (none)."""
    pdfs = {kind: [] for kind in KINDS}
    for d in range(documents):
        images, _, texts = zip(*(cases[(d + p) % len(cases)] for p in range(pages)))
        lines = [text.split("\n") for text in texts]
        pdfs["born-digital"].append(make_scanned_pdf(folder / f"text-layer{d}.pdf", list(images), texts=lines))
        pdfs["scanned"].append(make_scanned_pdf(folder / f"scan{d}.pdf", list(images)))
    return pdfs


def digest(folder: Path) -> str:
    """sha256 of every file under `folder`, path and bytes: equal files, equal digests."""
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()


def scanned_pdf(folder: Path, seed: int, vector: Path) -> Path:
    """A scanner's PDF of a generated document (born_digital_pdf's): its pages rendered, then
    embedded losslessly at 200 DPI, so that PyMuPDF (the SDK) and pdfium (glmrt) give the same
    pixels and both pipelines find the same regions (vector pages render a little differently,
    and random layout weights react to that)."""
    from glmrt.documents.pages import iter_pages

    return make_scanned_pdf(folder / f"doc{seed}.pdf", [page.image for page in iter_pages(vector)])


def born_digital_pdf(folder: Path, seed: int, pages: int) -> Path:
    """A generated document as written: its words are PDF text (Helvetica), its text layer."""
    return make_pdf(folder / f"vector{seed}.pdf", pages=pages, seed=seed)


def pages_of(pdfs: list[Path]) -> int:
    from glmrt.documents.pages import count_pages

    return sum(count_pages(pdf) for pdf in pdfs)


def row(run: str, documents: int, pages: int, regions: int, tokens: int, seconds: float) -> dict:
    return dict(run=run, documents=documents, pages=pages, regions=regions, tokens=tokens, seconds=seconds,
                pages_per_s=pages / seconds, tokens_per_page=tokens / pages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GLM-OCR checkpoint dir or Hub id (default: built, see above)")
    parser.add_argument("--layout-model", type=Path, help="PP-DocLayoutV3 dir (default: a tiny random one)")
    parser.add_argument("--key", action="store_true", help="the key numbers only: glmrt parse, without the SDK")
    parser.add_argument("--documents", type=int, help=f"PDFs per run (default {DEFAULTS['documents']})")
    parser.add_argument("--pages", type=int, help=f"pages per PDF (default {DEFAULTS['pages']})")
    parser.add_argument("--tokens-per-region", type=int, help=f"(default {DEFAULTS['tokens']})")
    parser.add_argument("--sdk", action=argparse.BooleanOptionalAction,
                        help="also run the glmocr SDK's pipeline against glmrt serve (default: yes, no with --key or --reader)")
    parser.add_argument("--draft", nargs="+", action="extend", choices=DRAFT_MODES, metavar="MODE",
                        help=f"also compare glmrt parse --draft MODE ({', '.join(DRAFT_MODES)}; repeatable) on "
                             "born-digital and scanned PDFs")
    parser.add_argument("--reader", action="store_true",
                        help="the --draft comparison alone, on the tiny checkpoint trained to read its pages (CPU-capable)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoints and sizes (CPU-capable)")
    args = parser.parse_args(argv)
    sizes = (READER_SMOKE if args.smoke else READER) if args.reader else SMOKE if args.smoke else DEFAULTS
    docs = args.documents or sizes["documents"]
    pages = args.pages or sizes["pages"]
    tokens = args.tokens_per_region or sizes["tokens"]
    if min(docs, pages, tokens) < 1:
        parser.error("--documents, --pages and --tokens-per-region must be >= 1")
    if args.reader and (args.model or args.layout_model):
        parser.error("--reader trains its own checkpoint and uses no layout model: drop --model / --layout-model")
    sdk = args.sdk if args.sdk is not None else not (args.key or args.reader)
    real = CUDA and not args.smoke
    modes = list(dict.fromkeys(args.draft or []))  # in the order given, once each
    if args.reader:
        modes = list(dict.fromkeys(["off", *(modes or (["auto"] if args.key else ["ngram", "text", "auto"]))]))
        where = f"{docs} PDFs x {pages} pages of the page reader, no layout, at most {tokens} tokens per page"
    else:
        where = f"{docs} generated PDFs x {pages} pages, random layout model, {tokens} tokens per region"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.reader:
            model, layout = tmp / "reader", None
            by_kind = reader_pdfs(tmp / "in", docs, pages, train_page_reader(build_tiny_checkpoint(tmp / "tiny"), model))
            pdfs = by_kind["scanned"]
        else:
            model = args.model or write_checkpoint(tmp / "ckpt", real)
            layout = args.layout_model or build_tiny_layout_checkpoint(tmp / "layout")
            born_digital = [born_digital_pdf(tmp / "in", i, pages) for i in range(docs)]
            pdfs = [scanned_pdf(tmp / "in", i, vector) for i, vector in enumerate(born_digital)]
            by_kind = {"born-digital": born_digital, "scanned": pdfs}
        # The SDK's runs first: its server process must have the device to itself while it sizes
        # its KV cache, before this process holds an engine.
        if sdk:
            sdk_rows, sdk_note = sdk_runs(model, layout, pdfs, tokens, tmp)
        else:
            sdk_rows, sdk_note = [], "not run (--no-sdk; --key and --reader imply it): the key numbers have no peer"
        peers = dict(zip(MODES, sdk_rows))
        glmrt_parse = GlmrtParse(model, layout, tokens, pdfs[0], tmp)
        rows, key, ratios = [], [], []
        for mode in () if args.reader else MODES:
            ours, theirs = glmrt_parse.run(mode, pdfs), peers.get(mode)
            rows.append(ours)
            peer = dict(peer=theirs["pages_per_s"], peer_name=SDK_PEER) if theirs else {}
            key.append(key_row(f"glmrt parse pages/s, {mode}: {where}", "pages/s", ours["pages_per_s"],
                               better="higher", **peer))
            if theirs:
                ratios.append(dict(comparison=f"{mode}: glmrt parse / {SDK_PEER}",
                                   pages_per_s=ours["pages_per_s"] / theirs["pages_per_s"]))
        rows += sdk_rows
        drafted = draft_runs(modes, model, layout, tokens, by_kind, tmp, glmrt_parse)
        pps = {(r["draft"], r["kind"]): r["pages_per_s"] for r in drafted}
        for kind in KINDS:
            if ("auto", kind) in pps and ("off", kind) in pps:
                key.append(key_row(f"documents pages/s draft auto vs off, {kind}: {where}", "pages/s",
                                   pps["auto", kind], better="higher", peer=pps["off", kind],
                                   peer_name="glmrt parse --draft off"))
    # Drafts are lossless: in fp32 every mode writes the files --draft off writes. In bf16 on a GPU
    # a verify step's batch of k + 1 rows may round differently (not batch-invariant yet): noted.
    off = {r["kind"]: r["outputs_sha256"] for r in drafted if r["draft"] == "off"}
    changed = [f"--draft {r['draft']}, {r['kind']}" for r in drafted if r["outputs_sha256"] != off.get(r["kind"])]
    if args.reader and changed and DTYPE == torch.float32:
        raise RuntimeError(f"these runs wrote other files than --draft off: {changed}")
    checkpoint = ("tiny test checkpoint trained to read its 3 pages" if args.reader else
                  str(args.model or ("GLM-OCR's real config, random weights" if real else "tiny test checkpoint")))
    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=args.smoke, key_only=args.key, documents=docs,
                    drafts=modes,
                    pages_per_document=pages, tokens_per_region=tokens, model=checkpoint, max_num_seqs=MAX_NUM_SEQS,
                    server_flags=" ".join(SERVER_FLAGS), sdk_note=sdk_note,
                    layout_model="none (each page one region)" if args.reader else
                    str(args.layout_model or "tiny random PP-DocLayoutV3"))
    results = dict(rows=rows, ratios=ratios, key=key, draft_rows=drafted, outputs_differ_from_off=changed if off else [],
                   engine_start_s=glmrt_parse.engine_start_s,
                   warm_up_s=glmrt_parse.warm_up_s)
    lines = [f"# glmrt parse on {meta['device']['name']}", "", provenance(meta),
             f"- layout: {meta['layout_model']}; engine max_num_seqs {MAX_NUM_SEQS}",
             *SUMMARIZERS["documents"]({**meta, **results})]
    print("\n".join(lines))
    write_report(output_dir(args.out, args.smoke), "drafts" if args.reader else "documents", meta, results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
