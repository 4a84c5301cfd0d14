"""glmrt as the autoregressive stage of diffusers' GlmImagePipeline.

GlmImagePipeline makes an image in two stages: `generate_prior_tokens` runs the AR model
(transformers' generate) for the image's token grid, then the diffusion transformer and the VAE
turn the grid into pixels. `use_glmrt` hands the first stage to a glmrt.LLM on one pipeline
instance. Nothing else in the pipeline's __call__ touches `vision_language_encoder` or
`processor`, so load it without them:

    pipe = GlmImagePipeline.from_pretrained("zai-org/GLM-Image", vision_language_encoder=None,
                                            processor=None, dtype=torch.bfloat16).to("cuda")
    use_glmrt(pipe, glmrt.LLM("zai-org/GLM-Image"))
    image = pipe("a red fox in the snow", height=1024, width=1024).images[0]

The same split without the adapter: `prior_tokens` (or `to_prior_tokens` on outputs the engine
already has) gives the AR stage's tokens in the form the pipeline takes, and `DiffusionStage`
renders them (glmrt.ImagePipeline and the server's images endpoints are built from the two).

diffusers is imported only by DiffusionStage.from_pretrained: glmrt imports without it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from .devices import resolve_device, resolve_dtype
from .glm_image import GlmImageProcessor, ImageTokensOutput
from .image_processor import load_image, to_rgb
from .llm import LLM
from .sampling_params import SamplingParams

SEED_LIMIT = 2**64  # seeds are in [0, 2**64): torch.Generator's; image i's seed + i wraps there


def seeded(params: Sequence[SamplingParams], seed: int) -> list[SamplingParams]:
    """Image i's AR-stage sampling: params[i] with seed + i (mod 2**64), as `prior_tokens` draws a
    batch from one generator's seed (the Python API and the server give the same pictures)."""
    return [dataclasses.replace(p, seed=(seed + i) % SEED_LIMIT) for i, p in enumerate(params)]

if TYPE_CHECKING:
    from diffusers import GlmImagePipeline


# (prior_token_ids, prior_token_image_ids, source_image_grid_thw): what
# GlmImagePipeline.generate_prior_tokens returns and its __call__ takes.
PriorTokens = tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None]


