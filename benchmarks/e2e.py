"""glmrt vs transformers, end to end, side by side in one run on one device.

    python benchmarks/e2e.py [--model DIR] [--out DIR] [--smoke]

Without --model, a checkpoint with GLM-OCR's real config and random bf16 weights is written to a
temp dir (no weights can be downloaded here); random weights decode at the same speed as real ones.
Both sides get the same token ids / images; generation is forced to a fixed length (ignore_eos /
min_new_tokens) so both produce exactly the same number of tokens.

(a) batch-1 decode ms/token at context 1k and 5k, and % of the HBM floor: the decoder's weight
    bytes (every text layer + final norm + lm_head, read once per token; the embedding row is
    negligible) / measured copy bandwidth.
(b) time to first token for one 1700x2200 page (preprocessing + vision + prefill + first sample).
(c) throughput (generated tokens/s) for 64 document crops of mixed sizes, 256 new tokens each, at
    concurrency 32: glmrt with max_num_seqs=32; transformers in padded batches of 32.
Writes <out>/e2e-<device>-<timestamp>.json and .md. `--smoke` runs the tiny test checkpoint on
CPU with small sizes to prove every code path (numbers meaningless).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import copy_bandwidth_gbps, metadata, output_dir, provenance, sync, timed, write_report  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt_testing.tiny_checkpoint import build_checkpoint, real_config, tiny_config  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def page_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def decoder_weight_bytes(engine: LLMEngine) -> int:
    text = engine.model.text
    tensors = [text.final_norm, text.lm_head] + [t for layer in text.layers for t in vars(layer).values()]
    # torch backend: unfused rows; GLM-OCR has no q/k/v biases (None)
    flat = [p for t in tensors if t is not None for p in (t if isinstance(t, tuple) else (t,))]
    return sum(t.numel() * t.element_size() for t in flat)


class HFSide:
    """transformers' GlmOcrForConditionalGeneration (bf16, sdpa) fed exactly glmrt's inputs."""

    def __init__(self, path: Path):
        from transformers import GlmOcrForConditionalGeneration

        self.model = GlmOcrForConditionalGeneration.from_pretrained(
            path, dtype=DTYPE, attn_implementation="sdpa").to(DEVICE).eval()
        self.processor = glmrt.Processor.from_pretrained(path)

    def inputs(self, requests: list[dict]) -> dict:
        """Left-padded batch, as transformers' processor builds it for batched generation."""
        processed = [self.processor(**r) for r in requests]
        width = max(len(p.input_ids) for p in processed)
        ids = torch.full((len(processed), width), 59246, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(processed):
            ids[row, width - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[row, width - len(p.input_ids):] = 1
        out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == 59280).int())
        pixels = [p.pixel_values for p in processed if p.pixel_values is not None]
        if pixels:
            out.update(pixel_values=torch.cat(pixels),
                       image_grid_thw=torch.cat([p.image_grid_thw for p in processed if p.image_grid_thw is not None]))
        return {k: v.to(DEVICE) for k, v in out.items()}

    @torch.inference_mode()
    def generate(self, requests: list[dict], new_tokens: int) -> int:
        inputs = self.inputs(requests)
        out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]


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


