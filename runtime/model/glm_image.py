"""GLM-Image's autoregressive stage: vision tower + VQ tokenizer (condition images -> codebook
ids in the prompt) and the GLM text decoder, over one set of ops.

Unlike GLM-OCR, images never reach the decoder as embeddings: each condition image becomes one
codebook id per patch, written into the prompt in place of its `<|image|>` placeholders, so a
request is plain token ids by the time the engine schedules it. The decoder's lm_head covers
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
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Condition images packed as pixel_values [S, C*P*P] (any float dtype) with their grids
        -> per image its codebook ids [h * w] int64, in prompt order."""
        features = self.vision(pixel_values.to(self.dtype), image_grid_thw)
        codes = self.vq(features, image_grid_thw)
        return list(codes.split([t * h * w for t, h, w in image_grid_thw]))

    def prompt_images(self, seqs: list, codes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`encode_images`' codes of the condition images of `seqs` (Sequences, images in order)
        -> {}: the codes replace each prompt's <|image|> placeholders, in order, so the prompt is
        plain token ids (and a recompute after preemption needs no second pass)."""
        codes = iter(c.tolist() for c in codes)
        for s in seqs:
            filled = [c for _ in s.image_grid_thw for c in next(codes)]
            s.fill_placeholders(self.config.image_token_id, filled)
        return {}

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        if image_embeds is not None:
            raise ValueError("GLM-Image prompts carry condition images as codebook ids, not embeddings")
        return self.text.embed_tokens[input_ids]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], image_embeds: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] (vision and text ids alike), positions [3, T] -> final hidden states [T, hidden]."""
        return self.text.forward(self.embed(input_ids, image_embeds), positions, attn, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """-> [N, vision vocabulary] logits."""
        return self.text.compute_logits(hidden)
