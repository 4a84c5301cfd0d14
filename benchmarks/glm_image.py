"""GLM-Image's autoregressive stage: glmrt vs transformers, side by side in one run on one device.

    python benchmarks/glm_image.py [--model ROOT_OR_HUB_ID] [--key] [--out DIR] [--smoke]

--model is GLM-Image in the Hub's pipeline layout: a local root (model_index.json,
vision_language_encoder/, processor/) or a Hub id such as zai-org/GLM-Image. Without it, a
GlmImageForConditionalGeneration with GLM-Image's real config (9B: 40 layers, hidden 4096, 32 q /
2 kv heads, vision vocabulary 16,512) and random bf16 weights is written to a temp dir on the GPU
(random weights decode at the same speed as real ones); with --smoke, the tiny test config on the
CPU. Both sides load it (glmrt first, then transformers: 2 x ~18 GB fit an 80 GB GPU together),
get the same text-to-image prompt for a 1024x1024 image and generate greedily a fixed number of
tokens (ignore_eos / min_new_tokens):

- decode tokens/s at batch 1 and batch 16 (after the prefill), glmrt (CUDA graphs) and
  transformers (its default attention: sdpa), and the speed-up;
- % of the floor: batch 1, the decoder's weight bytes (every layer + final norm + lm_head, read
  once per step; ~18 GB) / measured copy bandwidth; batch 16, those weights + the KV cache the
  step reads (16 rows at their mean context);
- seconds for a whole 1024x1024 image's tokens (1,281) with glmrt at batch 1: measured, or with
  --key extrapolated from the prefill and the measured decode ms/token.

When --model is a whole pipeline (a Hub id, or a root whose model_index.json lists the diffusion
transformer, VAE and glyph encoder; the random real-size checkpoint has the AR stage only), also
pictures end to end: seconds per size x size picture at batch 1 and 16 (AR stage + diffusion +
VAE, --steps diffusion steps), glmrt.ImagePipeline against diffusers' GlmImagePipeline with its own
AR stage on transformers (the same diffusion modules, greedy AR on both, the same seed), and the
AR stage's share of glmrt's time.

--key (the GPU suite's key numbers): 64 tokens per request, the whole image extrapolated, pictures
at batch 1 only; without it 256 tokens and the whole image generated. Writes <out>/glm_image-<device>-<timestamp>.json and
.md. `--smoke` runs on CPU with small sizes to prove the code path (numbers meaningless).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import (CUDA, copy_bandwidth_gbps, floor_ms, key_row, metadata, output_dir, provenance, timed,  # noqa: E402
                    write_report)
from e2e import decoder_weight_bytes  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt.engine.runner import kv_bytes_per_token  # noqa: E402
from glmrt.loader import model_dirs, resolve_model_path  # noqa: E402
from glmrt_testing.random_weights import write_glm_image  # noqa: E402
from glmrt_testing.tiny_glm_image import tiny_config  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
PROMPT = "A watercolor lighthouse on a cliff at dawn, seagulls, soft light"
# A request holds its prompt and every token of its image: 1,281 for 1024x1024 plus a short prompt.
MAX_MODEL_LEN = 2048


@dataclasses.dataclass
class Decoded:
    prefill_s: float  # the first step: the prefill and the first token of every row
    decode_s: float  # the steps after it
    tokens: int  # decode tokens of all rows in decode_s
    prompt_tokens: int


def glmrt_decode(engine: LLMEngine, batch: int, tokens: int, size: int) -> Decoded:
    """batch copies of the prompt, `tokens` each."""
    params = glmrt.SamplingParams(temperature=0.0, ignore_eos=True)
    seqs = engine.prepare_many([glmrt.ImageRequest(PROMPT, size, size)] * batch, [params] * batch)
    for seq in seqs:
        seq.sampling_params = dataclasses.replace(seq.sampling_params, max_tokens=tokens)
        engine.enqueue(seq)
    prefill_s, _ = timed(engine.step)
    decode_s, _ = timed(lambda: [engine.step() for _ in iter(engine.has_unfinished, False)])
    return Decoded(prefill_s, decode_s, batch * (tokens - 1), seqs[0].num_prompt_tokens)


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


def whole_pipeline(model: str, root: Path) -> bool:
    """Whether `model` has the diffusion side too: a Hub id (ImagePipeline fetches it), or a root
    whose model_index.json lists a diffusion transformer."""
    if not Path(model).exists():
        return True
    index = Path(root) / "model_index.json"
    return index.exists() and bool(json.loads(index.read_text()).get("transformer"))


def picture_seconds(model: str, hf_model, processor, batches: list[int], size: int, steps: int) -> list[dict]:
    """End to end, per batch: glmrt.ImagePipeline's AR stage (glmrt) then its diffusion stage, and
    diffusers' GlmImagePipeline with transformers' AR stage (`hf_model`) over the same diffusion
    modules; greedy AR on both (the pipeline samples: top-1 sampling is argmax), seed 0, after a
    batch-1 warm-up of each. -> rows with seconds per picture and the AR stage's share."""
    import diffusers

    from glmrt.diffusers_stage import prior_tokens

    pipe = glmrt.ImagePipeline(model, device=DEVICE, dtype=DTYPE, max_num_seqs=max(batches),
                               max_model_len=MAX_MODEL_LEN, kv_cache_tokens=max(batches) * MAX_MODEL_LEN)
    hf_model.generation_config.top_k = 1
    reference = diffusers.GlmImagePipeline(**{**pipe.diffusion.pipe.components,
                                              "vision_language_encoder": hf_model, "processor": processor})
    reference.set_progress_bar_config(disable=True)
    greedy = glmrt.SamplingParams(temperature=0.0)

    def ours(prompts: list[str]) -> tuple[float, float]:
        ar_s, prior = timed(lambda: prior_tokens(pipe.llm, prompts, size, size, generator=torch.Generator().manual_seed(0),
                                                 sampling_params=greedy, device=pipe.diffusion.device))
        diffusion_s, _ = timed(lambda: pipe.diffusion.render(prompts, prior, height=size, width=size, seed=0,
                                                             num_inference_steps=steps))
        return ar_s, diffusion_s

    def theirs(prompts: list[str]) -> float:
        generator = torch.Generator(reference._execution_device).manual_seed(0)
        return timed(lambda: reference(prompts, height=size, width=size, num_inference_steps=steps,
                                       generator=generator))[0]

    ours([PROMPT]), theirs([PROMPT])  # warm-up
    rows = []
    for batch in batches:
        ar_s, diffusion_s = ours([PROMPT] * batch)
        peer_s = theirs([PROMPT] * batch)
        total = ar_s + diffusion_s
        rows.append(dict(batch=batch, steps=steps, glmrt_s_per_picture=total / batch, ar_share=ar_s / total,
                         diffusers_s_per_picture=peer_s / batch, speedup=peer_s / total))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GLM-Image pipeline root or Hub id (default: real config, random weights)")
    parser.add_argument("--key", action="store_true", help="only the GPU suite's key numbers (see above)")
    parser.add_argument("--steps", type=int, help="diffusion steps of the pictures (default 50, 2 with --smoke)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="small sizes, CPU-capable (tiny checkpoint without --model)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (2 if smoke else 50)
    size, tokens, batches = (64, 6, [1, 3]) if smoke else (1024, 64 if args.key else 256, [1, 16])
    out_dir = output_dir(args.out, smoke)
    if smoke and not CUDA:
        torch.set_num_threads(1)  # tiny tensors: more threads only add overhead
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            root = resolve_model_path(args.model)
        else:
            root = write_glm_image(Path(tmp) / "ckpt", tiny_config() if smoke else None, device=DEVICE, dtype=DTYPE)
        model_dir, processor_dir = model_dirs(root)
        engine = LLMEngine(str(root), device=DEVICE, dtype=DTYPE, max_num_seqs=max(batches),
                           max_model_len=MAX_MODEL_LEN, kv_cache_tokens=max(batches) * MAX_MODEL_LEN)
        from transformers import AutoProcessor, GlmImageForConditionalGeneration

        hf_model = GlmImageForConditionalGeneration.from_pretrained(model_dir, dtype=DTYPE).to(DEVICE).eval()
        peer = f"transformers {str(DTYPE).removeprefix('torch.')} {hf_model.config._attn_implementation}"
        processor = AutoProcessor.from_pretrained(processor_dir)
        bandwidth = copy_bandwidth_gbps()
        weight_bytes, kv_token_bytes = decoder_weight_bytes(engine), kv_bytes_per_token(engine.model)
        glmrt_decode(engine, 1, 4, size)  # warm-up
        rows, key = [], []
        for batch in batches:
            ours = glmrt_decode(engine, batch, tokens, size)
            theirs_s, theirs_n = hf_decode(hf_model, processor, batch, tokens, size)
            # what a step reads: the weights, and each row's KV at its mean context over the steps
            kv_bytes = batch * (ours.prompt_tokens + tokens / 2) * kv_token_bytes
            floor_bytes = weight_bytes + (kv_bytes if batch > 1 else 0)
            floor_tps = batch / floor_ms(floor_bytes, bandwidth) * 1e3
            row = dict(batch=batch, tokens=tokens, prompt_tokens=ours.prompt_tokens, prefill_s=ours.prefill_s,
                       glmrt_tokens_per_s=ours.tokens / ours.decode_s, transformers_tokens_per_s=theirs_n / theirs_s,
                       floor_tokens_per_s=floor_tps, floor_basis="weights + KV" if batch > 1 else "weights")
            row.update(speedup=row["glmrt_tokens_per_s"] / row["transformers_tokens_per_s"],
                       pct_of_floor=100 * row["glmrt_tokens_per_s"] / floor_tps)
            rows.append(row)
            key.append(key_row(f"GLM-Image AR decode tokens/s, batch {batch}, {size}x{size} image", "tokens/s",
                               row["glmrt_tokens_per_s"], better="higher", peer=row["transformers_tokens_per_s"],
                               peer_name=peer, floors={row["floor_basis"]: floor_tps}))
        image_tokens = glmrt.glm_image.generation_length(glmrt.glm_image.target_grids(size, size, True))
        if args.key:  # the prefill, then every other token at the measured batch-1 rate
            image_s = rows[0]["prefill_s"] + (image_tokens - 1) / rows[0]["glmrt_tokens_per_s"]
        else:
            image_s, _ = timed(lambda: glmrt_decode(engine, 1, image_tokens, size))
        backend, cuda_graphs = engine.backend, engine.runner.graphs is not None
        pictures = []
        if args.model and whole_pipeline(args.model, root):
            del engine  # its memory goes to the ImagePipeline's engine
            if CUDA:
                torch.cuda.empty_cache()
            picture_batches = batches[:1] if args.key else batches
            pictures = picture_seconds(args.model, hf_model, processor, picture_batches, size, args.steps)
            key += [key_row(f"GLM-Image picture end to end s/picture, batch {r['batch']}, {size}x{size}, {r['steps']} "
                            "diffusion steps", "s", r["glmrt_s_per_picture"], peer=r["diffusers_s_per_picture"],
                            peer_name=f"diffusers GlmImagePipeline, AR stage on {peer}") for r in pictures]

    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=smoke, key_only=args.key, model=args.model,
                    backend=backend, cuda_graphs=cuda_graphs, copy_bandwidth_gbps=bandwidth,
                    decoder_weight_bytes=weight_bytes, kv_bytes_per_token=kv_token_bytes,
                    hbm_floor_ms_per_token=floor_ms(weight_bytes, bandwidth), image_size=size)
    how = "extrapolated from the prefill and the decode ms/token" if args.key else "measured"
    lines = [f"# GLM-Image AR stage: glmrt vs transformers on {meta['device']['name']}", "", provenance(meta),
             f"- {meta['dtype']}, backend {backend}, CUDA graphs {cuda_graphs}, "
             f"checkpoint {args.model or 'random weights (real config)'}",
             f"- copy bandwidth {bandwidth:.0f} GB/s; decoder weights {weight_bytes / 1e9:.3f} GB "
             f"(floor {meta['hbm_floor_ms_per_token']:.3f} ms/step); KV cache {kv_token_bytes / 1024:.3g} KiB/token",
             f"- a whole {size}x{size} image ({image_tokens} tokens), glmrt batch 1: {image_s:.2f} s ({how})", "",
             "| batch | tokens | glmrt tok/s | transformers tok/s | speed-up | floor tok/s | % of floor |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['tokens']} | {r['glmrt_tokens_per_s']:.4g} | {r['transformers_tokens_per_s']:.4g} | "
              f"{r['speedup']:.2f}x | {r['floor_tokens_per_s']:.4g} ({r['floor_basis']}) | {r['pct_of_floor']:.0f}% |"
              for r in rows]
    if pictures:
        lines += ["", "| pictures | steps | glmrt s/picture | of which AR stage | diffusers s/picture | speed-up |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| batch {r['batch']} | {r['steps']} | {r['glmrt_s_per_picture']:.3g} | {r['ar_share'] * 100:.0f}% | "
                  f"{r['diffusers_s_per_picture']:.3g} | {r['speedup']:.2f}x |" for r in pictures]
    print("\n".join(lines))
    write_report(out_dir, "glm_image", meta, dict(rows=rows, key=key, image_seconds=image_s, image_seconds_how=how,
                                                  image_tokens=image_tokens, pictures=pictures), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
