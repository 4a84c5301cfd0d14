"""GLM-Image's autoregressive stage: glmrt vs transformers, side by side in one run on one device.

    python benchmarks/glm_image.py [--out DIR] [--smoke]

A GlmImageForConditionalGeneration with GLM-Image's real config (9B: 40 layers, hidden 4096,
32 q / 2 kv heads, vision vocabulary 16,512) and random bf16 weights is built on the GPU and
written to a temp dir in the Hub's pipeline layout (no weights can be downloaded here; random
weights decode at the same speed as real ones). Both sides get the same text-to-image prompt for
a 1024x1024 image and generate greedily a fixed number of tokens (ignore_eos / min_new_tokens).

- decode tokens/s at batch 1 and batch 16 (after the prefill), glmrt (CUDA graphs) and
  transformers (sdpa), and the speed-up;
- % of the HBM floor at batch 1: the decoder's weight bytes (every layer + final norm + lm_head,
  read once per step; ~18 GB) / measured copy bandwidth, over glmrt's time per token;
- seconds for a whole 1024x1024 image's tokens (1,281) with glmrt at batch 1.

Writes <out>/glm_image-<device>-<timestamp>.json and .md. `--smoke` runs the tiny test
checkpoint on CPU with small sizes to prove the code path (numbers meaningless).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import copy_bandwidth_gbps, metadata, output_dir, provenance, timed, write_report  # noqa: E402
from e2e import decoder_weight_bytes  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt_testing.tiny_glm_image import build_glm_image_checkpoint, real_config, save_glm_image_checkpoint  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
PROMPT = "A watercolor lighthouse on a cliff at dawn, seagulls, soft light"


def real_checkpoint(root: Path):
    """The real-size model, random bf16 weights, built on the device -> (root, the model)."""
    from transformers import GlmImageForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GlmImageForConditionalGeneration(real_config()).to(DTYPE).eval()
    return save_glm_image_checkpoint(root, model), model


def glmrt_decode(engine: LLMEngine, batch: int, tokens: int, size: int) -> tuple[float, int]:
    """batch copies of the prompt, `tokens` each -> (decode seconds after the prefill step, tokens)."""
    params = glmrt.SamplingParams(temperature=0.0, ignore_eos=True)
    seqs = engine.prepare_many([glmrt.ImageRequest(PROMPT, size, size)] * batch, [params] * batch)
    for seq in seqs:
        seq.sampling_params = dataclasses.replace(seq.sampling_params, max_tokens=tokens)
        engine.enqueue(seq)
    engine.step()  # the prefill of all of them (and their first tokens)
    elapsed, _ = timed(lambda: [engine.step() for _ in iter(engine.has_unfinished, False)])
    return elapsed, batch * (tokens - 1)


def hf_inputs(processor, batch: int, size: int) -> dict:
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=[text] * batch, target_h=size, target_w=size, return_tensors="pt")
    return {k: v.to(DEVICE) for k, v in inputs.items()}


@torch.inference_mode()
def hf_decode(model, processor, batch: int, tokens: int, size: int) -> tuple[float, int]:
    """transformers' generate: time for `tokens` minus time for 1 -> (decode seconds, tokens)."""
    inputs = hf_inputs(processor, batch, size)

    def run(n: int):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    first, _ = timed(lambda: run(1))
    total, out = timed(lambda: run(tokens))
    assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
    return total - first, batch * (tokens - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint and sizes (CPU-capable)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    size, tokens, batches = (64, 6, [1, 3]) if smoke else (1024, 256, [1, 16])
    out_dir = output_dir(args.out, smoke)
    with tempfile.TemporaryDirectory() as tmp:
        if smoke:
            from transformers import GlmImageForConditionalGeneration

            root = build_glm_image_checkpoint(Path(tmp) / "ckpt")
            hf_model = GlmImageForConditionalGeneration.from_pretrained(root / "vision_language_encoder").eval()
        else:
            root, hf_model = real_checkpoint(Path(tmp) / "ckpt")
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(root / "processor")
        # glmrt's KV cache takes half of what is free beside transformers' copy of the weights.
        engine = LLMEngine(str(root), device=DEVICE, dtype=DTYPE, max_num_seqs=max(batches),
                           gpu_memory_utilization=0.5)
        bandwidth = copy_bandwidth_gbps()
        weight_bytes = decoder_weight_bytes(engine)
        floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
        glmrt_decode(engine, 1, 4, size)  # warm-up
        rows = []
        for batch in batches:
            ours_s, ours_n = glmrt_decode(engine, batch, tokens, size)
            theirs_s, theirs_n = hf_decode(hf_model, processor, batch, tokens, size)
            row = dict(batch=batch, tokens=tokens, glmrt_tokens_per_s=ours_n / ours_s,
                       transformers_tokens_per_s=theirs_n / theirs_s, speedup=(ours_n / ours_s) / (theirs_n / theirs_s))
            if batch == 1:
                row["pct_of_floor"] = 100 * floor_ms / (ours_s / ours_n * 1e3)
            rows.append(row)
        image_tokens = glmrt.glm_image.generation_length(glmrt.glm_image.target_grids(size, size, True))
        image_s, _ = timed(lambda: glmrt_decode(engine, 1, image_tokens, size))

    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=smoke, backend=engine.backend,
                    cuda_graphs=engine.runner.graphs is not None, copy_bandwidth_gbps=bandwidth,
                    decoder_weight_bytes=weight_bytes, hbm_floor_ms_per_token=floor_ms, image_size=size)
    lines = [f"# GLM-Image AR stage: glmrt vs transformers on {meta['device']['name']}", "", provenance(meta),
             f"- {meta['dtype']}, backend {engine.backend}, CUDA graphs {meta['cuda_graphs']}",
             f"- copy bandwidth {bandwidth:.0f} GB/s; decoder weights {weight_bytes / 1e9:.3f} GB; "
             f"HBM floor {floor_ms:.3f} ms/token ({1e3 / floor_ms:.0f} tokens/s at batch 1)",
             f"- a whole {size}x{size} image ({image_tokens} tokens), glmrt batch 1: {image_s:.2f} s", "",
             "| batch | tokens | glmrt tok/s | transformers tok/s | speed-up | % of floor |", "|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{r['pct_of_floor']:.0f}%" if "pct_of_floor" in r else "-"
        lines.append(f"| {r['batch']} | {r['tokens']} | {r['glmrt_tokens_per_s']:.4g} | "
                     f"{r['transformers_tokens_per_s']:.4g} | {r['speedup']:.2f}x | {pct} |")
    print("\n".join(lines))
    write_report(out_dir, "glm_image", meta, dict(rows=rows, image_seconds=image_s, image_tokens=image_tokens), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
