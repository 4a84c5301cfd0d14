"""What structured outputs cost per decode step: json_schema rows beside unconstrained rows.

Cases are (batch, constrained rows): all rows unconstrained, one json_schema row among the rest
(the usual mix in a server), and every row constrained. Two measurements:
- host: the engine's host work per step with the device stubbed (as in host_overhead.py), so
  the numbers are the same on a CPU-only machine as on a GPU host. A constrained step adds
  filling the rows' token masks (llguidance) and advancing their grammars by the tokens read
  back; the split of that cost is reported. On a GPU the mask work runs while the device runs the
  step's forward, so it is hidden as long as it is shorter than the forward (~0.4-0.5 ms for
  GLM-OCR's decoder at batch 1 on an H100).
- device (cuda when present, or --device cpu for a smoke run of the real path): wall time per
  engine step of the real checkpoint, CUDA graphs on, against all rows unconstrained. Every step
  runs as two graphs, the forward and the sampling under the token masks, with the host reading
  the previous step's tokens between the two launches; a constrained row adds filling its mask
  and uploading the masks there, which is what this measures.

The schema is an extraction schema of the model card's kind (strings, a nested object, an array of
line items) whose array must hold 10,000 items, so that no request can complete it while timed.

- default: batches 1 and 32; at 32 all unconstrained, one json_schema row, and all constrained;
- --key (the GPU suite's key numbers): batch 32, all unconstrained vs one json_schema row among
  31, on the device and on the host.

--model is the GLM-OCR checkpoint both measurements load (a directory or Hub id); without it a
real-size one with random weights is written to a temp dir when the device is cuda, else the tiny
test checkpoint is built. `--smoke`: 10 steps per case (and the tiny checkpoint without --model).

    python benchmarks/structured.py [--model DIR_OR_HUB_ID] [--key] [--steps N] [--device cpu|cuda]
                                    [--out DIR] [--smoke]
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
from common import CUDA, key_row, metadata, output_dir, provenance, write_report  # noqa: E402
from host_overhead import StubDevice  # noqa: E402
from spec_decode import prompt_ids  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt_testing.random_weights import write_glm_ocr  # noqa: E402
from glmrt_testing.tiny_checkpoint import tiny_config  # noqa: E402

SCHEMA = glmrt.extraction.template_to_schema({
    "invoice_number": "", "date": "", "seller": {"name": "", "address": ""},
    "items": [{"description": "", "quantity": "", "price": ""}],
})
for _leaf in ("description", "quantity", "price"):
    SCHEMA["properties"]["items"]["items"]["properties"][_leaf]["maxLength"] = 24
SCHEMA["properties"]["items"]["minItems"] = SCHEMA["properties"]["items"]["maxItems"] = 10_000
PROMPT_TOKENS = 256
FULL_CASES = [(1, 0), (1, 1), (32, 0), (32, 1), (32, 32)]  # (batch, json_schema rows)
KEY_CASES = [(32, 0), (32, 1)]


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


class Probes:
    """Seconds an engine spends filling token masks and advancing grammars, and with its device
    work stubbed (`stub`), in the stub's own token choice; summed since the last reset."""

    def __init__(self, engine: LLMEngine, stub: bool):
        self.stub = StubDevice(engine) if stub else None
        self.masks, self.accept = Timed(engine.structured, "fill_masks"), Timed(engine.structured, "accept")

    def reset(self) -> None:
        for probe in (self.stub, self.masks, self.accept):
            if probe is not None:
                probe.seconds = 0.0


def rows_name(batch: int, constrained: int) -> str:
    if constrained == 0:
        return f"{batch} unconstrained"
    if constrained == batch:
        return f"{batch} json_schema"
    return f"{constrained} json_schema + {batch - constrained} unconstrained"


def _params(batch: int, constrained: int, steps: int) -> list[glmrt.SamplingParams]:
    """One SamplingParams per row: the first `constrained` rows under the schema."""
    return [glmrt.SamplingParams(max_tokens=steps + 8, ignore_eos=True, repetition_penalty=1.1,
                                 json_schema=SCHEMA if row < constrained else None) for row in range(batch)]


