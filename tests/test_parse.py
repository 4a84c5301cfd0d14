"""`glmrt parse` end to end on CPU: a tiny random GLM-OCR and a tiny random PP-DocLayoutV3 (both
built with transformers) over generated multi-page PDFs and images. Outputs are the SDK's
formatter's for the recognised regions, deterministic, resumable, and failures stay local."""
import asyncio
import base64
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from PIL import Image

import glmrt
from glmrt.documents import pipeline
from glmrt.documents.layout import LayoutDetector, crop_region
from glmrt.documents.markdown import format_document
from glmrt.documents.pipeline import DocumentParser, document_names, sdk_region_image
from glmrt.prompts import TASK_PROMPTS
from glmrt_testing import REPO, glmrt_command
from glmrt_testing.documents import (POSTSCRIPT, PdfPage, fake_ghostscript, make_corrupt_pdf, make_images, make_pdf,
                                     make_scanned_pdf, write_pdf)

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def parser(tiny_checkpoint, tiny_layout_checkpoint):
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_num_seqs=16)
    return DocumentParser(llm, LayoutDetector.from_pretrained(tiny_layout_checkpoint, device="cpu"), max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    make_pdf(folder / "report.pdf", pages=3, seed=1)
    make_pdf(folder / "letter.pdf", pages=1, seed=2)
    make_images(folder / "scans")
    return folder


def outputs(folder):
    """Every file under folder -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_documents_become_the_sdks_markdown_and_json(parser, inputs, tmp_path):
    results = parser.parse([inputs], tmp_path / "out")
    assert [r.errors for r in results] == [[] for _ in results]
    by_name = {r.name: r for r in results}
    report = by_name["report"]
    assert report.num_pages == 3 and report.markdown_path == tmp_path / "out/report/report.md"
    pages = json.loads(report.json_path.read_text(encoding="utf-8"))
    assert len(pages) == 3
    for page in pages:
        for region in page:
            assert set(region) >= {"index", "label", "content", "bbox_2d"}
            assert all(0 <= v <= 1000 for v in region["bbox_2d"])
    assert not (tmp_path / "out/report/.pages").exists()
    assert {p.name for p in (tmp_path / "out").iterdir()} == set(by_name)


def test_a_page_is_what_layout_crops_and_recognition_give(parser, inputs, tmp_path):
    """One page by hand: layout, crops as the SDK sends them, one request each, the SDK's
    formatter -> the same JSON and Markdown as the pipeline wrote."""
    [result] = parser.parse([inputs / "letter.pdf"], tmp_path / "out")
    from glmrt.documents.pages import iter_pages

    [page] = list(iter_pages(inputs / "letter.pdf"))
    [regions] = parser.layout.detect([page.image])
    params = glmrt.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=1.1)
    recognised, figures = [], {}
    for region in regions:
        crop = crop_region(page.image, region.bbox_2d)
        content = None
        if region.task == "skip":
            figures[(0, *region.bbox_2d)] = crop
        else:
            [out] = parser.llm.generate({"images": [sdk_region_image(crop)],
                                         "prompt": TASK_PROMPTS[region.task]}, params)
            content = out.text.strip()
        recognised.append({**region.to_dict(), "content": content})
    json_pages, markdown, _ = format_document([recognised], figures)
    assert json.loads(result.json_path.read_text(encoding="utf-8")) == json.loads(json.dumps(json_pages))
    assert result.markdown_path.read_text(encoding="utf-8") == markdown


def interrupt_after(pages: int, parser, inputs, out, monkeypatch) -> None:
    """Parse `inputs` into `out`, interrupted (Ctrl-C) once `pages` pages are recorded."""
    finish_page, recorded = DocumentParser._finish_page, []

    def interrupted(self, *args):
        finish_page(self, *args)
        recorded.append(1)
        if len(recorded) == pages:
            raise KeyboardInterrupt

    monkeypatch.setattr(DocumentParser, "_finish_page", interrupted)
    with pytest.raises(KeyboardInterrupt):
        parser.parse(inputs, out)
    monkeypatch.setattr(DocumentParser, "_finish_page", finish_page)


def test_parsing_is_deterministic_and_resumable(parser, inputs, tmp_path, monkeypatch):
    first = tmp_path / "first"
    parser.parse([inputs / "report.pdf"], first)
    again = tmp_path / "again"
    interrupt_after(2, parser, [inputs / "report.pdf"], again, monkeypatch)
    assert len(list((again / "report/.pages").glob("page-*.json"))) == 2
    [result] = parser.parse([inputs / "report.pdf"], again)
    assert result.resumed_pages == 2 and result.num_pages == 3
    assert outputs(again) == outputs(first)
    [result] = parser.parse([inputs / "report.pdf"], again)  # all written: nothing to do
    assert result.markdown_path is not None and outputs(again) == outputs(first)


def test_a_resumed_document_is_laid_out_in_the_same_batches(parser, tmp_path, monkeypatch):
    """Layout results change in their last bits with the pages sharing a forward pass (here, on
    CPU, this document's second page laid out alone differs from it laid out beside the first):
    a resumed run lays its remaining pages out beside the same neighbours (recorded ones
    re-rendered for it), so its files are the uninterrupted run's, byte for byte."""
    make_pdf(tmp_path / "long.pdf", pages=2, size=(300, 380), seed=11)
    first, again = tmp_path / "first", tmp_path / "again"
    parser.parse([tmp_path / "long.pdf"], first)
    interrupt_after(1, parser, [tmp_path / "long.pdf"], again, monkeypatch)
    [result] = parser.parse([tmp_path / "long.pdf"], again)
    assert result.resumed_pages == 1
    assert outputs(again) == outputs(first)


def status(result) -> dict:
    return json.loads((result.json_path.parent / f"{result.name}_status.json").read_text(encoding="utf-8"))


def test_failures_stay_with_their_document_page_or_region(parser, inputs, tmp_path, monkeypatch):
    """A corrupt PDF fails alone; a page with a failed region is written without it, named as
    failed and not recorded as done, and a re-run parses that page (only) again."""
    broken = tmp_path / "in"
    broken.mkdir()
    make_corrupt_pdf(broken / "broken.pdf")
    make_pdf(broken / "fine.pdf", pages=2, seed=3)
    submit = DocumentParser._submit

    def one_region_fails(self, work, pending):
        if work.index == 1 and work.requests:
            work.requests[min(work.requests)] = "injected"
        return submit(self, work, pending)

    monkeypatch.setattr(DocumentParser, "_submit", one_region_fails)
    results = {r.name: r for r in parser.parse([broken], tmp_path / "out")}
    assert results["broken"].markdown_path is None and "broken.pdf" in results["broken"].errors[0]
    fine = results["fine"]
    assert fine.markdown_path is not None and fine.num_pages == 2 and fine.failed_pages == [2]
    assert [e.split(":")[0].split(" region")[0] for e in fine.errors] == ["page 2"]
    assert status(fine)["failed_pages"] == [2] and status(fine)["errors"] == fine.errors
    assert sorted(p.name for p in (fine.json_path.parent / ".pages").glob("page-*.json")) == ["page-00000.json"]
    assert {p.name for p in (tmp_path / "out").iterdir()} <= {"fine", "broken"}

    monkeypatch.setattr(DocumentParser, "_submit", submit)
    [again] = parser.parse([broken / "fine.pdf"], tmp_path / "out")
    assert again.resumed_pages == 1 and again.failed_pages == [] and again.errors == []
    assert status(again)["failed_pages"] == [] and not (again.json_path.parent / ".pages").exists()


def test_failed_pages_are_reported_and_parsed_again_and_settings_are_compared(parser, tiny_checkpoint, tiny_layout_checkpoint,
                                                                             tmp_path, capsys):
    """Every region too large for --max-model-len: the document is written without them, exit
    status 1, its pages named as failed; a re-run parses them again (and they succeed with room to
    generate). A re-run with other --max-tokens or --no-layout parses the document again."""
    from glmrt.cli import main

    doc = make_pdf(tmp_path / "two.pdf", pages=2, size=(300, 380), seed=5)
    out = tmp_path / "out"
    command = ["parse", str(doc), "-o", str(out), "--model", str(tiny_checkpoint), "--layout-model", str(tiny_layout_checkpoint),
               "--device", "cpu", "--max-tokens", str(MAX_TOKENS), "--max-model-len", "64"]
    for _ in range(2):  # the second run does not take the first one's failures for done
        assert main(command) == 1
        stderr = capsys.readouterr().err
        assert f"{doc}: 2 pages (2 failed: run again to retry them) -> {out / 'two/two.md'}" in stderr
        assert f"glmrt: error: {doc}: page 1 region" in stderr and "max_model_len (64 tokens)" in stderr
        assert json.loads((out / "two/two_status.json").read_text(encoding="utf-8"))["failed_pages"] == [1, 2]
    [result] = parser.parse([doc], out)  # the same settings, a model with room: the pages are parsed again
    assert (result.resumed_pages, result.failed_pages, result.errors) == (0, [], [])
    assert status(result)["failed_pages"] == [] and status(result)["settings"]["max_tokens"] == MAX_TOKENS
    written = outputs(out)
    assert parser.parse([doc], out)[0].markdown_path is not None and outputs(out) == written  # done: skipped
    for other in (DocumentParser(parser.llm, parser.layout, max_tokens=MAX_TOKENS - 1),
                  DocumentParser(parser.llm, None, max_tokens=MAX_TOKENS - 1)):
        [result] = other.parse([doc], out)
        assert status(result)["settings"] == other.settings and result.failed_pages == []


def test_a_crashed_page_reader_is_raised_not_waited_for(parser, inputs, tmp_path, monkeypatch):
    """An unexpected error in the page thread (a bug, MemoryError) ends the job with that error,
    instead of leaving the engine thread waiting for pages that never come."""
    def broken(crop):
        raise MemoryError("no memory for the crop")

    monkeypatch.setattr(pipeline, "sdk_region_image", broken)
    outcome = []
    job = threading.Thread(target=lambda: outcome.append(_raised(parser.parse, [inputs / "letter.pdf"], tmp_path)))
    job.start()
    job.join(timeout=120)
    assert not job.is_alive(), "parse hung after its page thread crashed"
    [error] = outcome
    assert isinstance(error, RuntimeError) and isinstance(error.__cause__, MemoryError)
    assert not parser.llm.engine.has_unfinished()


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    """A `gs` first on PATH that records being run (Pillow's EPS plugin looks gs up on first use)
    -> its marker file."""
    from PIL import EpsImagePlugin

    folder, marker = fake_ghostscript(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def test_postscript_is_refused_and_never_reaches_ghostscript(parser, tmp_path, fake_gs):
    """PostScript named as a PNG: as bytes, a data URI or a path in a request, refused by its
    format; as an input of glmrt parse, that document alone fails; gs never runs."""
    folder = tmp_path / "in"
    folder.mkdir()
    eps = folder / "page.png"
    eps.write_bytes(POSTSCRIPT)
    Image.new("RGB", (64, 48), "white").save(folder / "fine.png")
    uri = "data:image/png;base64," + base64.b64encode(POSTSCRIPT).decode()
    params = glmrt.SamplingParams(max_tokens=2)
    for image in (POSTSCRIPT, uri, str(eps)):
        with pytest.raises(ValueError, match="EPS images are not accepted"):
            parser.llm.generate({"images": [image], "prompt": "Text Recognition:"}, params)
    results = {r.name: r for r in parser.parse([folder], tmp_path / "out")}
    assert results["page"].markdown_path is None
    assert results["page"].errors == [f"{eps}: EPS images are not accepted (only PNG, JPEG, WEBP, TIFF, BMP, GIF)"]
    assert results["fine"].markdown_path is not None and results["fine"].errors == []
    assert not fake_gs.exists(), fake_gs.read_text()


def test_output_names_are_unique_plain_and_independent_of_input_order(tmp_path):
    docs = [tmp_path / "a/doc.pdf", tmp_path / "b/doc.pdf", tmp_path / "doc-2.pdf", tmp_path / "B/DOC.png",
            tmp_path / "...pdf", tmp_path / "..pdf", tmp_path / "report.pdf", "s3://bucket/x/...pdf",
            tmp_path / ("é" * 150 + ".pdf")]
    names = document_names(docs)
    assert len({n.casefold() for n in names.values()}) == len(docs)
    assert all(n and not n.startswith(".") and "/" not in n and len(os.fsencode(n)) <= 210 for n in names.values())
    assert names[tmp_path / "report.pdf"] == "report" and names[tmp_path / "doc-2.pdf"] == "doc-2"
    assert names[tmp_path / "a/doc.pdf"].startswith("doc-") and names[tmp_path / "...pdf"].startswith("document-")
    assert document_names(docs[::-1]) == names


def test_inputs_of_one_name_are_written_apart_and_inside_the_output_folder(parser, tmp_path):
    """a/doc.pdf and b/doc.pdf each get their own folder; an input named "...pdf" is written
    inside -o, not into its parent."""
    folder = tmp_path / "in"
    for i, path in enumerate((folder / "a/doc.pdf", folder / "b/doc.pdf", folder / "...pdf")):
        make_pdf(path, pages=1, size=(160, 120), seed=20 + i)
    out = tmp_path / "job" / "out"
    results = DocumentParser(parser.llm, None, max_tokens=2).parse([folder / "a", folder / "b", folder / "...pdf"], out)
    assert [r.errors for r in results] == [[], [], []]
    assert len({r.markdown_path for r in results}) == 3
    assert all(r.markdown_path.parent.parent == out for r in results)
    assert [p.name for p in (tmp_path / "job").iterdir()] == ["out"]


def test_without_layout_each_page_is_one_region(tiny_checkpoint, inputs, tmp_path):
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32")
    [result] = DocumentParser(llm, None, max_tokens=MAX_TOKENS).parse([inputs / "report.pdf"], tmp_path)
    pages = json.loads(result.json_path.read_text(encoding="utf-8"))
    assert [len(p) for p in pages] == [1, 1, 1] and all(p[0]["bbox_2d"] is None for p in pages)
    assert result.markdown_path.read_text(encoding="utf-8").count("\n\n---\n\n") == 2


def test_regions_draft_from_the_pdf_text_inside_them(parser, tmp_path, monkeypatch):
    """Each region's SamplingParams: the parse's draft and, with draft auto or text, the PDF text
    inside the region as its reference_text (None on a scanned page); draft off or mtp reads no
    text layer."""
    lines = ["Quarterly report", "Revenue rose 12 percent."]
    content = "\n".join(f"BT /F1 12 Tf 20 {150 - 20 * i} Td ({line}) Tj ET" for i, line in enumerate(lines))
    pdf = write_pdf(tmp_path / "digital.pdf", [PdfPage(300, 200, content.encode())])
    scan = make_scanned_pdf(tmp_path / "scan.pdf", [Image.new("RGB", (300, 200), "white")])
    seen = []

    def prepare(request, params, *args):  # recorded, then failed: nothing is generated
        seen.append((params.draft, params.reference_text))
        raise ValueError("spied")

    monkeypatch.setattr(parser.llm.engine, "prepare", prepare)
    for draft in ("text", "mtp"):
        DocumentParser(parser.llm, None, draft=draft).parse([pdf, scan], tmp_path / draft)
    assert seen == [("text", "\n".join(lines)), ("text", None), ("mtp", None), ("mtp", None)]


def test_recognise_pages_gives_each_region_its_reference():
    """The server's and the Ray job's path: one SamplingParams per region, with its reference."""
    class Engine:
        async def generate(self, request, params):
            yield glmrt.RequestOutput("r", [], [], f"{params.draft}:{params.reference_text}", "stop")

    regions = [pipeline._whole_page(), pipeline._whole_page()]
    request = {"images": [Image.new("RGB", (28, 28))], "prompt": TASK_PROMPTS["text"]}
    page = pipeline._PageWork(Path("doc.pdf"), 0, regions=regions, requests={0: request, 1: request},
                              references={0: "Total: 42", 1: None})
    [(contents, errors)] = asyncio.run(pipeline.recognise_pages(Engine(), [page], pipeline.sdk_params(draft="text")))
    assert contents == ["text:Total: 42", "text:None"] and errors == []


def test_draft_implies_engine_options_unless_they_are_given():
    options = pipeline.draft_engine_options
    assert options("auto", {"max_num_seqs": 4}) == {"max_num_seqs": 4, "num_speculative_tokens": 8,
                                                     "speculative_method": "ngram"}
    assert options("text", {}) == options("ngram", {}) == options("auto", {})
    assert options("mtp", {}) == {"num_speculative_tokens": 3, "speculative_method": "mtp"}
    assert options("off", {}) == {}
    assert options("auto", {"num_speculative_tokens": 2}) == {"num_speculative_tokens": 2}  # as given
    assert options("mtp", {"num_speculative_tokens": 2}) == {"num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="draft 'mtp'.*speculative_method 'ngram'"):
        options("mtp", {"speculative_method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="draft must be one of"):
        options("mtp2", {})


def test_draft_auto_writes_what_draft_off_writes(parser, tiny_checkpoint, tmp_path):
    """Speculation is lossless: glmrt parse --draft auto (8 drafted tokens per step, several regions
    verified in one step) writes the files --draft off (no speculation) writes, byte for byte."""
    pdf = make_pdf(tmp_path / "page.pdf", pages=1, seed=5)  # a region's random text repeats: n-gram drafts
    max_tokens = 12
    DocumentParser(parser.llm, parser.layout, max_tokens=max_tokens, draft="off").parse([pdf], tmp_path / "off")
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_num_seqs=16,
                    **pipeline.draft_engine_options("auto", {}))
    DocumentParser(llm, parser.layout, max_tokens=max_tokens, draft="auto").parse([pdf], tmp_path / "auto")
    assert llm.engine.spec_stats.num_drafts > 0, "nothing was drafted: the test proves nothing"
    assert outputs(tmp_path / "auto") == outputs(tmp_path / "off")


def test_a_reader_accepts_the_drafts_of_its_pages_text(page_reader, tmp_path):
    """An OCR'd scan of the page reader's pages (their text as an invisible text layer), each page
    one region: --draft auto drafts from that text, the reader accepts the drafts, and the files
    are those of --draft off, byte for byte."""
    path, cases = page_reader
    pdf = make_scanned_pdf(tmp_path / "scan.pdf", [image for image, _, _ in cases],
                           texts=[text.split("\n") for _, _, text in cases])
    for draft in ("off", "auto"):
        llm = glmrt.LLM(str(path), device="cpu", dtype="float32", **pipeline.draft_engine_options(draft, {}))
        [result] = DocumentParser(llm, None, max_tokens=32, draft=draft).parse([pdf], tmp_path / draft)
        assert result.errors == []
    drafts, _, accepted = llm.engine.spec_stats.by_source["text"]
    assert accepted > drafts  # more than one drafted token accepted per draft, on average
    assert outputs(tmp_path / "auto") == outputs(tmp_path / "off")


def test_sdk_crop_resize_matches_the_sdk():
    from glmocr.utils.image_utils import smart_resize

    for size in [(10, 7), (640, 480), (3000, 41), (27, 29), (9000, 9000)]:
        image = Image.new("RGB", size, (200, 10, 10))
        h, w = smart_resize(t=2, h=size[1], w=size[0], t_factor=2, h_factor=28, w_factor=28,
                            min_pixels=pipeline.SDK_CROP_MIN_PIXELS, max_pixels=pipeline.SDK_CROP_MAX_PIXELS)
        assert sdk_region_image(image).size == (w, h)


def test_cli_parse_writes_and_reports(tiny_checkpoint, tiny_layout_checkpoint, inputs, tmp_path):
    out = tmp_path / "out"
    command = glmrt_command("parse", str(inputs / "letter.pdf"), str(inputs / "missing.pdf"),
                            "-o", str(out), "--model", str(tiny_checkpoint), "--layout-model", str(tiny_layout_checkpoint),
                            "--device", "cpu", "--max-tokens", str(MAX_TOKENS))
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)  # as a user in a checkout would
    assert done.returncode == 2 and "missing.pdf" in done.stderr
    assert "Loading weights" not in done.stderr and not out.exists()  # refused before any model loads
    broken = tmp_path / "broken.pdf"
    make_corrupt_pdf(broken)
    command[command.index(str(inputs / "missing.pdf"))] = str(broken)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1, done.stderr  # the broken PDF failed alone
    assert (out / "letter/letter.md").is_file() and "1 page ->" in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("glmrt: error:")]
    assert errors == [f"glmrt: error: {broken}: not a valid PDF (corrupt or truncated)"]  # named once


def test_server_parses_documents_like_the_sdks_server(tiny_checkpoint, tiny_layout_checkpoint, inputs, tmp_path):
    """POST /glmocr/parse over HTTP: a PDF (data URI) and an image; the SDK server's response shape,
    and the same regions and Markdown as `glmrt parse` on an engine with the same limits (the
    server's speculates, drafting from the PDF's text: the same output). Then the SDK's own
    MaaS-mode client (glmocr.GlmOcr(mode="maas")) pointed at it saves what `glmrt parse` writes."""
    import base64

    import httpx
    from glmocr import GlmOcr

    from glmrt_testing.server_process import ServerProcess

    pdf = (inputs / "report.pdf").read_bytes()
    uri = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    scan = inputs / "scans" / "scan.png"
    scan_uri = "data:image/png;base64," + base64.b64encode(scan.read_bytes()).decode()
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_model_len=256)
    expected, expected_scan = DocumentParser(llm, LayoutDetector.from_pretrained(tiny_layout_checkpoint, device="cpu")).parse(
        [inputs / "report.pdf", scan], tmp_path / "out")
    expected_json = json.loads(expected.json_path.read_text(encoding="utf-8"))
    expected_md = expected.markdown_path.read_text(encoding="utf-8")
    key = {"Authorization": "Bearer sesame"}
    # A speculating server: each PDF region drafts from the page's text inside it (lossless)
    with ServerProcess(tiny_checkpoint, "--layout-model", str(tiny_layout_checkpoint), "--max-model-len", "256",
                       "--api-key", "sesame", "--num-speculative-tokens", "8", "--speculative-method", "ngram") as server:
        url = f"{server.url}/glmocr/parse"
        assert httpx.post(url, json={"images": [uri]}).status_code == 401
        response = httpx.post(url, json={"images": [uri]}, headers=key, timeout=300)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["json_result"] == expected_json == body["layout_details"]
        assert body["markdown_result"] == expected_md == body["md_results"]
        assert body["data_info"] == {"pages": []} and body["id"].startswith("chatcmpl-")
        both = httpx.post(url, json={"images": [uri, scan_uri]}, headers=key, timeout=300).json()  # two units
        assert both["json_result"] == [expected_json, json.loads(expected_scan.json_path.read_text(encoding="utf-8"))]
        assert both["markdown_result"] == expected_md + "\n\n---\n\n" + expected_scan.markdown_path.read_text(
            encoding="utf-8")
        maas = httpx.post(url, json={"model": "glm-ocr", "file": uri}, headers=key, timeout=300).json()
        assert maas["md_results"] == body["md_results"]
        bad = httpx.post(url, json={"images": ["data:application/pdf;base64,JVBERi0xLjQK"]}, headers=key)
        assert bad.status_code == 400 and "images[0]" in bad.json()["error"]["message"]
        assert httpx.post(url, json={}, headers=key).status_code == 400
        text = httpx.post(url, json={"file": "data:text/plain;base64,aGVsbG8="}, headers=key)
        assert text.status_code == 400 and "'file'" in text.json()["error"]["message"]
        assert "not an image or PDF type" in text.json()["error"]["message"]

        with GlmOcr(mode="maas", api_key="sesame", api_url=url, timeout=300) as sdk:
            result = sdk.parse(str(inputs / "report.pdf"))
            result.save(output_dir=tmp_path / "sdk", save_layout_visualization=False)
    saved = tmp_path / "sdk" / "report"
    assert (saved / "report.md").read_text(encoding="utf-8") == expected_md
    keys = ("index", "label", "content", "bbox_2d")  # what the SDK's MaaS client keeps of a region
    assert json.loads((saved / "report.json").read_text(encoding="utf-8")) == [
        [{**{k: region[k] for k in keys}, **({"image_path": region["image_path"]} if "image_path" in region else {})}
         for region in page] for page in expected_json]
    figures = sorted(p.name for p in (expected.markdown_path.parent / "imgs").glob("*")) \
        if (expected.markdown_path.parent / "imgs").is_dir() else []
    assert sorted(p.name for p in (saved / "imgs").glob("*")) == figures
