"""The GPU suite's first check (about 30 s): one engine, every kind of step, no hidden waits.

    python benchmarks/smoke.py [--model DIR] [--out DIR] [--smoke]

One engine with MTP speculation (k = 3, speculating up to 16 rows) on --model. Each case fills the
batch, runs until every request is past its prefill, then runs a few engine steps (or, for the
prefill case, the prefill step) under `torch.cuda.set_sync_debug_mode("error")`: a step that
makes the host wait for the device anywhere but at the designed point (the event of the step
before it) raises, and the case fails with the operation named. Cases:
  - prefill of a request with an image, batch 1;
  - speculative decode, batch 1;
  - plain decode, batch 32 (above the speculation limit);
  - structured decode: one json_schema row at batch 1 (speculating: the host waits for its drafts
    too, on an event, to mask the verified positions), and one among 31 plain rows at batch 32.
Every case also checks that each row advanced and no request failed. Without CUDA (the suite's dry
run) the same steps run on the CPU, where there is nothing to wait for.

Beside the checks it measures the machine's two ceilings that every floor of the suite divides by:
device-to-device copy bandwidth (bytes read + written) and bf16 matmul throughput (8192^3), and the
engine's start time (weights, KV cache, CUDA-graph capture). Writes <out>/smoke-<device>-<ts>.json;
exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import CUDA, copy_bandwidth_gbps, key_row, metadata, output_dir, provenance, timed, write_report  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402

SPECULATIVE_TOKENS, SPECULATE_UP_TO = 3, 16
CHECKED_STEPS = 3  # decode steps run under the sync check per case
SCHEMA = {"type": "object", "required": ["lines"], "properties": {
    "lines": {"type": "array", "maxItems": 10_000, "items": {"type": "string", "maxLength": 16}}}}


def matmul_tflops() -> float | None:
    """bf16 8192^3 matmul on random data, best of 5 (None without CUDA)."""
    if not CUDA:
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a @ b
    best = min(timed(lambda: a @ b)[0] for _ in range(5))
    return 2 * 8192**3 / best / 1e12


class SyncCheck:
    """Runs engine steps with CUDA's sync debug mode at "error", and collects what failed in them:
    the exception a step raised (the engine turns a failed device step into failed requests, so the
    runner's launches are wrapped to see the exception itself) and failed outputs."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.errors, self.armed = engine, [], False
        engine.runner.launch = self._watch(engine.runner.launch)  # every step's one entry

    def _watch(self, launch):
        def watched(*args, **kwargs):
            try:
                return launch(*args, **kwargs)
            except Exception as exc:
                if self.armed:
                    self.errors.append(f"{launch.__name__}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                raise
        return watched

    def steps(self, count: int) -> list:
        """`count` engine steps under the check -> their outputs."""
        outputs = []
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        self.armed = True
        try:
            for _ in range(count):
                outputs += self.engine.step()
        except Exception as exc:
            self.errors.append(f"step: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        finally:
            self.armed = False
            if CUDA:
                torch.cuda.set_sync_debug_mode("default")
        self.errors += [f"request failed: {o.error}" for o in outputs if o.finish_reason == "error"]
        return outputs


def page(width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def run_case(engine: LLMEngine, check: SyncCheck, name: str, requests: list[tuple[dict, glmrt.SamplingParams]],
             prefill_only: bool) -> dict:
    """Queue the requests; for a prefill case check the very first step, else step until none is
    waiting or prefilling and check the next steps. Then abort what is left."""
    start, check.errors = time.perf_counter(), []
    ids = [engine.add_request(request, params) for request, params in requests]
    if not prefill_only:
        while engine.scheduler.waiting:
            engine.step()
        engine.step()  # the last prefill's tokens are read, every row now decodes
    outputs = check.steps(1 if prefill_only else CHECKED_STEPS)
    if prefill_only and engine.options.async_scheduling:
        outputs += engine.step()  # reads the prefill's token (unchecked: this step is a decode)
    advanced = {o.request_id for o in outputs if o.delta_token_ids}
    expected = 1 if prefill_only else len(ids)
    if len(advanced) < expected and not check.errors:
        check.errors.append(f"{len(advanced)} of {expected} rows advanced")
    for request_id in engine.request_ids:
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()
    return dict(case=name, batch=len(ids), ok=not check.errors, errors=check.errors,
                seconds=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GLM-OCR checkpoint dir or Hub id")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny prompts and images (for the suite's dry run)")
    args = parser.parse_args(argv)
    prompt_chars, image_size = (24, (64, 48)) if args.smoke else (200, (640, 480))
    bandwidth, tflops = copy_bandwidth_gbps(), matmul_tflops()

    started = time.perf_counter()
    engine = LLMEngine(args.model, max_num_seqs=32, max_model_len=2048, num_speculative_tokens=SPECULATIVE_TOKENS,
                       speculative_max_batch=SPECULATE_UP_TO, gpu_memory_utilization=0.5)
    start_s = time.perf_counter() - started
    check = SyncCheck(engine)
    text, image = {"prompt": "x" * prompt_chars}, {"prompt": "Text Recognition:", "images": [page(*image_size)]}
    plain = glmrt.SamplingParams(max_tokens=512, ignore_eos=True)
    schema = glmrt.SamplingParams(max_tokens=512, json_schema=SCHEMA)
    cases = [("prefill, image", [(image, plain)], True),
             (f"speculative decode, k={SPECULATIVE_TOKENS}", [(text, plain)], False),
             ("decode", [(text, plain)] * 32, False),
             ("structured decode, json_schema", [(text, schema)], False),
             ("structured decode, 1 json_schema row + 31 plain", [(text, schema)] + [(text, plain)] * 31, False)]
    checks = []
    for name, requests, prefill_only in cases:
        try:
            checks.append(run_case(engine, check, name, requests, prefill_only))
        except Exception as exc:  # the case itself broke (outside the checked steps): say so, go on
            traceback.print_exc()
            checks.append(dict(case=name, batch=len(requests), ok=False, seconds=None,
                               errors=[f"case: {type(exc).__name__}: {str(exc).splitlines()[0]}"]))
        c = checks[-1]
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['case']}, batch {c['batch']}" + "".join(f"\n     {e}" for e in c["errors"]))

    meta = metadata(dtype=str(engine.dtype).removeprefix("torch."), smoke=args.smoke, backend=engine.backend,
                    cuda_graphs=engine.runner.graphs is not None, sync_checked=CUDA)
    machine = dict(copy_bandwidth_gbps=bandwidth, matmul_bf16_tflops=tflops)
    key = [key_row("engine start s (weights, KV cache, CUDA graphs; MTP k=3)", "s", start_s)]
    lines = [f"# smoke on {meta['device']['name']}", "", provenance(meta),
             f"- copy bandwidth {bandwidth:.0f} GB/s; bf16 matmul "
             + (f"{tflops:.0f} TFLOP/s" if tflops else "n/a (no CUDA)"),
             f"- engine start {start_s:.1f} s; sync debug mode 'error' {'on' if CUDA else 'n/a (no CUDA)'}", "",
             "| case | batch | result |", "|---|---|---|"]
    lines += [f"| {c['case']} | {c['batch']} | {'ok' if c['ok'] else '; '.join(c['errors'])} |" for c in checks]
    write_report(output_dir(args.out, args.smoke), "smoke", meta, dict(machine=machine, checks=checks, key=key), lines)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
