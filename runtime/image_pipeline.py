"""glmrt.ImagePipeline: GLM-Image in one process, prompt in, picture out (needs glmrt[image]).

The autoregressive stage (the image's token grid: 1,281 tokens for 1024 x 1024, most of the time)
runs on glmrt, the diffusion stage (glyph text encoder, diffusion transformer, VAE) on diffusers,
both from the same checkpoint:

    pipe = glmrt.ImagePipeline("zai-org/GLM-Image")
    pipe("a red fox in the snow", seed=0).save("fox.png")
    pipe("make it night", image="fox.png", seed=0).save("night.png")  # image-to-image

With greedy AR sampling and the same seed, the picture is pixel-identical to diffusers' own
GlmImagePipeline's (transformers' AR stage, seeded with torch.Generator().manual_seed(seed) on the
pipeline's device).
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch
from PIL import Image

from .diffusers_stage import SEED_LIMIT, DiffusionStage, _images_per_prompt, prior_tokens
from .glm_image import check_image_size
from .llm import LLM
from .sampling_params import SamplingParams


class ImagePipeline:
    """GLM-Image's whole pipeline: `llm` (glmrt.LLM on the checkpoint) for the AR stage and
    `diffusion` (DiffusionStage) for the pictures. model: the pipeline's directory or Hub id.
    device / dtype as glmrt.LLM's, for both stages; engine_options go to the LLM (backend,
    max_num_seqs, ...)."""

    def __init__(self, model: str, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, **engine_options: Any):
        # The diffusion stage first: without diffusers, fail before loading the AR model.
        self.diffusion = DiffusionStage.from_pretrained(model, device=device, dtype=dtype)
        self.llm = LLM(model, device=device, dtype=dtype, **engine_options)

    def __call__(self, prompt: str | Sequence[str], *, height: int = 1024, width: int = 1024,
                 image: Any | Sequence[Any] | Sequence[Sequence[Any]] | None = None, seed: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: bool = True) -> Image.Image | list[Image.Image]:
        """The picture of a prompt (a str gives one image), or of each prompt of a list (a list of
        images; the prompts go through the AR stage together, then the diffusion stage as one batch).

        height, width: pixels, multiples of 32 up to 2048. image: condition images
        (image-to-image; PIL images, paths, bytes or data URIs): for a str prompt one image or a
        list, for a list of prompts one list per prompt; none: text-to-image. seed: for the AR
        stage (prompt i sampled with seed + i) and the diffusion noise; None: unseeded.
        num_inference_steps, guidance_scale: the diffusion stage's (None: diffusers' defaults,
        50 and 1.5). sampling_params: the AR stage's (None: the checkpoint's
        generation_config.json). progress: tqdm bars (stderr) over the AR tokens and the
        diffusion steps.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: give at least one")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} must be a non-empty string, got {p!r:.80}")
        check_image_size(height, width)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or not 0 <= seed < SEED_LIMIT):
            raise ValueError(f"seed must be an int from 0 to 2**64 - 1, got {seed!r}")
        if isinstance(prompt, str) and image is not None and not isinstance(image, (list, tuple)):
            image = [image]  # one condition image
        images = _images_per_prompt(image, len(prompts))
        if images is not None:
            name = (lambda i, j: f"image {i}.{j}") if len(prompts) > 1 else (lambda i, j: f"image {j}")
            images = [[self.diffusion.condition(x, self.llm.processor, name(i, j)) for j, x in enumerate(imgs)]
                      for i, imgs in enumerate(images)]
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        prior = prior_tokens(self.llm, prompts, height, width, image=images, generator=generator,
                             sampling_params=sampling_params, device=self.diffusion.device, use_tqdm=progress)
        pictures = self.diffusion.render(prompts, prior, height=height, width=width, images=images, seed=seed,
                                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                         progress=progress)
        return pictures[0] if isinstance(prompt, str) else pictures
