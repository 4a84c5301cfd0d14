"""Host overhead of the engine: microseconds of Python work per decode step and per prefill, with
the device work replaced by a stub that costs nothing.

What is measured is everything the host does around a step: scheduling, block bookkeeping, the
uploads it prepares (new block ids, admitted rows), reading the sampled tokens back, stop checks,
incremental detokenization and building the outputs. The decoder, the vision tower, lm_head and
the sampler are stubbed (they run on the device, overlapped with this host work), so the numbers
are the same on a CPU-only machine as on a GPU host, and they show whether the host keeps up with
the device: at batch 1 an H100 decode step of GLM-OCR is ~0.4-0.5 ms.

Cases: decode steps at batch 1, 8, 32 and 128, each at a short and a long history (64 and 3,500
prompt tokens, repetition penalty 1.1 as the glmocr SDK sends), and a prefill of 32 region crops
(the engine's step, and the crops' preprocessing on the worker pool beside it), and mixed steps:
31 sequences decoding while 4,000-token prompts are prefilled beside them in 2048-token steps.

    python benchmarks/host_overhead.py [--steps N] [--out DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import metadata, output_dir, provenance, write_report  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt_testing.helpers import make_image  # noqa: E402
from glmrt_testing.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402

TARGET_US = {1: 150, 32: 500}  # issue targets on the development machine
TEXT_TOKENS = torch.arange(300, 364)  # byte-level ids of ordinary characters: real detokenization work


class StubDevice:
    """Stands in for the device work of a step: forward, vision (with the pixels' normalization),
    lm_head, sampler. Tokens cycle
    through ordinary text ids so that detokenization does its usual work; under a structured-output
    mask, a row takes a pseudo-random allowed token instead (that choice is the stub's own work:
    `seconds` accumulates it, for callers to subtract)."""

    def __init__(self, engine: LLMEngine):
        runner, model = engine.runner, engine.model
        self.step = 0
        self.seconds = 0.0
        hidden = model.config.text.hidden_size
        model.forward = lambda input_ids, *a, **k: torch.empty(input_ids.shape[0], hidden)
        runner.normalize_pixels = lambda pixels: pixels
        model.encode_images = lambda pixels, grids: torch.zeros(
            sum(t * h * w for t, h, w in grids) // 4, hidden)
        model.compute_logits = lambda h: h[:, :1]
        runner.sampler = self.sample
        # (tokens, the logits they came from): what a decode step returns
        runner.decode_step = lambda bs, do_sample: (self.sample(None, slice(0, bs), do_sample), torch.zeros(bs, 1))
        runner.decode_logits = lambda bs: torch.zeros(bs, 1)  # the forward half of a constrained step

    def sample(self, logits, rows: slice, do_sample: bool, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.step += 1
        n = rows.stop - rows.start
        tokens = TEXT_TOKENS[(torch.arange(n) + self.step) % len(TEXT_TOKENS)]
        if token_mask is not None:
            start = time.perf_counter()
            words = token_mask[:n].numpy()
            for i in range(n):
                if (words[i] == -1).all():  # no constraint on this row
                    continue
                nonzero = np.flatnonzero(words[i])  # words with an allowed token
                w = int(nonzero[(self.step * 7919 + i * 104729) % len(nonzero)])
                bits = [b for b in range(32) if (int(words[i, w]) >> b) & 1]
                tokens[i] = 32 * w + bits[(self.step + i) % len(bits)]
            self.seconds += time.perf_counter() - start
        return tokens


def decode_case(path: Path, batch: int, prompt_tokens: int, steps: int) -> dict:
    context = prompt_tokens + steps + 64
    engine = LLMEngine(str(path), device="cpu", dtype="float32", backend="torch", max_num_seqs=batch,
                       max_model_len=context, kv_cache_tokens=batch * context, max_num_batched_tokens=batch * context)
    StubDevice(engine)
    prompt = "x" * (prompt_tokens - 16)  # one byte-level token per character, plus the template
    params = glmrt.SamplingParams(max_tokens=steps + 8, ignore_eos=True, repetition_penalty=1.1)
    for _ in range(batch):
        engine.add_request({"prompt": prompt, "images": []}, params)
    engine.step()  # prefill of the whole batch in one step
    engine.step()  # first decode (the prefill's tokens are read here)
    assert len(engine.scheduler.running) == batch
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        assert len(outputs) == batch, "every sequence must advance each step"
    history = engine.scheduler.running[0].num_tokens
    return dict(batch=batch, history_tokens=history, steps=steps, median_us=statistics.median(times) * 1e6,
                p90_us=sorted(times)[int(0.9 * len(times))] * 1e6)


def mixed_case(path: Path, batch: int, prompt_tokens: int, budget: int, steps: int) -> dict:
    """`batch` sequences decoding while long prompts arrive one after another: the host time of
    the mixed steps (the decode rows + a prefill chunk of the rest of the step's token budget)."""
    context = prompt_tokens + 64
    engine = LLMEngine(str(path), device="cpu", dtype="float32", backend="torch", max_num_seqs=batch + 1,
                       max_model_len=context, kv_cache_tokens=(batch + 1) * context, max_num_batched_tokens=budget)
    StubDevice(engine)
    params = glmrt.SamplingParams(max_tokens=10_000, ignore_eos=True, repetition_penalty=1.1)
    for _ in range(batch):
        engine.add_request({"prompt": "x" * 48, "images": []}, params)
    engine.step()
    long_prompt = {"prompt": "x" * (prompt_tokens - 16), "images": []}
    times, chunks = [], []
    while len(times) < steps:
        seq = engine.prepare(long_prompt, glmrt.SamplingParams(max_tokens=1))
        engine.enqueue(seq)
        while engine.has_request(seq.request_id):
            before = seq.num_cached
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            if seq.num_cached > before:  # this step ran one of its chunks beside the decode rows
                times.append(elapsed)
                chunks.append(seq.num_cached - before)
    return dict(batch=batch, prompt_tokens=prompt_tokens, steps=len(times), median_chunk_tokens=statistics.median(chunks),
                median_us=statistics.median(times) * 1e6, budget=engine.max_num_batched_tokens)


def prefill_case(path: Path, crops: int, repeats: int) -> dict:
    engine = LLMEngine(str(path), device="cpu", dtype="float32", backend="torch", max_num_seqs=crops)
    StubDevice(engine)
    images = [make_image(300 + 7 * i, 120 + 3 * i, i) for i in range(crops)]  # region-crop sizes
    params = glmrt.SamplingParams(max_tokens=4, repetition_penalty=1.1)
    prep, step = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        seqs = engine.prepare_many([{"prompt": "Text Recognition:", "images": [im]} for im in images],
                                   [params] * len(images))
        pixel_mb = sum(s.pixel_values.nbytes for s in seqs) / 1e6
        prep.append(time.perf_counter() - start)
        for seq in seqs:
            engine.enqueue(seq)
        start = time.perf_counter()
        engine.step()
        step.append(time.perf_counter() - start)
        while engine.has_unfinished():
            engine.step()
    tokens = sum(len(s.prompt_token_ids) for s in seqs)
    return dict(crops=crops, prompt_tokens=tokens, pixel_mb=pixel_mb, repeats=repeats, prefill_step_median_us=statistics.median(step) * 1e6,
                preprocess_median_ms=statistics.median(prep) * 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per case")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="few steps, small batches: checks the script works")
    args = parser.parse_args(argv)
    batches, histories, steps, crops = ([1, 8, 32, 128], [64, 3500], args.steps, 32)
    if args.smoke:
        batches, histories, steps, crops = [1, 8], [64], 10, 4
    path = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="glmrt-host-")))
    torch.set_num_threads(1)  # host work is single-threaded; keep the numbers steady
    decode = []
    for history in histories:
        for batch in batches:
            row = decode_case(path, batch, history, steps)
            decode.append(row)
            print(f"decode batch {batch:4d}, history {row['history_tokens']:5d}: "
                  f"median {row['median_us']:7.1f} us/step, p90 {row['p90_us']:7.1f}")
    # the tiny checkpoint's context is 4096 tokens: 4000-token prompts in chunks of vLLM's 2048-token server budget
    mixed = mixed_case(path, 3, 300, 128, 2) if args.smoke else mixed_case(path, 31, 4000, 2048, 20)
    print(f"mixed step, {mixed['batch']} decoding + a {mixed['median_chunk_tokens']:.0f}-token chunk: "
          f"median {mixed['median_us']:.0f} us/step")
    prefill = prefill_case(path, crops, 3 if args.smoke else 10)
    print(f"prefill of {crops} crops ({prefill['prompt_tokens']} tokens): engine step "
          f"{prefill['prefill_step_median_us']:.0f} us; preprocessing {prefill['preprocess_median_ms']:.1f} ms")

    meta = metadata(smoke=args.smoke, torch_threads=1)
    lines = [f"# host overhead per engine step, device work stubbed, on {meta['host']['cpu']} "
             f"({meta['host']['cores']} cores)", "", provenance(meta), "",
             "| batch | history tokens | median us/step | p90 us/step | target |", "|---|---|---|---|---|"]
    for r in decode:
        target = TARGET_US.get(r["batch"])
        verdict = "-" if target is None else f"<= {target} ({'PASS' if r['median_us'] <= target else 'MISS'})"
        lines.append(f"| {r['batch']} | {r['history_tokens']} | {r['median_us']:.0f} | {r['p90_us']:.0f} | {verdict} |")
    lines += ["", f"Mixed step (chunked prefill): {mixed['batch']} sequences decoding while {mixed['prompt_tokens']}-token "
              f"prompts arrive, each prefilled in chunks of the {mixed['budget']}-token budget beside the decode rows: "
              f"{mixed['median_us']:.0f} us of host work per step (median over {mixed['steps']} steps, chunks of "
              f"{mixed['median_chunk_tokens']:.0f} tokens)."]
    lines += ["", f"Prefill of {crops} region crops ({prefill['prompt_tokens']} prompt tokens): engine step "
              f"{prefill['prefill_step_median_us']:.0f} us (host side of the step, including concatenating the "
              f"crops' {prefill['pixel_mb']:.1f} MB of uint8 patch pixels, normalized on the device); "
              f"preprocessing on the worker pool {prefill['preprocess_median_ms']:.1f} ms (overlaps running steps in "
              "the async engine)."]
    write_report(output_dir(args.out, args.smoke), "host_overhead", meta, dict(decode=decode, mixed=mixed, prefill=prefill),
                 lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
