"""C++ (glmrt._C.patchify) vs numpy (patchify_numpy) patchify at page size, on the CPU.

A 1700x2200 (width x height) page is resized by smart_resize to 1708x2212 -> grid [1, 158, 122],
19276 patches x 1176 floats (~91 MB of float32 output). Prints the best-of-N time of each, the
ratio, and the end-to-end ImageProcessor time for the same page for context. Writes
<out>/patchify-<device>-<timestamp>.json and .md (the device is the GPU where there is one: the
run records the host CPU too).

    python benchmarks/patchify.py [--repeats 20] [--out DIR]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import metadata, output_dir, provenance, write_report
from glmrt import image_processor as ip


def best_time(fn, repeats):
    fn()  # warm-up (page faults, lazy init)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--page-width", type=int, default=1700)
    parser.add_argument("--page-height", type=int, default=2200)
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)

    h, w = ip.smart_resize(args.page_height, args.page_width)
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rows = (h // 14) * (w // 14)
    print(f"page {args.page_width}x{args.page_height} -> resized {w}x{h} (w x h), {rows} patches x 1176")

    np_best, np_med = best_time(lambda: ip.patchify_numpy(img, ip.IMAGE_MEAN, ip.IMAGE_STD), args.repeats)
    print(f"numpy patchify: best {np_best * 1e3:8.2f} ms   median {np_med * 1e3:8.2f} ms")
    cpp_best = cpp_med = None
    if ip.HAS_CPP:
        assert np.array_equal(ip._C.patchify(img, ip.IMAGE_MEAN, ip.IMAGE_STD),
                              ip.patchify_numpy(img, ip.IMAGE_MEAN, ip.IMAGE_STD))
        cpp_best, cpp_med = best_time(lambda: ip._C.patchify(img, ip.IMAGE_MEAN, ip.IMAGE_STD), args.repeats)
        print(f"C++ patchify:   best {cpp_best * 1e3:8.2f} ms   median {cpp_med * 1e3:8.2f} ms")
        print(f"ratio numpy/C++ (best): {np_best / cpp_best:.2f}x   (median): {np_med / cpp_med:.2f}x")
    else:
        print("C++ patchify: glmrt._C not built (pip install -e . --no-build-isolation)")

    page = Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (args.page_height, args.page_width, 3), dtype=np.uint8)
    )
    proc = ip.ImageProcessor()
    e2e_best, _ = best_time(lambda: proc([page]), max(3, args.repeats // 4))
    print(f"end-to-end ImageProcessor (RGB convert + bicubic resize + C++ patchify): best {e2e_best * 1e3:.2f} ms")

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else seconds * 1e3

    results = dict(page=[args.page_width, args.page_height], resized=[w, h], patches=rows, repeats=args.repeats,
                   numpy_best_ms=ms(np_best), numpy_median_ms=ms(np_med), cpp_best_ms=ms(cpp_best),
                   cpp_median_ms=ms(cpp_med), processor_best_ms=ms(e2e_best))
    meta = metadata()
    table = [f"| numpy patchify | {_cell(np_best)} | {_cell(np_med)} |",
             f"| C++ patchify | {_cell(cpp_best)} | {_cell(cpp_med)} |",
             f"| ImageProcessor end to end | {_cell(e2e_best)} | - |"]
    lines = [f"# patchify, {args.page_width}x{args.page_height} page ({rows} patches), "
             f"on {meta['host']['cpu']} ({meta['host']['cores']} cores)", "", provenance(meta), "",
             "| step | best ms | median ms |", "|---|---|---|", *table]
    write_report(output_dir(args.out, smoke=False), "patchify", meta, results, lines)
    return 0 if ip.HAS_CPP else 1


def _cell(seconds: float | None) -> str:
    """Seconds as a markdown ms cell; "-" for a step that did not run."""
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


if __name__ == "__main__":
    sys.exit(main())
