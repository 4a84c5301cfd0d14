"""glmrt vs transformers, end to end, side by side in one run on one device.

    python benchmarks/e2e.py [--model DIR_OR_HUB_ID] [--out DIR] [--key] [--smoke]

Without --model, a checkpoint with GLM-OCR's real config and random bf16 weights is written to a
temp dir (random weights decode at the same speed as real ones). Both sides get the same token
ids / images; generation is forced to a fixed length (ignore_eos / min_new_tokens) so both
produce exactly the same number of tokens. Decode prompts are random token ids, so a context is
exactly its number of tokens whatever the tokenizer.

(a) decode ms/token at batch 1, contexts 1k and 5k, and the steady-state decode ms/step of a full
    batch (32 rows at 1k and 4k contexts: every prompt prefilled before the timed steps, which
    are decode-only; 32 timed steps with --key, 64 without). transformers' per-step time is that
    of the N tokens after the first within one generate call of N + 1 tokens (the device drained
    at each token), the best of two runs, one (left-padded) generate call for the whole batch. Floors: the decoder's weight bytes (every text layer +
    final norm + lm_head, read once per step) and weights + KV (every layer's K and V of every
    context token of every row, in the cache's dtype), over the measured copy bandwidth.
(b) time to first token of one 1700x2200 page and of one 300x100 region crop (preprocessing +
    vision + prefill + first sample).
(c) memory: free GPU memory once the engine is built (weights, KV cache and CUDA-graph pools
    allocated), the memory the graph capture kept reserved (not yet counted by the KV-cache
    budget) and the KV-cache capacity in tokens.
(d) a profile of one replay of the captured batch-1 decode step at context 1k: device ops, their
    summed time vs the replay's wall time on the device (the difference is the gaps), the 10
    longest ops.
(e) without --key: throughput (generated tokens/s) for 64 document crops of mixed sizes, 256 new
    tokens each, at concurrency 32 (glmrt max_num_seqs=32; transformers in padded batches of 32).
(f) with --invariance, only this: the cost of batch invariance, glmrt's decode ms/step with its
    batch-invariant kernels (the default) and with the batch-tuned ones (batch_invariant=False),
    each on its own engine, at batch 1, 8 and 32 and the batch-1 contexts (1k, 5k); written as
    <out>/invariance-<device>-<timestamp>.json and .md.
--key runs (a)-(d) only, sized to finish in about 90 s on an H100. Writes
<out>/e2e-<device>-<timestamp>.json and .md. `--smoke` runs a tiny checkpoint on CPU with small
sizes (a batch of 4) to prove every code path (numbers meaningless; no CUDA graphs, so no (d)).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import (SUMMARIZERS, copy_bandwidth_gbps, floor_ms, key_row, metadata, output_dir, provenance,  # noqa: E402
                    sync, timed, write_report)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt_testing.tiny_checkpoint import build_checkpoint, tiny_config  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
PEER = f"transformers {str(DTYPE).removeprefix('torch.').replace('bfloat16', 'bf16')} sdpa"
# Share of the GPU memory left after weights and peak activations that glmrt's KV cache takes:
# ~22 GiB on an H100, room for 32 x 4k contexts (~9 GB) with the rest free for transformers,
# loaded next in the same process (its 32 x 4k padded batch: ~9 GB of KV plus prefill activations).
KV_SHARE = 0.3
TEXT_IDS = (1000, 50000)  # ordinary text tokens of GLM-OCR's vocabulary (its special tokens are >= 59246)


@dataclass(frozen=True)
class Sizes:
    contexts: tuple[int, ...]  # batch-1 decode contexts
    batch: int  # rows of the steady-state decode; also max_num_seqs and the throughput run's concurrency
    batch_contexts: tuple[int, ...]
    decode_steps: int  # timed decode steps per case
    page: tuple[int, int]  # width, height
    crop: tuple[int, int]
    crops: int  # throughput run (without --key)
    crop_tokens: int


GPU_SIZES = Sizes((1024, 5120), 32, (1024, 4096), 64, (1700, 2200), (300, 100), 64, 256)
KEY_SIZES = dataclasses.replace(GPU_SIZES, decode_steps=32)
SMOKE_SIZES = Sizes((64, 160), 4, (64, 128), 8, (200, 260), (300, 100), 6, 8)


def page_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def prompt_ids(context: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(*TEXT_IDS, size=context).tolist()


def decoder_weight_bytes(engine: LLMEngine) -> int:
    text = engine.model.text
    tensors = [text.final_norm, text.lm_head] + [t for layer in text.layers for t in vars(layer).values()]
    # torch backend: unfused rows; GLM-OCR has no q/k/v biases (None)
    flat = [p for t in tensors if t is not None for p in (t if isinstance(t, tuple) else (t,))]
    return sum(t.numel() * t.element_size() for t in flat)


def kv_bytes_per_token(engine: LLMEngine) -> int:
    """Bytes a decode step reads per context token: K and V of every decoder layer, as cached
    (each cache is [blocks, block_size, Hkv, D])."""
    return sum(k[0, 0].numel() * k.element_size() + v[0, 0].numel() * v.element_size()
               for k, v in engine.runner.kv_caches)


class HFSide:
    """transformers' GlmOcrForConditionalGeneration (sdpa) fed exactly glmrt's inputs."""

    def __init__(self, engine: LLMEngine):
        from transformers import GlmOcrForConditionalGeneration

        self.model = GlmOcrForConditionalGeneration.from_pretrained(
            engine.model_path, dtype=DTYPE, attn_implementation="sdpa").to(DEVICE).eval()
        self.processor = engine.processor
        self.pad_id = engine.config.text.eos_token_ids[0]
        self.image_token_id = engine.config.image_token_id

    def token_inputs(self, rows: list[list[int]], pixels: dict | None = None) -> dict:
        """Left-padded batch of token-id rows, as transformers' processor builds it for batched generation."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == self.image_token_id).int(),
                   **(pixels or {}))
        return {k: v.to(DEVICE) for k, v in out.items()}

    def request_inputs(self, requests: list[dict]) -> dict:
        processed = [self.processor(**r) for r in requests]
        with_images = [p for p in processed if p.pixel_values is not None]
        pixels = dict(pixel_values=torch.cat([p.pixel_values for p in with_images]),
                      image_grid_thw=torch.cat([p.image_grid_thw for p in with_images])) if with_images else None
        return self.token_inputs([p.input_ids for p in processed], pixels)

    @torch.inference_mode()
    def generate(self, inputs: dict, new_tokens: int, **kwargs) -> int:
        out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  **kwargs)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]

    def decode_seconds(self, inputs: dict, steps: int) -> float:
        """Seconds from the first generated token to the last of a steps + 1 token generate call:
        generate consults its stopping criteria once per token, so one that drains the device and
        reads the clock marks each token's end."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps = []

        class Clock(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                sync()
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.generate(inputs, steps + 1, stopping_criteria=StoppingCriteriaList([Clock()]))
        assert len(stamps) == steps + 1, f"generate made {len(stamps)} tokens, asked for {steps + 1}"
        return stamps[-1] - stamps[0]


def decode_device_ops(engine: LLMEngine) -> tuple[int, int] | None:
    """Device operations (kernels, memsets, copies) of one batch-1 decode step, i.e. the launches
    a captured step replays, and of one of its decoder layers (two layers' ops minus one's);
    counted with the profiler on eager runs while no row is active (the step then touches no
    request's state). None without a GPU."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    from glmrt.model.text import run_layers

    runner, text = engine.runner, engine.model.text

    def first_layers(n: int):  # the step's inputs, then its first n decoder layers and the final norm
        def run():
            ids, positions, attn = runner.batch.decode_inputs(1)
            run_layers(text.config, text.ops, text.layers[:n], text.final_norm, text.embed_tokens[ids], positions,
                       attn, runner.kv_caches[:n])
        return run

    counts = []
    with torch.inference_mode():
        for run in (lambda: runner.decode_step(1, False), first_layers(1), first_layers(2)):
            run()  # warm-up
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                sync()
            counts.append(sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()))
    step, one, two = counts
    return step, two - one


