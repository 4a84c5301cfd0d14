"""GLM-Image's autoregressive stage, request side: target grids, prompt, outputs.

A request asks for an image of `height` x `width` pixels from a text prompt (text-to-image) or
from a prompt and condition images (image-to-image). As transformers' GlmImageProcessor does,
the size becomes a token grid of (height // 32) x (width // 32) and, for text-to-image, a small
preview grid of about 16 x 16 with the same aspect ratio; their sizes are spelled out at the end
of the prompt ("<sop>H W<eop>"), which ends with the image-start token. The model then generates
the preview grid (text-to-image only), the full grid and the image-end token: one vision-vocabulary
id per grid cell, which the diffusion decoder upsamples 2x and decodes to pixels.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .config import GlmImageVisionConfig
from .glm_image_processor import GlmImageImageProcessor
from .image_processor import read_config_json
from .processor import ChatTemplate, Processor, load_tokenizer, named_special_tokens

# Pixels per token of the target grid (the diffusion decoder upsamples the grid 2x, then 16x).
TARGET_FACTOR = 32
PREVIEW_SIDE = TARGET_FACTOR // 2  # the preview grid holds about PREVIEW_SIDE² tokens
# The longest side GLM-Image is made for (diffusers' GlmImageTransformer2DModel documents it; Z.ai's
# API allows up to it): the AR grid is then 64 x 64 tokens, the diffusion transformer's 128 x 128.
MAX_IMAGE_SIDE = 2048
# The tokenizer's names for the tokens the prompt is built with (tokenizer_config.json).
SPECIAL_TOKEN_KEYS = ("image_token", "grid_bos_token", "grid_eos_token", "bos_token")


def target_grids(height: int, width: int, text_to_image: bool) -> list[tuple[int, int, int]]:
    """The grids to generate for an image of height x width pixels, in prompt order: the full
    grid (height // 32, width // 32), then, for text-to-image, the preview grid."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < TARGET_FACTOR:
            raise ValueError(f"{name} must be an int >= {TARGET_FACTOR} (pixels), got {value!r}")
    h, w = height // TARGET_FACTOR, width // TARGET_FACTOR
    grids = [(1, h, w)]
    if text_to_image:
        ratio = h / w
        ph, pw = int(math.sqrt(ratio) * PREVIEW_SIDE), int(math.sqrt(1 / ratio) * PREVIEW_SIDE)
        if ph < 1 or pw < 1:
            raise ValueError(f"height {height} x width {width}: the aspect ratio is too extreme for the preview grid "
                             f"({ph} x {pw} tokens)")
        grids.append((1, ph, pw))
    return grids


def check_image_size(height: int, width: int) -> None:
    """A picture's size for the whole pipeline (AR stage and diffusion decoder): each side a
    multiple of 32 pixels (one AR token; the decoder makes no other sizes), from 32 to
    MAX_IMAGE_SIDE. ValueError naming the side otherwise."""
    for name, value in (("height", height), ("width", width)):
        if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                or not TARGET_FACTOR <= value <= MAX_IMAGE_SIDE or value % TARGET_FACTOR):
            raise ValueError(f"{name} must be a multiple of {TARGET_FACTOR} pixels from {TARGET_FACTOR} to "
                             f"{MAX_IMAGE_SIDE}, got {value!r}")


def generation_length(targets: list[tuple[int, int, int]]) -> int:
    """Tokens to generate for the target grids: every cell, then the image-end token."""
    return sum(t * h * w for t, h, w in targets) + 1


@dataclass
class ImageRequest:
    """One image to generate: the prompt, the target size in pixels and the condition images
    (PIL images, paths, bytes or data URIs, as for GLM-OCR requests; none: text-to-image)."""

    prompt: str
    height: int
    width: int
    images: list[Any] = field(default_factory=list)
    targets: list[tuple[int, int, int]] = field(init=False, repr=False)  # target_grids(height, width, ...)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        self.images = list(self.images) if isinstance(self.images, (list, tuple)) else [self.images]
        self.targets = target_grids(self.height, self.width, text_to_image=not self.images)


@dataclass
class ProcessedImagePrompt:
    input_ids: list[int]  # each condition image's codes still <|image|> placeholders
    pixel_values: torch.Tensor | None  # the condition images: uint8 patch pixels [N, 3*P*P]
    source_grids: list[tuple[int, int, int]]  # the condition images' patch grids
    target_grids: list[tuple[int, int, int]]