def glmrt_decode_ms(engine: LLMEngine, prompt: str, steps: int) -> float:
    engine.add_request({"prompt": prompt}, glmrt.SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    engine.step()  # prefill + first token
    elapsed, _ = timed(lambda: [engine.step() for _ in range(steps)])
    while engine.has_unfinished():
        engine.step()
    return elapsed / steps * 1e3


def hf_decode_ms(hf: HFSide, prompt: str, steps: int) -> float:
    t1, _ = timed(lambda: hf.generate([{"prompt": prompt}], 1))
    tn, _ = timed(lambda: hf.generate([{"prompt": prompt}], steps + 1))
    return (tn - t1) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: real config, random weights)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint and sizes (CPU-capable)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    if smoke:
        contexts, decode_steps, page, crops, crop_tokens, concurrency = [64, 160], 4, (200, 260), 6, 8, 3
    else:
        contexts, decode_steps, page, crops, crop_tokens, concurrency = [1024, 5120], 64, (1700, 2200), 64, 256, 32
    out_dir = output_dir(args.out, smoke)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_checkpoint(Path(tmp) / "ckpt", tiny_config() if smoke else real_config(),
                                              dtype=DTYPE)
        # half the free GPU memory for glmrt's KV cache (far more than these requests need), so
        # that transformers, loaded next on the same GPU, has room for its batch of 32 crops
        engine = LLMEngine(str(path), device=DEVICE, dtype=DTYPE, max_num_seqs=concurrency,
                           gpu_memory_utilization=0.5)
        hf = HFSide(path)
        bandwidth = copy_bandwidth_gbps()
        floor_ms = decoder_weight_bytes(engine) / (bandwidth * 1e9) * 1e3
        device_ops, layer_ops = decode_device_ops(engine) or (None, None)
        layers = engine.config.text.num_layers
        if device_ops is not None:
            print(f"decode step, batch 1: {device_ops} device ops, {layer_ops} per decoder layer")
        rows = []

        for context in contexts:  # (a)
            prompt = "x" * (context - 16)  # one byte-level token per character; ~16 template tokens
            ours = glmrt_decode_ms(engine, prompt, decode_steps)
            theirs = hf_decode_ms(hf, prompt, decode_steps)
            rows.append(dict(metric=f"decode ms/token, batch 1, context {context}", glmrt=ours, transformers=theirs,
                             speedup=theirs / ours, pct_of_floor=100 * floor_ms / ours))

        image = page_image(*page, seed=0)  # (b)
        request = {"images": [image], "prompt": "Text Recognition:"}

        def glmrt_ttft() -> None:
            engine.add_request(request, glmrt.SamplingParams(max_tokens=1))
            while engine.has_unfinished():
                engine.step()

        glmrt_ttft()  # warm-up: compiles the vision-size kernels
        ours, _ = timed(glmrt_ttft)
        theirs, _ = timed(lambda: hf.generate([request], 1))
        rows.append(dict(metric=f"TTFT ms, one {page[0]}x{page[1]} page", glmrt=ours * 1e3,
                         transformers=theirs * 1e3, speedup=theirs / ours))

        rng = np.random.default_rng(1)  # (c)
        sizes = [(int(rng.integers(200, 1200)), int(rng.integers(60, 600))) for _ in range(crops)]
        if smoke:
            sizes = [(w // 6 + 30, h // 6 + 30) for w, h in sizes]
        crop_requests = [{"images": [page_image(w, h, i)], "prompt": "Text Recognition:"} for i, (w, h) in enumerate(sizes)]
        params = glmrt.SamplingParams(max_tokens=crop_tokens, ignore_eos=True)
        ours, outs = timed(lambda: engine.generate(crop_requests, [params] * crops))
        generated = sum(len(o.token_ids) for o in outs)
        theirs, hf_generated = timed(lambda: sum(
            hf.generate(crop_requests[i: i + concurrency], crop_tokens) for i in range(0, crops, concurrency)))
        assert generated == hf_generated == crops * crop_tokens
        rows.append(dict(metric=f"throughput tok/s, {crops} crops x {crop_tokens} tokens, concurrency {concurrency}",
                         glmrt=generated / ours, transformers=hf_generated / theirs, speedup=theirs / ours))

    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=smoke, backend=engine.backend,
                    cuda_graphs=engine.runner.graphs is not None, copy_bandwidth_gbps=bandwidth,
                    decoder_weight_bytes=decoder_weight_bytes(engine), hbm_floor_ms_per_token=floor_ms,
                    decode_device_ops=device_ops, decoder_layer_device_ops=layer_ops, decoder_layers=layers)
    lines = [f"# glmrt vs transformers on {meta['device']['name']}", "", provenance(meta),
             f"- {meta['dtype']}, backend {engine.backend}, CUDA graphs {meta['cuda_graphs']}",
             f"- copy bandwidth {bandwidth:.0f} GB/s; decoder weights {meta['decoder_weight_bytes'] / 1e9:.3f} GB; "
             f"HBM floor {floor_ms:.3f} ms/token",
             f"- device ops per batch-1 decode step: {device_ops} ({layer_ops} per decoder layer, "
             f"{layers} layers; target <= 7 per layer)", "",
             "| metric | glmrt | transformers | speed-up | % of floor |", "|---|---|---|---|---|"]
    for r in rows:
        pct = f"{r['pct_of_floor']:.0f}%" if "pct_of_floor" in r else "-"
        lines.append(f"| {r['metric']} | {r['glmrt']:.4g} | {r['transformers']:.4g} | {r['speedup']:.1f}x | {pct} |")
    print("\n".join(lines))
    write_report(out_dir, "e2e", meta, dict(rows=rows), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
