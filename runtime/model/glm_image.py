"""GLM-Image's autoregressive stage: vision tower + VQ tokenizer (condition images -> codebook
ids in the prompt) and the GLM text decoder, over one set of ops.

Unlike GLM-OCR, images never reach the decoder as embeddings: each condition image becomes one
codebook id per patch, which takes the place of one of its `<|image|>` placeholders: on the
device in the prefill that encoded it, in the host prompt once that step is read (so a recompute
after preemption, and the request's output, see plain token ids). The decoder's lm_head covers
only the vision vocabulary (the codes, image start/end).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import GlmImageConfig
from ..loader import load_checkpoint
from .glm_image_vision import GlmImageVisionTower, VqTokenizer
from .ops import TorchOps
from .text import AttentionMetadata, TextDecoder


class GlmImageModel:
    def __init__(self, config: GlmImageConfig, weights: dict[str, torch.Tensor], ops: TorchOps):
        self.config = config
        self.ops = ops
        self.vision = GlmImageVisionTower(config.vision, weights, ops)
        self.vq = VqTokenizer(config.vq, weights)
        self.text = TextDecoder(config.text, weights, ops, tied_lm_head=False)
        self.mtp = None  # GLM-Image has no MTP layer
        self.dtype = self.text.embed_tokens.dtype
        self.device = self.text.embed_tokens.device

    @classmethod
    def from_pretrained(cls, path: Path, config: GlmImageConfig, ops: TorchOps, device: torch.device,
                        dtype: torch.dtype, load_mtp: bool = False) -> "GlmImageModel":
        if load_mtp:
            raise ValueError("GLM-Image has no MTP layer to draft with: run without speculation "
                             "(num_speculative_tokens=0)")
        return cls(config, load_checkpoint(path, config, device, dtype).weights, ops)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """Condition images packed as pixel_values [S, C*P*P] (any float dtype) with their grids
        -> their codebook ids [sum h * w] int64, image after image in prompt order."""
        return self.vq(self.vision(pixel_values.to(self.dtype), image_grid_thw), image_grid_thw).reshape(-1)

    def prompt_images(self, seqs: list, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """`encode_images`' codes of the condition images of `seqs` (Sequences, images in order)
        -> each sequence's codes [its <|image|> placeholders] int64 by request id: the token ids
        that take the placeholders' places, on the device (`embed`), without waiting for them."""
        sizes = [sum(t * h * w for t, h, w in s.image_grid_thw) for s in seqs]
        return dict(zip((s.request_id for s in seqs), codes.split(sizes)))

    def prompt_image_ids(self, images: torch.Tensor) -> torch.Tensor:
        """A sequence's `prompt_images` entry as token ids of its prompt: the codes themselves (the
        host prompt gets them once the step is read, ModelRunner.fill_prompts)."""
        return images

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]; where image_mask [T] is set the id is replaced, in order,
        by the condition images' codes `image_embeds` [image_mask.sum()] (a gather and a select:
        no wait for the device)."""
        if image_embeds is not None:
            order = (image_mask.cumsum(0) - 1).clamp(min=0)  # [T]: which code each slot takes
            input_ids = torch.where(image_mask, image_embeds[order], input_ids)
        return self.text.embed_tokens[input_ids]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], image_embeds: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] (vision and text ids alike), positions [3, T] -> final hidden states [T, hidden]."""
        return self.text.forward(self.embed(input_ids, image_embeds, image_mask), positions, attn, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """-> [N, vision vocabulary] logits."""
        return self.text.compute_logits(hidden)