def _engine(path: str, batch: int, steps: int, device: str, **options) -> LLMEngine:
    """Room for `batch` requests of `steps` tokens (and a warm-up), all prefilled in one step."""
    context = PROMPT_TOKENS + steps + 64
    return LLMEngine(path, device=device, max_num_seqs=batch, max_model_len=context,
                     kv_cache_tokens=batch * context, max_num_batched_tokens=batch * context, **options)


def _timed_steps(engine: LLMEngine, params: list[glmrt.SamplingParams], steps: int, sync: bool,
                 probes: Probes | None = None) -> tuple[list[float], int]:
    """A row per SamplingParams, all prefilled in one step; -> (seconds of each of `steps` decode
    steps, outputs they returned), `probes` counting from the first of them. Every request is
    still running at the end (then aborted)."""
    prompt = prompt_ids(engine, PROMPT_TOKENS)
    ids = [engine.add_request({"prompt_token_ids": prompt}, p) for p in params]
    engine.step()  # prefill of the whole batch
    engine.step()  # first decode (the prefill's tokens are read here)
    if probes is not None:
        probes.reset()
    times, outputs = [], 0
    for _ in range(steps):
        start = time.perf_counter()
        outputs += len(engine.step())
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert all(engine.has_request(i) for i in ids), "a request ended while timed: the batch changed"
    for request_id in ids:
        engine.abort(request_id)
    return times, outputs


def host_case(engine: LLMEngine, probes: Probes, batch: int, constrained: int, steps: int) -> dict:
    """`engine` runs on the CPU with its device work stubbed."""
    times, outputs = _timed_steps(engine, _params(batch, constrained, steps), steps, sync=False, probes=probes)
    assert outputs == batch * steps, "every sequence must advance each step"
    return dict(batch=batch, constrained_rows=constrained, steps=steps,
                mean_us=(sum(times) - probes.stub.seconds) / steps * 1e6,
                masks_us=probes.masks.seconds / steps * 1e6, accept_us=probes.accept.seconds / steps * 1e6)


def device_case(engine: LLMEngine, probes: Probes, batch: int, constrained: int, steps: int) -> dict:
    _timed_steps(engine, _params(batch, constrained, 8), 8, sync=engine.device.type == "cuda")  # warm-up
    times, _ = _timed_steps(engine, _params(batch, constrained, steps), steps, sync=False, probes=probes)
    return dict(batch=batch, constrained_rows=constrained, steps=steps, median_ms=statistics.median(times) * 1e3,
                masks_us=probes.masks.seconds / steps * 1e6)


PEER = "glmrt, batch 32, every row unconstrained"


def run_device(path: str, device: str, cases: list[tuple[int, int]], steps: int) -> tuple[list[dict], list[dict]]:
    """-> (a row per case, key rows); one engine per batch size."""
    rows, key = [], []
    for batch in sorted({b for b, _ in cases}):
        engine = _engine(path, batch, steps, device)
        probes = Probes(engine, stub=False)
        for constrained in [c for b, c in cases if b == batch]:
            row = device_case(engine, probes, batch, constrained, steps)
            rows.append(row)
            print(f"{device}, {rows_name(batch, constrained)}: {row['median_ms']:.3f} ms/step "
                  f"(masks {row['masks_us']:.0f} us)", flush=True)
            if (batch, constrained) == (32, 1):
                base = next(r for r in rows if (r["batch"], r["constrained_rows"]) == (32, 0))
                key.append(key_row(f"decode ms/step, batch 32, {rows_name(32, 1)} rows", "ms", row["median_ms"],
                                   peer=base["median_ms"], peer_name=PEER))
        del engine
    return rows, key