def prior_tokens(llm: LLM, prompt: str | Sequence[str], height: int, width: int,
                 image: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
                 generator: torch.Generator | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 device: str | torch.device | None = None, use_tqdm: bool = False) -> PriorTokens:
    """GlmImagePipeline.generate_prior_tokens on glmrt -> (prior_token_ids, prior_token_image_ids,
    source_image_grid_thw) as to_prior_tokens gives them, on `device` (default CPU).

    image: None or [] (text-to-image), one list of condition images per prompt (the pipeline's
    _validate_and_normalize_images form), or for a single prompt its flat list.
    generator: its initial_seed() seeds prompt i with seed + i (mod 2**64), in place of
    sampling_params' seeds (the pipeline seeds torch with it and samples the whole batch from that
    one stream; glmrt draws each request from its own seed).
    sampling_params: one for all prompts, one per prompt, or None (generation_config.json defaults).
    use_tqdm: a progress bar over the tokens (LLM.generate_image_tokens).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    images = _images_per_prompt(image, len(prompts))
    if generator is not None:
        seed = generator.initial_seed()
        if sampling_params is None:
            sampling_params = llm.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = seeded(sampling_params, seed)
    outputs = llm.generate_image_tokens(prompts, height, width, images=images, sampling_params=sampling_params,
                                        use_tqdm=use_tqdm)
    return to_prior_tokens(outputs, prompts, image_to_image=images is not None, device=device)


def to_prior_tokens(outputs: list[ImageTokensOutput], prompts: list[str], image_to_image: bool,
                    device: str | torch.device | None = None) -> PriorTokens:
    """The AR stage's outputs (one per prompt, in order) -> what GlmImagePipeline's __call__ takes,
    int64 on `device` (default CPU), every grid upsampled 2x (nearest) to the diffusion
    transformer's resolution:
    - prior_token_ids [B, 4*th*tw]: each prompt's full (th x tw) grid;
    - prior_token_image_ids: per prompt, its condition images' codes [sum of 4*h*w], or None for
      text-to-image;
    - source_image_grid_thw: per prompt, those images' grids [n_images, 3] as (1, 2h, 2w), or None.

    Raises RuntimeError naming the prompt when a generation ended before its grid was full: the
    diffusion transformer cannot decode a partial grid.
    """
    for i, (p, out) in enumerate(zip(prompts, outputs, strict=True)):
        if out.image_tokens is None or out.error is not None:
            (th, tw), (ph, pw) = out.target_grid, out.preview_grid or (0, 0)
            why = f"{out.finish_reason}: {out.error}" if out.error else out.finish_reason
            raise RuntimeError(f"prompt {i} ({p!r:.80}): generation ended ({why}) after {len(out.token_ids)} of "
                               f"{ph * pw + th * tw + 1} tokens, before its {th} x {tw} grid was full; "
                               "GlmImagePipeline cannot decode a partial grid")
    device = device or "cpu"
    ids = torch.stack([_upsample(out.image_tokens) for out in outputs]).to(device)
    if not image_to_image:
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


class DiffusionStage:
    """GLM-Image's second stage: diffusers' GlmImagePipeline without its AR stage (no
    vision_language_encoder, no processor), turning prior tokens into pictures with the glyph
    text encoder, the diffusion transformer and the VAE. Not thread-safe: callers serialize."""

    def __init__(self, pipe: GlmImagePipeline):
        self.pipe = pipe

    @classmethod
    def from_pretrained(cls, root: str, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> "DiffusionStage":
        """root: the pipeline's directory or Hub id (the AR stage's folders are neither loaded nor
        fetched). device / dtype as glmrt.LLM's (default: CUDA + bfloat16 when a GPU is present)."""
        try:
            from diffusers import GlmImagePipeline
        except ImportError as exc:
            raise ImportError(f"GLM-Image's diffusion stage needs diffusers: pip install 'glmrt[image]' ({exc})") from exc
        device = resolve_device(device)
        pipe = GlmImagePipeline.from_pretrained(str(root), vision_language_encoder=None, processor=None,
                                                dtype=resolve_dtype(dtype, device))
        return cls(pipe.to(device))

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def condition(self, image: Any, processor: GlmImageProcessor, name: str) -> Image.Image:
        """A condition image (PIL image, path, bytes or data URI) as both stages take it: RGB,
        converted as the AR stage's processor converts (transparency onto white), and sized by
        fit_condition. The Python API and the server both prepare theirs here, so an edit over
        HTTP gives the Python API's picture. ValueError naming the image as `name`."""
        try:
            picture = load_image(image)
            return self.fit_condition(picture if picture.mode == "RGB" else to_rgb(picture), processor)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{name}: {exc}") from exc

    def fit_condition(self, picture: Image.Image, processor: GlmImageProcessor) -> Image.Image:
        """A condition image (RGB) sized so that its AR grid, upsampled 2x, covers the same cells
        as its VAE latent, which render needs. The AR stage (`processor`, the LLM's) resizes it to
        about half size in whole patches (smart_resize), diffusers to its size rounded down to
        whole DiT tokens (VAE downsampling x patch size: 16 pixels): where one rounds up and the
        other down they disagree, and the picture is resized to twice the AR stage's size
        (elsewhere it is returned as is, so the result stays diffusers' own). ValueError for an
        image the AR stage refuses (too small, too elongated)."""
        height, width = processor.image_processor.resized_size(picture.height, picture.width)
        token = self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size
        if (2 * height, 2 * width) == (picture.height // token * token, picture.width // token * token):
            return picture
        return picture.resize((2 * width, 2 * height), Image.Resampling.BICUBIC)

    def render(self, prompts: list[str], prior: PriorTokens, *, height: int, width: int,
               images: list[list[Image.Image]] | None = None, seed: int | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               progress: bool = False) -> list[Image.Image]:
        """One batch: the pictures of `prompts` from their prior tokens (to_prior_tokens' triple for
        the same prompts, height and width). images: each prompt's condition images, RGB PIL
        images through fit_condition (image-to-image; the VAE encodes them). seed: a torch.Generator on the pipeline's device,
        as diffusers' own pipeline is seeded; None draws from torch's global RNG. Steps and
        guidance left None take the pipeline's defaults. progress: diffusers' bar over the steps."""
        ids, codes, grids = prior
        options = {name: value for name, value in (("num_inference_steps", num_inference_steps),
                                                   ("guidance_scale", guidance_scale)) if value is not None}
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        self.pipe.set_progress_bar_config(disable=not progress, desc="diffusion steps")
        return self.pipe(list(prompts), image=images, height=height, width=width, generator=generator,
                         prior_token_ids=ids, prior_token_image_ids=codes, source_image_grid_thw=grids,
                         **options).images


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