def replay_decode_step(graphs) -> None:
    """One batch-1 greedy decode step from its captured graphs: the whole step (commits before
    2026-12-07), else its two halves, the forward and the sampling."""
    if ("step", 1, False) in graphs.graphs:
        graphs.replay(("step", 1, False))
    else:
        graphs.replay(("forward", 1))
        graphs.replay(("sample", 1, False))


def trace_decode_replay(engine: LLMEngine, prompt: list[int]) -> dict:
    """Profile of one replay of the captured batch-1 greedy decode step (both its graphs), its row holding
    len(prompt) tokens: device ops (kernels, memsets, copies), their summed time, the replay's
    wall time on the device (first op's start to last op's end; wall - kernel time = the gaps
    between ops) and the 10 op names with the most total time. The row is a request prefilled for
    this and aborted after, since replays advance its device state behind the scheduler's back.
    Needs CUDA graphs."""
    from torch.profiler import ProfilerActivity, profile

    request_id = engine.add_request({"prompt_token_ids": prompt}, glmrt.SamplingParams(max_tokens=8, ignore_eos=True))
    try:
        engine.step()  # its prefill, which admits it to row 0 of the device batch
        with torch.inference_mode():
            for _ in range(2):  # the first session warms the profiler (CUPTI) up; the second is kept
                sync()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    replay_decode_step(engine.runner.graphs)
                    sync()
    finally:
        engine.abort(request_id)
        while engine.has_unfinished():
            engine.step()
    ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not ops:
        raise RuntimeError("the profiler saw no device op in the replay")
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in ops:
        by_name[e.name].append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:10]
    return dict(context=len(prompt), device_ops=len(ops), kernel_us=sum(map(sum, by_name.values())),
                wall_us=max(e.time_range.end for e in ops) - min(e.time_range.start for e in ops),
                top=[dict(name=name, count=len(times), total_us=sum(times)) for name, times in top])