def run_host(path: str, cases: list[tuple[int, int]], steps: int) -> tuple[list[dict], list[dict]]:
    """-> (a row per case, key rows); one CPU engine per batch size, device work stubbed."""
    rows, key = [], []
    for batch in sorted({b for b, _ in cases}):
        # bf16: the weights are loaded but never run (the stub replaces the forward)
        engine = _engine(path, batch, steps, "cpu", dtype="bfloat16", backend="torch")
        probes = Probes(engine, stub=True)
        for constrained in [c for b, c in cases if b == batch]:
            row = host_case(engine, probes, batch, constrained, steps)
            rows.append(row)
            print(f"host, {rows_name(batch, constrained)}: {row['mean_us']:7.1f} us/step (masks "
                  f"{row['masks_us']:.0f}, grammar advance {row['accept_us']:.0f})", flush=True)
            if (batch, constrained) == (32, 1):
                base = next(r for r in rows if (r["batch"], r["constrained_rows"]) == (32, 0))
                key.append(key_row(f"host work us/step (device stubbed), batch 32, {rows_name(32, 1)} rows", "us",
                                   row["mean_us"], peer=base["mean_us"], peer_name=PEER))
        del engine
    return rows, key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GLM-OCR checkpoint dir or Hub id (default: see above)")
    parser.add_argument("--key", action="store_true", help="only the GPU suite's key numbers (see above)")
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per case")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="device of the real steps (default: cuda if present; cpu with --key; else none)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="few steps: checks the script works")
    args = parser.parse_args(argv)
    steps = 10 if args.smoke else args.steps
    device = args.device or ("cuda" if CUDA else "cpu" if args.key else None)
    cases = KEY_CASES if args.key else FULL_CASES
    torch.set_num_threads(1)  # host work is single-threaded; keep the numbers steady
    real_size = device == "cuda" and not args.smoke
    with tempfile.TemporaryDirectory(prefix="glmrt-structured-") as tmp:
        path = args.model or str(write_glm_ocr(Path(tmp) / "ckpt", None if real_size else tiny_config(),
                                               device="cuda" if real_size else "cpu",
                                               dtype=torch.bfloat16 if real_size else torch.float32))
        real, key = run_device(path, device, cases, steps) if device is not None else ([], [])  # first: the key number
        host, host_key = run_host(path, cases, steps)

    meta = metadata(smoke=args.smoke, key_only=args.key, model=args.model, torch_threads=1, schema=SCHEMA)
    checkpoint = args.model or ("random weights (real config)" if real_size else "tiny test config")
    lines = ["# structured outputs: cost per decode step", "", provenance(meta), f"- checkpoint {checkpoint}", "",
             f"Host work per engine step, device stubbed, on {meta['host']['cpu']} ({meta['host']['cores']} cores); "
             "the stub's own token choice is subtracted.", "",
             "| batch | rows | mean us/step | of which: masks us | grammar advance us | added vs unconstrained |",
             "|---|---|---|---|---|---|"]
    base = {r["batch"]: r["mean_us"] for r in host if not r["constrained_rows"]}
    for r in host:
        added = f"{r['mean_us'] - base[r['batch']]:+.0f} us" if r["constrained_rows"] else "-"
        lines.append(f"| {r['batch']} | {rows_name(r['batch'], r['constrained_rows'])} | {r['mean_us']:.0f} | "
                     f"{r['masks_us']:.0f} | {r['accept_us']:.0f} | {added} |")
    if real:
        lines += ["", f"Wall time per engine step on {meta['device']['name'] if device == 'cuda' else 'cpu'} "
                      f"({'bf16, CUDA graphs' if device == 'cuda' else 'eager'}):", "",
                  "| batch | rows | median ms/step | added vs unconstrained | masks us/step |", "|---|---|---|---|---|"]
        base = {r["batch"]: r["median_ms"] for r in real if not r["constrained_rows"]}
        for r in real:
            added = f"{r['median_ms'] - base[r['batch']]:+.3f} ms" if r["constrained_rows"] else "-"
            lines.append(f"| {r['batch']} | {rows_name(r['batch'], r['constrained_rows'])} | {r['median_ms']:.3f} | "
                         f"{added} | {r['masks_us']:.0f} |")
    print("\n".join(lines))
    write_report(output_dir(args.out, args.smoke), "structured", meta,
                 dict(host=host, device_steps=real, key=key + host_key), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
