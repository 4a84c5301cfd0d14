"""Capacity of `glmrt parse --ray`: each stage's rate measured here, then what a cluster sustains.

    python benchmarks/capacity.py [--recognition-pages-per-s R] [--out DIR] [--smoke]

Measured on this machine:
(1) render: pages/s of one CPU core (pypdfium2 at 200 DPI, the SDK's page size, one process),
    over generated text PDFs (US letter) and scanned PDFs (one 200-DPI image per page);
(2) layout: pages/s of PP-DocLayoutV3 (its real config, random weights, fp32, batches of 4 pages,
    as glmrt parse runs it) on this machine's device;
(3) recognition: pages/s of one engine. From --recognition-pages-per-s, else from the newest
    documents benchmark on this device (glmrt parse at full throughput; its layout model is a
    tiny one, so its time is recognition's), else the model card's 1.86 pages/s (whole pipeline,
    single concurrency; a floor, since the engine batches many pages). Random weights emit no eos,
    so benchmark rates are at a fixed tokens/region, not real documents: the report says which.
A recognition actor does layout and recognition on one GPU, so one GPU sustains
g = 1 / (1/r2 + 1/r3) pages/s; render tasks take one core each. A cluster of N GPUs and M cores
then sustains min(N g, M r1) pages/s, and K pages take K / that; the smaller term is the
bottleneck (render CPU, else whichever of layout or recognition takes more of the GPU's time).
Writes <out>/capacity-<device>-<timestamp>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import RESULTS, metadata, output_dir, provenance, write_report  # noqa: E402

import numpy as np  # noqa: E402

from glmrt.documents.layout import LayoutDetector  # noqa: E402
from glmrt.documents.pages import iter_pages  # noqa: E402
from glmrt_testing.documents import make_pdf, make_scanned_pdf  # noqa: E402
from glmrt_testing.tiny_layout import synthetic_page, tiny_layout_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODEL_CARD_PAGES_PER_S = 1.86  # GLM-OCR's model card: PDF pages/s, full pipeline, single concurrency
CLUSTERS = [(1, 8), (1, 32), (8, 64), (8, 256), (64, 512), (64, 2048)]  # (GPUs, CPU cores)
PAGES = 1_000_000


def render_rate(folder: Path, pages: int, scanned: bool) -> float:
    """Pages/s of one core rendering `pages` pages as glmrt parse does."""
    if scanned:
        rng = np.random.default_rng(0)
        path = make_scanned_pdf(folder / "scan.pdf", [synthetic_page(rng, 1700, 2200) for _ in range(pages)])
    else:
        path = make_pdf(folder / "text.pdf", pages=pages, seed=0)
    list(iter_pages(path))  # warm-up: fonts, caches
    start = time.perf_counter()
    rendered = sum(page.image is not None for page in iter_pages(path))
    return rendered / (time.perf_counter() - start)


def layout_rate(pages: int, tiny: bool) -> float:
    """Pages/s of PP-DocLayoutV3 on DEVICE, batches of 4 letter-size pages."""
    from transformers import PPDocLayoutV3Config, PPDocLayoutV3ForObjectDetection

    torch.manual_seed(0)
    config = tiny_layout_config() if tiny else PPDocLayoutV3Config(id2label=tiny_layout_config().id2label)
    detector = LayoutDetector(PPDocLayoutV3ForObjectDetection(config).to(DEVICE).eval())
    rng = np.random.default_rng(1)
    images = [synthetic_page(rng, 1700, 2200) for _ in range(4)]
    detector.detect(images)  # warm-up
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(max(1, pages // 4)):
        detector.detect(images)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return 4 * max(1, pages // 4) / (time.perf_counter() - start)


def recognition_rate(given: float | None, out: Path) -> tuple[float, str]:
    if given is not None:
        return given, "given (--recognition-pages-per-s)"
    device = "cpu" if DEVICE == "cpu" else torch.cuda.get_device_name().lower()
    found = {*out.rglob("documents-*.json"), *RESULTS.rglob("documents-*.json")}
    for path in sorted(found, key=lambda p: p.name, reverse=True):  # newest first (timestamped names)
        data = json.loads(path.read_text())
        ran_on = "cpu" if data["device"]["name"].startswith("cpu") else data["device"]["name"].lower()
        if data.get("smoke") or ran_on != device:
            continue
        full = next(r for r in data["rows"] if r["run"] == "glmrt parse, full throughput")
        return full["pages_per_s"], (f"{path.name}: glmrt parse at full throughput, "
                                     f"{data['tokens_per_region']} tokens/region, {data['model']}; its layout model "
                                     "is a tiny one, so its time is recognition's")
    return MODEL_CARD_PAGES_PER_S, "the model card's 1.86 pages/s (whole pipeline, single concurrency)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recognition-pages-per-s", type=float)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, tiny layout model: checks the code path")
    args = parser.parse_args()
    pages = 2 if args.smoke else 12
    with tempfile.TemporaryDirectory() as tmp:
        r_text = render_rate(Path(tmp), pages, scanned=False)
        r_scan = render_rate(Path(tmp), pages, scanned=True)
    r1 = min(r_text, r_scan)
    r2 = layout_rate(pages, tiny=args.smoke)
    out = output_dir(args.out, args.smoke)
    r3, r3_source = recognition_rate(args.recognition_pages_per_s, out)
    g = 1 / (1 / r2 + 1 / r3)
    rows = []
    for gpus, cores in CLUSTERS:
        render, gpu = cores * r1, gpus * g
        bottleneck = "render CPU" if render < gpu else ("layout" if 1 / r2 > 1 / r3 else "recognition")
        rate = min(render, gpu)
        rows.append(dict(gpus=gpus, cores=cores, render_pages_per_s=render, gpu_pages_per_s=gpu,
                         pages_per_s=rate, hours_for_pages=PAGES / rate / 3600, bottleneck=bottleneck))
    layout = "tiny random" if args.smoke else "PP-DocLayoutV3 config, random weights"
    meta = metadata(smoke=args.smoke, layout_model=layout)
    results = dict(render_text_pages_per_s=r_text, render_scanned_pages_per_s=r_scan, layout_pages_per_s=r2,
                   recognition_pages_per_s=r3, recognition_source=r3_source, gpu_pages_per_s=g, pages=PAGES, rows=rows)
    md = [f"# glmrt parse --ray capacity, measured on {meta['device']['name']}", "", provenance(meta),
          f"- render, one core: {r_text:.3g} pages/s (text PDFs), {r_scan:.3g} pages/s (scanned); r1 = {r1:.3g}",
          f"- layout ({meta['layout_model']}, fp32, batches of 4) on {DEVICE}: r2 = {r2:.3g} pages/s",
          f"- recognition: r3 = {r3:.3g} pages/s ({r3_source})",
          f"- one GPU (layout + recognition): g = 1 / (1/{r2:.3g} + 1/{r3:.3g}) = {g:.3g} pages/s",
          "", f"| GPUs N | cores M | M r1 | N g | sustained pages/s | hours for {PAGES:,} pages | bottleneck |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['gpus']} | {r['cores']} | {r['render_pages_per_s']:.3g} | {r['gpu_pages_per_s']:.3g} | "
           f"{r['pages_per_s']:.3g} | {r['hours_for_pages']:.3g} | {r['bottleneck']} |" for r in rows]
    write_report(out, "capacity", meta, results, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
