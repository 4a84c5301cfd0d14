"""GLM-OCR: vision tower + image-embedding scatter + text decoder, over one set of ops."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..loader import load_checkpoint
from .ops import TorchOps
from .text import AttentionMetadata, TextDecoder
from .vision import VisionTower


class GlmOcrModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ops: TorchOps):
        self.config = config
        self.ops = ops
        self.vision = VisionTower(config.vision, weights, ops)
        self.text = TextDecoder(config.text, weights, ops, tied_lm_head=config.tie_word_embeddings)
        self.dtype = self.text.embed_tokens.dtype
        self.device = self.text.embed_tokens.device

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig, ops: TorchOps, device: torch.device,
                        dtype: torch.dtype) -> "GlmOcrModel":
        return cls(config, load_checkpoint(path, config, device, dtype).weights, ops)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """All images of a step in one packed vision pass -> [sum tokens, hidden] in image order."""
        return self.vision(pixel_values, image_grid_thw)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]; rows where image_mask [T] is set are replaced, in order, by
        image_embeds [image_mask.sum(), hidden] (the caller checks the count on the host). Done with
        a gather and a select rather than boolean indexing, so it never waits for the device."""
        embeds = self.text.embed_tokens[input_ids]
        if image_embeds is None:
            return embeds
        order = (image_mask.cumsum(0) - 1).clamp(min=0)  # [T]: which image row each slot takes
        return torch.where(image_mask[:, None], image_embeds.to(embeds.dtype)[order], embeds)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], image_embeds: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> final hidden states [T, hidden]."""
        return self.text.forward(self.embed(input_ids, image_embeds, image_mask), positions, attn, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text.compute_logits(hidden)
