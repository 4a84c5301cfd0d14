"""Random checkpoints of any size, GLM-OCR's (with its MTP layer) and GLM-Image's autoregressive
stage, written straight from a device's RNG in seconds: the GPU suite builds the real-size ones once
and every step loads them (`--model`).

The transformers-based builders (tiny_checkpoint.build_checkpoint, tiny_glm_image.
build_glm_image_checkpoint) instantiate the model on the CPU first, which takes 30-60 s for GLM-OCR
and minutes for GLM-Image's 9B. Here the model of the config is built on the meta device only (no
memory) for its tensor names and shapes, which are those save_pretrained writes (these models rename
no key on save; tests/test_random_weights.py checks it), and for config.json and
generation_config.json. The values are `perturbed_`'s, drawn tensor by tensor in save order from a
generator on `device` seeded with `seed` (the MTP layer's from one seeded with seed + 1), as the
builders draw them: on the CPU in float32 the tensors are exactly the builders'; on a GPU they have
the same distribution, from its RNG. Shards of at most SHARD_BYTES are generated and written one
after the other, so host memory stays bounded by about one shard whatever the model's size. The
caller chooses where: at the real sizes that is 2.65 GB (GLM-OCR) and 20.2 GB (GLM-Image) in bf16,
on a disk with room for them rather than a small tmpfs.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from glmrt.loader import INDEX_FILE, SINGLE_FILE
from glmrt_testing import tiny_checkpoint, tiny_glm_image
from glmrt_testing.tiny_checkpoint import mtp_layer_shapes, perturbed_, write_processor_files
from glmrt_testing.tiny_glm_image import MODEL_DIR, write_pipeline_files

# bf16: GLM-OCR's 2.65 GB stay one file, as in the real checkpoint; GLM-Image's 20.2 GB (9B text
# model, vision model, VQ codebook) take 5 shards of ~4 GB.
SHARD_BYTES = 4 << 30


def write_glm_ocr(path: Path, config=None, *, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A GLM-OCR checkpoint of `config` (None: the real one) in `path`: config, weights with the MTP
    layer, tokenizer, chat template and preprocessor config, as build_checkpoint writes them -> path."""
    from transformers import GlmOcrForConditionalGeneration

    config = tiny_checkpoint.real_config() if config is None else copy.deepcopy(config)
    path.mkdir(parents=True, exist_ok=True)
    model = meta_model(GlmOcrForConditionalGeneration, config, dtype)
    _write_model_config(model, path)
    _write_weights(path, [(saved_shapes(model), seed), (mtp_layer_shapes(config.text_config), seed + 1)],
                   device, dtype)
    write_processor_files(path)
    return path


def write_glm_image(root: Path, config=None, *, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """GLM-Image's autoregressive stage of `config` (None: the real 9B one) in the pipeline layout
    under `root`, as build_glm_image_checkpoint writes it -> root."""
    from transformers import GlmImageForConditionalGeneration

    config = tiny_glm_image.real_config() if config is None else copy.deepcopy(config)
    model_dir = root / MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    model = meta_model(GlmImageForConditionalGeneration, config, dtype)
    _write_model_config(model, model_dir)
    _write_weights(model_dir, [(saved_shapes(model), seed)], device, dtype)
    write_pipeline_files(root)  # after the model's generation config: ours replaces it, as in the builder
    return root


def meta_model(model_class, config, dtype: torch.dtype):
    """`model_class(config)` in `dtype` on the meta device: shapes and configs, no memory."""
    with torch.device("meta"):
        return model_class(config).to(dtype)


def saved_shapes(model) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor save_pretrained writes for `model`, in its order: the state
    dict (no tied weights, no renaming for these models)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _write_model_config(model, model_dir: Path) -> None:
    """config.json and generation_config.json, as save_pretrained writes them."""
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(model_dir)
    model.generation_config.save_pretrained(model_dir)


def _write_weights(model_dir: Path, groups: list[tuple[dict[str, tuple[int, ...]], int]], device: str,
                   dtype: torch.dtype) -> None:
    """Each group's tensors (name -> shape) drawn in order from a generator on `device` seeded with
    the group's seed, in `dtype`: one model.safetensors, or shards and their index beyond SHARD_BYTES."""
    from safetensors.torch import save_file

    generators = [torch.Generator(device).manual_seed(seed) for _, seed in groups]
    draws = [(name, shape, gen) for (shapes, _), gen in zip(groups, generators) for name, shape in shapes.items()]
    shards: list[list] = [[]]
    shard_bytes = total_bytes = 0
    for draw in draws:
        nbytes = math.prod(draw[1]) * dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(draw)
        shard_bytes += nbytes
        total_bytes += nbytes
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for stale in model_dir.glob("model*.safetensors*"):  # a previous write's, whose layout may differ
        stale.unlink()
    for file, shard in zip(files, shards):
        tensors = {name: perturbed_(name, torch.randn(shape, generator=gen, device=device)).to(dtype).cpu()
                   for name, shape, gen in shard}
        save_file(tensors, model_dir / file, metadata={"format": "pt"})
        del tensors  # before the next shard's: host memory holds one shard at a time
    if n > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name, _, _ in shard}
        (model_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_bytes},
                                                        "weight_map": weight_map}, indent=2))