class GlmImageProcessor:
    """Tokenizer, chat template and image preprocessing of GLM-Image's `processor/` folder."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate, image_processor: GlmImageImageProcessor,
                 special_tokens: dict[str, str]):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_processor = image_processor
        self.special_tokens = special_tokens
        self.image_token_id = tokenizer.token_to_id(special_tokens["image_token"])

    @classmethod
    def from_pretrained(cls, path: str | Path, image_backend: str = "torchvision",
                        vision: GlmImageVisionConfig | None = None) -> "GlmImageProcessor":
        """vision: the encoder's config, to check the preprocessing against (patch size, channels)."""
        path = Path(path)
        tokenizer = load_tokenizer(path)
        config = read_config_json(path / "tokenizer_config.json") or {}
        named, special = named_special_tokens(config), {}
        for key in SPECIAL_TOKEN_KEYS:
            token = named.get(key)
            if not isinstance(token, str) or tokenizer.token_to_id(token) is None:
                raise ValueError(f"{path / 'tokenizer_config.json'}: {key} {token!r} is not a token of the tokenizer")
            special[key] = token
        image_processor = GlmImageImageProcessor.from_pretrained(path, image_backend, vision)
        return cls(tokenizer, ChatTemplate.from_pretrained(path), image_processor, special)

    def __call__(self, request: ImageRequest) -> ProcessedImagePrompt:
        """The prompt as transformers' GlmImageProcessor builds it through apply_chat_template:
        one user turn (condition images first, then the text), the target grid sizes and the
        image-start token; each <|image|> expanded to its image's token count."""
        s = self.special_tokens
        # No generation prompt: the pipeline and the model's documentation call
        # apply_chat_template without add_generation_prompt.
        text = self.chat_template.render(Processor.messages(len(request.images), request.prompt),
                                         add_generation_prompt=False)
        for _, h, w in request.targets:
            text += f"{s['grid_bos_token']}{h} {w}{s['grid_eos_token']}"
        text += s["bos_token"]
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        n_slots = ids.count(self.image_token_id)
        if n_slots != len(request.images):
            raise ValueError(f"the rendered prompt has {n_slots} {s['image_token']} slots for {len(request.images)} images")
        if not request.images:
            return ProcessedImagePrompt(ids, None, [], request.targets)
        vision = self.image_processor(request.images, normalize=False)  # uint8: normalized on the device
        grids = [tuple(g) for g in vision["image_grid_thw"].tolist()]
        counts = iter(self.image_processor.num_tokens(g) for g in grids)
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        return ProcessedImagePrompt(expanded, vision["pixel_values"], grids, request.targets)


@dataclass
class ImageTokensOutput:
    """The AR stage's result for one image: the generated grids, ready for the diffusion decoder
    (diffusers' GlmImagePipeline upsamples them 2x, nearest)."""

    request_id: str
    prompt_token_ids: list[int]  # with the condition images' codes in place
    token_ids: list[int]  # everything generated, the image-end token included
    finish_reason: str | None  # "stop" (image end written), "length" (grids full, no image end), "abort", "error"
    target_grid: tuple[int, int]  # (rows, columns) of the full image's tokens
    image_tokens: torch.Tensor | None  # [rows, columns] int64; None if generation ended before the grid was full
    preview_grid: tuple[int, int] | None = None  # text-to-image only
    preview_tokens: torch.Tensor | None = None  # [rows, columns] int64
    # Per condition image: its codes [rows, columns] int64 (image-to-image).
    condition_image_tokens: list[torch.Tensor] = field(default_factory=list)
    error: str | None = None

    @classmethod
    def from_output(cls, output, request: ImageRequest, source_grids: list[tuple[int, int, int]],
                    image_start_id: int, image_end_id: int) -> "ImageTokensOutput":
        generated = output.token_ids
        ended = bool(generated) and generated[-1] == image_end_id
        body = generated[:-1] if ended else generated  # the image end fills no cell
        targets = request.targets
        grids = []  # in generation order: the preview first
        offset = 0
        for _, h, w in reversed(targets):
            cells = body[offset: offset + h * w]
            grids.append(torch.tensor(cells, dtype=torch.long).view(h, w) if len(cells) == h * w else None)
            offset += h * w
        conditions, prompt = [], output.prompt_token_ids
        starts = [i + 1 for i, t in enumerate(prompt) if t == image_start_id]
        ends = [i for i, t in enumerate(prompt) if t == image_end_id]
        for (start, end), (_, h, w) in zip(zip(starts, ends), source_grids):
            conditions.append(torch.tensor(prompt[start:end], dtype=torch.long).view(h, w))
        # Every cell and image_end is exactly max_tokens: the engine calls that "length" (vLLM's
        # order of checks), but the image ended as the model meant it to.
        reason = "stop" if output.finish_reason == "length" and ended else output.finish_reason
        return cls(
            request_id=output.request_id, prompt_token_ids=prompt, token_ids=list(generated),
            finish_reason=reason, target_grid=targets[0][1:], image_tokens=grids[-1],
            preview_grid=targets[1][1:] if len(targets) > 1 else None,
            preview_tokens=grids[0] if len(targets) > 1 else None,
            condition_image_tokens=conditions, error=output.error,
        )