def glmrt_decode_ms(engine: LLMEngine, prompts: list[list[int]], steps: int) -> float:
    """Steady-state ms per decode step of len(prompts) rows: every prompt is prefilled first (the
    steps that run prefill chunks are not timed), then `steps` decode-only steps are timed with
    the device drained at both ends; the requests are aborted after."""
    params = glmrt.SamplingParams(max_tokens=engine.max_model_len, ignore_eos=True)  # never ends by itself
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    scheduler = engine.scheduler
    while scheduler.waiting or scheduler.prefilling:
        engine.step()
    engine.step()  # the first decode-only step (it reads the last prefill's tokens)
    preemptions = scheduler.num_preemptions
    elapsed, _ = timed(lambda: [engine.step() for _ in range(steps)])
    assert len(scheduler.running) == len(prompts) and scheduler.num_preemptions == preemptions, \
        "a timed decode step did not run every row"
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()
    return elapsed / steps * 1e3


def hf_decode_ms(hf: HFSide, prompts: list[list[int]], steps: int) -> float:
    """transformers' decode ms/step: one generate call of steps + 1 tokens, timed from the first
    token (the prefill's) to the last, the device drained at each; the best of two runs (the
    first also warms up the allocations of this batch's shapes). Timed within one call, so the
    steps' time cannot be lost in the noise of two calls' difference."""
    inputs = hf.token_inputs(prompts)
    return min(hf.decode_seconds(inputs, steps) for _ in range(2)) / steps * 1e3


