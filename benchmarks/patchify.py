"""C++ (glmrt._C.patchify) vs numpy (patchify_numpy) patchify at page size, on the CPU.

A 1700x2200 (width x height) page is resized by smart_resize to 1708x2212 -> grid [1, 158, 122],
19276 patches x 1176 floats (~91 MB of float32 output). Prints the best-of-N time of each, the
ratio, and the end-to-end ImageProcessor time for the same page for context.

    python benchmarks/patchify.py [--repeats 20]
"""
import argparse
import sys
import time

import numpy as np
from PIL import Image

from glmrt import image_processor as ip


def best_time(fn, repeats):
    fn()  # warm-up (page faults, lazy init)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--page-width", type=int, default=1700)
    parser.add_argument("--page-height", type=int, default=2200)
    args = parser.parse_args()

    h, w = ip.smart_resize(args.page_height, args.page_width)
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rows = (h // 14) * (w // 14)
    print(f"page {args.page_width}x{args.page_height} -> resized {w}x{h} (w x h), {rows} patches x 1176")

    np_best, np_med = best_time(lambda: ip.patchify_numpy(img, ip.IMAGE_MEAN, ip.IMAGE_STD), args.repeats)
    print(f"numpy patchify: best {np_best * 1e3:8.2f} ms   median {np_med * 1e3:8.2f} ms")
    if not ip.HAS_CPP:
        print("C++ patchify: glmrt._C not built (pip install -e . --no-build-isolation)")
        return 1
    assert np.array_equal(ip._C.patchify(img, ip.IMAGE_MEAN, ip.IMAGE_STD), ip.patchify_numpy(img, ip.IMAGE_MEAN, ip.IMAGE_STD))
    cpp_best, cpp_med = best_time(lambda: ip._C.patchify(img, ip.IMAGE_MEAN, ip.IMAGE_STD), args.repeats)
    print(f"C++ patchify:   best {cpp_best * 1e3:8.2f} ms   median {cpp_med * 1e3:8.2f} ms")
    print(f"ratio numpy/C++ (best): {np_best / cpp_best:.2f}x   (median): {np_med / cpp_med:.2f}x")

    page = Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (args.page_height, args.page_width, 3), dtype=np.uint8)
    )
    proc = ip.ImageProcessor()
    e2e_best, _ = best_time(lambda: proc([page]), max(3, args.repeats // 4))
    print(f"end-to-end ImageProcessor (RGB convert + PIL bicubic + C++ patchify): best {e2e_best * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
