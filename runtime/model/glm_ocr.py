"""GLM-OCR: vision tower + image-embedding scatter + text decoder, over one set of ops."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..loader import load_checkpoint
from .mtp import MtpDrafter
from .ops import TorchOps
from .text import AttentionMetadata, TextDecoder
from .vision import VisionTower


class GlmOcrModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ops: TorchOps, load_mtp: bool = False):
        self.config = config
        self.ops = ops
        self.vision = VisionTower(config.vision, weights, ops)
        self.text = TextDecoder(config.text, weights, ops, tied_lm_head=config.tie_word_embeddings)
        self.mtp = MtpDrafter(config.text, weights, ops, self.text) if load_mtp else None
        self.dtype = self.text.embed_tokens.dtype
        self.device = self.text.embed_tokens.device

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig, ops: TorchOps, device: torch.device,
                        dtype: torch.dtype, load_mtp: bool = False) -> "GlmOcrModel":
        """load_mtp: also the MTP layer, for speculative decoding (NoMtpLayerError when absent)."""
        return cls(config, load_checkpoint(path, config, device, dtype, load_mtp).weights, ops, load_mtp)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """All images of a step in one packed vision pass -> [sum tokens, hidden] in image order."""
        return self.vision(pixel_values, image_grid_thw)

    def prompt_images(self, seqs: list, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """`encode_images`' output for the images of `seqs` (Sequences, images in order) -> each
        sequence's embeddings [its image slots, hidden] by request id: what fills its <|image|> rows."""
        m2 = self.config.vision.spatial_merge_size**2
        sizes = [sum(t * h * w for t, h, w in s.image_grid_thw) // m2 for s in seqs]
        return dict(zip((s.request_id for s in seqs), embeds.split(sizes)))

    def prompt_image_ids(self, images: torch.Tensor) -> None:
        """A sequence's `prompt_images` entry as token ids of its prompt: none (embeddings)."""
        return None

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] -> [T, hidden] rows of `table` (default: the decoder's embedding); rows where
        image_mask [T] is set are replaced, in order, by image_embeds [image_mask.sum(), hidden] (the
        caller checks the count on the host). Done with a gather and a select rather than boolean
        indexing, so it never waits for the device."""
        embeds = (self.text.embed_tokens if table is None else table)[input_ids]
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
