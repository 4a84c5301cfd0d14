"""A random checkpoint with a real config, written straight from the device's RNG in seconds.

    python benchmarks/random_checkpoint.py {glm-ocr,glm-image} DIR [--tiny] [--device cuda|cpu]
        [--dtype bfloat16|float32] [--seed N]

glm-ocr: GLM-OCR with its MTP layer, flat in DIR (~2.7 GB in bf16); glm-image: GLM-Image's
autoregressive stage in the Hub's pipeline layout under DIR (9B, ~20 GB in bf16, in shards). --tiny:
the tests' tiny configs instead (glm-image: with the tests' tiny diffusion transformer, VAE and glyph
encoder, a whole pipeline). Defaults: cuda when available, else cpu; bfloat16 on cuda, float32
on cpu. Weights and files are those of glmrt_testing.random_weights (tests/support); pass DIR to the
benchmarks as --model DIR. Prints each file written, the total size and the seconds the write took.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import common  # noqa: F401  (puts tests/support, home of glmrt_testing, on sys.path)
from glmrt_testing import tiny_checkpoint, tiny_glm_image
from glmrt_testing.random_weights import write_glm_image, write_glm_ocr

MODELS = {"glm-ocr": (write_glm_ocr, tiny_checkpoint.tiny_config),
          "glm-image": (write_glm_image, tiny_glm_image.tiny_config)}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("dir", type=Path, help="where to write it (created; a previous checkpoint's weights are replaced)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny config instead of the real one")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="whose RNG draws the weights (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    write, tiny_config = MODELS[args.model]

    start = time.perf_counter()
    root = write(args.dir, tiny_config() if args.tiny else None, device=args.device, dtype=dtype, seed=args.seed)
    if args.model == "glm-image" and args.tiny:  # tiny: a whole pipeline (its diffusion side is seconds on a CPU)
        tiny_glm_image.add_diffusion_components(root)
    seconds = time.perf_counter() - start

    files = sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        print(f"{file.stat().st_size / 1e6:12.1f} MB  {file.relative_to(root)}")
    total = sum(file.stat().st_size for file in files)
    print(f"{args.model} ({'tiny' if args.tiny else 'real'} config, {str(dtype).removeprefix('torch.')}, "
          f"{args.device} RNG, seed {args.seed}): {total / 1e9:.2f} GB in {root} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