def ttft_ms(engine: LLMEngine, hf: HFSide, image: Image.Image) -> tuple[float, float]:
    """(glmrt, transformers) ms to the first token of one image, each after a warm-up run of the
    same request (glmrt compiles its vision-size kernels, transformers initializes its libraries)."""
    request = {"images": [image], "prompt": "Text Recognition:"}

    def ours() -> None:
        engine.add_request(request, glmrt.SamplingParams(max_tokens=1))
        while engine.has_unfinished():
            engine.step()

    def theirs() -> None:
        hf.generate(hf.request_inputs([request]), 1)

    times = []
    for run in (ours, theirs):
        run()
        times.append(timed(run)[0] * 1e3)
    return times[0], times[1]


def invariance(path, sizes: Sizes, out_dir: Path, smoke: bool) -> int:
    """(f): decode ms/step of each kernel set on its own engine (built, measured, released in turn)."""
    batches = sorted({1, min(8, sizes.batch), sizes.batch})
    ms = {}
    for invariant in (True, False):
        engine = LLMEngine(str(path), device=DEVICE, dtype=DTYPE, max_num_seqs=sizes.batch,
                           gpu_memory_utilization=KV_SHARE, batch_invariant=invariant)
        for batch in batches:
            for context in sizes.contexts:
                prompts = [prompt_ids(context, seed=context + i) for i in range(batch)]
                ms[invariant, batch, context] = glmrt_decode_ms(engine, prompts, sizes.decode_steps)
        del engine
        if CUDA:
            torch.cuda.empty_cache()
    rows = [dict(metric=f"decode ms/step, batch {b}, context {c}", invariant_ms=ms[True, b, c],
                 tuned_ms=ms[False, b, c], cost_pct=100 * (ms[True, b, c] / ms[False, b, c] - 1))
            for b in batches for c in sizes.contexts]
    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=smoke, decode_steps=sizes.decode_steps)
    lines = [f"# glmrt batch-invariant vs batch-tuned kernels on {meta['device']['name']}", "", provenance(meta), "",
             "| case | batch-invariant ms | batch-tuned ms | cost |", "|---|---:|---:|---:|"]
    lines += [f"| {r['metric']} | {r['invariant_ms']:.3f} | {r['tuned_ms']:.3f} | {r['cost_pct']:+.1f}% |" for r in rows]
    print("\n".join(lines))
    write_report(out_dir, "invariance", meta, dict(rows=rows), lines)
    return 0


def compared_key_row(r: dict) -> dict:
    """A row of the table against transformers as a key number (decode rows with their two floors:
    weights, and weights + KV)."""
    floors = {"weights": r["weights_floor_ms"], "weights + KV": r["floor_ms"]} if "floor_ms" in r else None
    return key_row(r["metric"], r["unit"], r["glmrt"], peer=r["transformers"], peer_name=r["peer_name"], floors=floors)


def memory_key_rows(memory: dict) -> list[dict]:
    free = [] if memory["free_gib"] is None else [key_row(
        "free GPU memory after engine start (weights, KV cache, CUDA graphs allocated), GiB", "GiB",
        memory["free_gib"], better="higher")]
    graphs = [] if memory["graph_gib"] is None else [key_row(
        "CUDA-graph memory (pool, static outputs), which the KV budget leaves room for, GiB", "GiB",
        memory["graph_gib"])]
    return free + graphs + [key_row(
        f"KV cache capacity, tokens (gpu_memory_utilization {memory['gpu_memory_utilization']})", "tokens",
        memory["kv_cache_tokens"], better="higher")]


