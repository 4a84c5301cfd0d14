"""glmrt as the autoregressive stage of diffusers' GlmImagePipeline.

GlmImagePipeline makes an image in two stages: `generate_prior_tokens` runs the AR model
(transformers' generate) for the image's token grid, then the diffusion transformer and the VAE
turn the grid into pixels. `use_glmrt` hands the first stage to a glmrt.LLM on one pipeline
instance. Nothing else in the pipeline's __call__ touches `vision_language_encoder` or
`processor`, so load it without them:

    pipe = GlmImagePipeline.from_pretrained("zai-org/GLM-Image", vision_language_encoder=None,
                                            processor=None, torch_dtype=torch.bfloat16).to("cuda")
    use_glmrt(pipe, glmrt.LLM("zai-org/GLM-Image"))
    image = pipe("a red fox in the snow", height=1024, width=1024).images[0]

This module never imports diffusers: glmrt imports without it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .llm import LLM
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from diffusers import GlmImagePipeline


# (prior_token_ids, prior_token_image_ids, source_image_grid_thw): what
# GlmImagePipeline.generate_prior_tokens returns and its __call__ takes.
PriorTokens = tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None]


def prior_tokens(llm: LLM, prompt: str | Sequence[str], height: int, width: int,
                 image: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
                 generator: torch.Generator | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 device: str | torch.device | None = None) -> PriorTokens:
    """GlmImagePipeline.generate_prior_tokens on glmrt -> (prior_token_ids, prior_token_image_ids,
    source_image_grid_thw), int64 on `device` (default CPU), every grid upsampled 2x (nearest) to
    the diffusion transformer's resolution:
    - prior_token_ids [B, 4*th*tw]: each prompt's full (th x tw) grid;
    - prior_token_image_ids: per prompt, its condition images' codes [sum of 4*h*w], or None for
      text-to-image;
    - source_image_grid_thw: per prompt, those images' grids [n_images, 3] as (1, 2h, 2w), or None.

    image: None or [] (text-to-image), one list of condition images per prompt (the pipeline's
    _validate_and_normalize_images form), or for a single prompt its flat list.
    generator: its initial_seed() seeds prompt i with seed + i (mod 2**64), in place of
    sampling_params' seeds (the pipeline seeds torch with it and samples the whole batch from that
    one stream; glmrt draws each request from its own seed).
    sampling_params: one for all prompts, one per prompt, or None (generation_config.json defaults).

    Raises RuntimeError naming the prompt when a generation ends before its grid is full: the
    diffusion transformer cannot decode a partial grid.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    images = _images_per_prompt(image, len(prompts))
    if generator is not None:
        seed = generator.initial_seed()
        if sampling_params is None:
            sampling_params = llm.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = [dataclasses.replace(p, seed=(seed + i) % 2**64) for i, p in enumerate(sampling_params)]
    outputs = llm.generate_image_tokens(prompts, height, width, images=images, sampling_params=sampling_params)
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        if out.image_tokens is None or out.error is not None:
            (th, tw), (ph, pw) = out.target_grid, out.preview_grid or (0, 0)
            why = f"{out.finish_reason}: {out.error}" if out.error else out.finish_reason
            raise RuntimeError(f"prompt {i} ({p!r:.80}): generation ended ({why}) after {len(out.token_ids)} of "
                               f"{ph * pw + th * tw + 1} tokens, before its {th} x {tw} grid was full; "
                               "GlmImagePipeline cannot decode a partial grid")
    device = device or "cpu"
    ids = torch.stack([_upsample(out.image_tokens) for out in outputs]).to(device)
    if images is None:
        return ids, None, None
    codes = [torch.cat([_upsample(c) for c in out.condition_image_tokens]).to(device) for out in outputs]
    grids = [torch.tensor([[1, 2 * h, 2 * w] for h, w in (c.shape for c in out.condition_image_tokens)],
                          dtype=torch.long, device=device) for out in outputs]
    return ids, codes, grids


def use_glmrt(pipe: GlmImagePipeline, llm: LLM,
              sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> GlmImagePipeline:
    """Run `pipe`'s autoregressive stage on `llm`: generate_prior_tokens is replaced on this
    instance only (the class is left alone), so pipe(prompt, height=..., width=..., image=...)
    works unchanged; height and width are required, as the AR stage needs the target size.
    sampling_params: for every call (None: the checkpoint's defaults), seeded from the call's
    generator when one is given. -> pipe."""

    def generate_prior_tokens(prompt, height, width, image=None, device=None, generator=None) -> PriorTokens:
        return prior_tokens(llm, prompt, height, width, image=image, generator=generator,
                            sampling_params=sampling_params, device=device or pipe._execution_device)

    pipe.generate_prior_tokens = generate_prior_tokens
    return pipe


def _images_per_prompt(image: Sequence[Any] | Sequence[Sequence[Any]] | None, n: int) -> list[list[Any]] | None:
    """Condition images as one list per prompt, or None for text-to-image."""
    if image is None or len(image) == 0:
        return None
    if not isinstance(image[0], (list, tuple)):
        if n != 1:
            raise ValueError(f"image: with {n} prompts, pass one list of condition images per prompt")
        return [list(image)]
    if len(image) != n:
        raise ValueError(f"image: {len(image)} lists of condition images for {n} prompts")
    empty = [i for i, imgs in enumerate(image) if len(imgs) == 0]
    if empty:
        raise ValueError(f"image[{empty[0]}] is empty: a batch is all text-to-image or all image-to-image")
    return [list(imgs) for imgs in image]


def _upsample(tokens: torch.Tensor) -> torch.Tensor:
    """[h, w] -> [4*h*w]: every cell repeated 2 x 2 (nearest), row-major; the pipeline's
    _upsample_token_ids without its round trip through float."""
    return tokens.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1).reshape(-1)
