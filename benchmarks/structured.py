"""What structured outputs cost per decode step: constrained (json_schema) beside unconstrained
rows, at batch 1 and 32.

Two measurements:
- host: the engine's host work per step with the device stubbed (as in host_overhead.py), so
  the numbers are the same on a CPU-only machine as on a GPU host. A constrained step adds
  filling the rows' token masks (llguidance) and advancing their grammars by the tokens read
  back; the split of that cost is reported. On a GPU the mask work runs while the device runs the
  step's forward, so it is hidden as long as it is shorter than the forward (~0.4-0.5 ms for
  GLM-OCR's decoder at batch 1 on an H100).
- device (with --device cuda, or --device cpu for a smoke run of the real path): wall time per
  engine step of a real-size random-weight GLM-OCR, CUDA graphs on, constrained vs unconstrained:
  whether the masks stay hidden behind the forward.

The schema is an extraction schema of the model card's kind (strings, a nested object, an array of
line items) whose array is long enough that no request completes it while being timed.

    python benchmarks/structured.py [--steps N] [--device cpu|cuda] [--out DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import metadata, output_dir, provenance, write_report  # noqa: E402
from host_overhead import StubDevice  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt_testing.tiny_checkpoint import build_checkpoint, build_tiny_checkpoint, real_config  # noqa: E402

SCHEMA = glmrt.extraction.template_to_schema({
    "invoice_number": "", "date": "", "seller": {"name": "", "address": ""},
    "items": [{"description": "", "quantity": "", "price": ""}],
})
for _leaf in ("description", "quantity", "price"):
    SCHEMA["properties"]["items"]["items"]["properties"][_leaf]["maxLength"] = 24
SCHEMA["properties"]["items"]["maxItems"] = 10_000
PROMPT_TOKENS = 256


class Timed:
    """Wraps a method of `owner` and sums the seconds spent in it."""

    def __init__(self, owner, name: str):
        self.seconds, inner = 0.0, getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)


def _params(constrained: bool, steps: int) -> glmrt.SamplingParams:
    return glmrt.SamplingParams(max_tokens=steps + 8, ignore_eos=True, repetition_penalty=1.1,
                                json_schema=SCHEMA if constrained else None)


def _engine(path: Path, batch: int, steps: int, device: str) -> LLMEngine:
    context = PROMPT_TOKENS + steps + 64
    return LLMEngine(str(path), device=device, max_num_seqs=batch, max_model_len=context,
                     kv_cache_tokens=batch * context, max_num_batched_tokens=batch * context)


def _timed_steps(engine: LLMEngine, batch: int, params: glmrt.SamplingParams, steps: int,
                 sync: bool) -> tuple[list[float], int]:
    prompt = "x" * (PROMPT_TOKENS - 16)
    for _ in range(batch):
        engine.add_request({"prompt": prompt, "images": []}, params)
    engine.step()  # prefill of the whole batch
    engine.step()  # first decode (the prefill's tokens are read here)
    times, outputs = [], 0
    for _ in range(steps):
        start = time.perf_counter()
        outputs += len(engine.step())
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    for request_id in engine.request_ids:
        engine.abort(request_id)
    return times, outputs


def host_case(path: Path, batch: int, constrained: bool, steps: int) -> dict:
    engine = _engine(path, batch, steps, "cpu")
    stub = StubDevice(engine)
    masks, accept = Timed(engine.structured, "fill_masks"), Timed(engine.structured, "accept")
    times, outputs = _timed_steps(engine, batch, _params(constrained, steps), steps, sync=False)
    assert outputs == batch * steps, "every sequence must advance each step"
    total = sum(times)
    return dict(batch=batch, constrained=constrained, steps=steps,
                mean_us=(total - stub.seconds) / steps * 1e6,
                masks_us=masks.seconds / steps * 1e6, accept_us=accept.seconds / steps * 1e6)


def device_case(path: Path, batch: int, constrained: bool, steps: int, device: str) -> dict:
    engine = _engine(path, batch, steps, device)
    masks = Timed(engine.structured, "fill_masks")
    _timed_steps(engine, batch, _params(constrained, 8), 8, sync=device == "cuda")  # warm-up
    masks.seconds = 0.0
    times, _ = _timed_steps(engine, batch, _params(constrained, steps), steps, sync=False)
    return dict(batch=batch, constrained=constrained, steps=steps, median_ms=statistics.median(times) * 1e3,
                masks_us=masks.seconds / steps * 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per case")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="also time real steps (default: cuda if present)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="few steps: checks the script works")
    args = parser.parse_args(argv)
    steps = 10 if args.smoke else args.steps
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    torch.set_num_threads(1)  # host work is single-threaded; keep the numbers steady
    tiny = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="glmrt-structured-")))

    host = []
    for batch in (1, 32):
        for constrained in (False, True):
            row = host_case(tiny, batch, constrained, steps)
            host.append(row)
            print(f"host, batch {batch:2d}, {'constrained  ' if constrained else 'unconstrained'}: "
                  f"{row['mean_us']:7.1f} us/step (masks {row['masks_us']:.0f}, grammar advance {row['accept_us']:.0f})")
    real = []
    if device is not None:
        config = real_config() if device == "cuda" else None
        path = build_checkpoint(Path(tempfile.mkdtemp(prefix="glmrt-structured-real-")), config,
                                dtype=torch.bfloat16) if config is not None else tiny
        for batch in (1, 32):
            for constrained in (False, True):
                row = device_case(path, batch, constrained, steps, device)
                real.append(row)
                print(f"{device}, batch {batch:2d}, {'constrained  ' if constrained else 'unconstrained'}: "
                      f"{row['median_ms']:.3f} ms/step (masks {row['masks_us']:.0f} us)")

    meta = metadata(smoke=args.smoke, torch_threads=1, schema=SCHEMA)
    lines = ["# structured outputs: cost per decode step", "", provenance(meta), "",
             f"Host work per engine step, device stubbed, on {meta['host']['cpu']} ({meta['host']['cores']} cores); "
             "the stub's own token choice is subtracted.", "",
             "| batch | rows | mean us/step | of which: masks us | grammar advance us | added vs unconstrained |",
             "|---|---|---|---|---|---|"]
    base = {r["batch"]: r["mean_us"] for r in host if not r["constrained"]}
    for r in host:
        added = f"{r['mean_us'] - base[r['batch']]:+.0f} us" if r["constrained"] else "-"
        lines.append(f"| {r['batch']} | {'json_schema' if r['constrained'] else 'unconstrained'} | "
                     f"{r['mean_us']:.0f} | {r['masks_us']:.0f} | {r['accept_us']:.0f} | {added} |")
    if real:
        lines += ["", f"Wall time per engine step on {meta['device']['name']} "
                      f"({'real-size random weights, bf16, CUDA graphs' if device == 'cuda' else 'tiny checkpoint, eager'}):",
                  "", "| batch | rows | median ms/step | masks us/step |", "|---|---|---|---|"]
        lines += [f"| {r['batch']} | {'json_schema' if r['constrained'] else 'unconstrained'} | "
                  f"{r['median_ms']:.3f} | {r['masks_us']:.0f} |" for r in real]
    write_report(output_dir(args.out, args.smoke), "structured", meta, dict(host=host, device_steps=real), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