def trace_key_rows(trace: dict, floor_us: float) -> list[dict]:
    """Device ops, kernel time and wall time of the traced replay; both times against the floor
    of the step (weights + the row's KV)."""
    what = f"decode graph replay, batch 1, context {trace['context']}"
    return [key_row(f"{what}: device ops (kernels, memsets, copies)", "ops", trace["device_ops"])] + [
        key_row(f"{what}: {name}, us", "us", trace[field], floors={"weights + KV": floor_us})
        for name, field in (("kernel time", "kernel_us"), ("wall time on the device", "wall_us"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir or Hub id (default: real config, random weights)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--key", action="store_true", help="only the key numbers (a)-(d), sized for the GPU suite")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint and sizes (CPU-capable)")
    parser.add_argument("--invariance", action="store_true",
                        help="only (f): batch-invariant vs batch-tuned kernels, decode ms/step")
    args = parser.parse_args(argv)
    sizes = SMOKE_SIZES if args.smoke else KEY_SIZES if args.key else GPU_SIZES
    out_dir = output_dir(args.out, args.smoke)
    key = []  # the GPU suite's key numbers, each made (and so streamed to the suite) once measured
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = args.model
        elif args.smoke:
            path = build_checkpoint(Path(tmp) / "ckpt", tiny_config(), dtype=DTYPE)
        else:
            from glmrt_testing.random_weights import write_glm_ocr

            path = write_glm_ocr(Path(tmp) / "ckpt", device=DEVICE, dtype=DTYPE)
        if args.invariance:
            return invariance(path, sizes, out_dir, args.smoke)
        engine = LLMEngine(str(path), device=DEVICE, dtype=DTYPE, max_num_seqs=sizes.batch,
                           gpu_memory_utilization=KV_SHARE)
        longest = max(sizes.contexts + sizes.batch_contexts) + sizes.decode_steps + 2
        assert longest <= engine.max_model_len, f"context {longest} exceeds max_model_len {engine.max_model_len}"
        batch_tokens = sizes.batch * (max(sizes.batch_contexts) + sizes.decode_steps + 32)
        assert batch_tokens <= engine.kv_capacity_tokens, \
            f"the KV cache ({engine.kv_capacity_tokens} tokens) cannot hold the batch ({batch_tokens})"

        kv_token_bytes = kv_bytes_per_token(engine)  # (c)
        graph_bytes = engine.runner.graph_memory_bytes
        memory = dict(kv_cache_tokens=engine.kv_capacity_tokens,
                      kv_cache_gib=engine.kv_capacity_tokens * kv_token_bytes / 2**30,
                      gpu_memory_utilization=KV_SHARE, free_gib=None, total_gib=None,
                      graph_gib=None if graph_bytes is None else graph_bytes / 2**30,
                      runner_gib=None if engine.runner_memory_bytes is None else engine.runner_memory_bytes / 2**30)
        if CUDA:
            free, total = torch.cuda.mem_get_info()
            memory.update(free_gib=free / 2**30, total_gib=total / 2**30)
        key += memory_key_rows(memory)
        bandwidth = copy_bandwidth_gbps()
        weight_bytes = decoder_weight_bytes(engine)

        device_ops, layer_ops = (None if args.key else decode_device_ops(engine)) or (None, None)

        hf = HFSide(engine)
        hf.generate(hf.token_inputs([prompt_ids(16, seed=0)]), 2)  # warm-up: library handles, kernel choices
        rows = []

        def decode_row(metric: str, unit: str, prompts: list[list[int]]) -> dict:
            ours = glmrt_decode_ms(engine, prompts, sizes.decode_steps)
            try:
                theirs = hf_decode_ms(hf, prompts, sizes.decode_steps)
            except torch.OutOfMemoryError as exc:  # glmrt's number stands without its peer
                print(f"warning: transformers ran out of memory on {metric}: {str(exc).splitlines()[0]}")
                theirs = None
                torch.cuda.empty_cache()
            context = len(prompts[0]) + sizes.decode_steps / 2  # the mean context of the timed steps
            weights_ms = floor_ms(weight_bytes, bandwidth)
            weights_kv_ms = floor_ms(weight_bytes + len(prompts) * context * kv_token_bytes, bandwidth)
            peer = PEER if len(prompts) == 1 else f"{PEER}, one generate call of {len(prompts)} left-padded rows"
            return dict(metric=metric, unit=unit, glmrt=ours, transformers=theirs, peer_name=peer,
                        speedup=theirs / ours if theirs else None, floor_ms=weights_kv_ms, pct_of_floor=100 * weights_kv_ms / ours,
                        weights_floor_ms=weights_ms, pct_of_weights_floor=100 * weights_ms / ours)

        for context in sizes.contexts:  # (a)
            rows.append(decode_row(f"decode ms/token, batch 1, context {context}", "ms/token",
                                   [prompt_ids(context, seed=context)]))
            key.append(compared_key_row(rows[-1]))
        for context in sizes.batch_contexts:
            rows.append(decode_row(f"decode ms/step, batch {sizes.batch}, context {context} (steady state, no prefill)",
                                   "ms/step", [prompt_ids(context, seed=context + i) for i in range(sizes.batch)]))
            key.append(compared_key_row(rows[-1]))

        for what, (width, height) in (("page", sizes.page), ("region crop", sizes.crop)):  # (b)
            ours, theirs = ttft_ms(engine, hf, page_image(width, height, seed=width))
            rows.append(dict(metric=f"TTFT ms, one {width}x{height} {what}", unit="ms", glmrt=ours,
                             transformers=theirs, peer_name=PEER, speedup=theirs / ours))
            key.append(compared_key_row(rows[-1]))

        trace, trace_absent = None, "no CUDA graphs"  # (d), last: should profiling fail, it costs only the trace
        if engine.runner.graphs is not None:
            try:
                trace = trace_decode_replay(engine, prompt_ids(sizes.contexts[0], seed=0))
                floor_us = 1e3 * floor_ms(weight_bytes + trace["context"] * kv_token_bytes, bandwidth)
                key += trace_key_rows(trace, floor_us)
                trace_absent = None
            except Exception as exc:
                trace_absent = f"tracing failed: {type(exc).__name__}: {exc}"
                print(f"warning: no decode replay trace ({trace_absent})")

        if not args.key:  # (e), no key number
            rng = np.random.default_rng(1)
            shapes = [(int(rng.integers(200, 1200)), int(rng.integers(60, 600))) for _ in range(sizes.crops)]
            if args.smoke:
                shapes = [(w // 6 + 30, h // 6 + 30) for w, h in shapes]
            crop_requests = [{"images": [page_image(w, h, i)], "prompt": "Text Recognition:"}
                             for i, (w, h) in enumerate(shapes)]
            params = glmrt.SamplingParams(max_tokens=sizes.crop_tokens, ignore_eos=True)
            ours, outs = timed(lambda: engine.generate(crop_requests, [params] * sizes.crops))
            generated = sum(len(o.token_ids) for o in outs)
            theirs, hf_generated = timed(lambda: sum(
                hf.generate(hf.request_inputs(crop_requests[i: i + sizes.batch]), sizes.crop_tokens)
                for i in range(0, sizes.crops, sizes.batch)))
            assert generated == hf_generated == sizes.crops * sizes.crop_tokens
            rows.append(dict(metric=f"throughput tok/s, {sizes.crops} crops x {sizes.crop_tokens} tokens, "
                                    f"concurrency {sizes.batch}", unit="tok/s", glmrt=generated / ours,
                             transformers=hf_generated / theirs, speedup=theirs / ours))

    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=args.smoke, key_only=args.key,
                    backend=engine.backend, cuda_graphs=engine.runner.graphs is not None,
                    copy_bandwidth_gbps=bandwidth, decoder_weight_bytes=weight_bytes,
                    kv_bytes_per_token=kv_token_bytes, hbm_floor_ms_per_token=floor_ms(weight_bytes, bandwidth),
                    decode_device_ops=device_ops, decoder_layer_device_ops=layer_ops,
                    decoder_layers=engine.config.text.num_layers)
    results = dict(rows=rows, memory=memory, trace=trace, trace_absent=trace_absent, key=key)
    lines = [f"# glmrt vs transformers on {meta['device']['name']}", "", provenance(meta),
             f"- {meta['dtype']}, {'key numbers only' if args.key else 'full set'}"]
    lines += SUMMARIZERS["e2e"]({**meta, **results})
    print("\n".join(lines))
    write_report(out_dir, "e2e", meta, results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
