"""Turns a scheduled batch into model inputs, runs the model, samples.

Owns the paged KV cache: per layer a (K, V) pair of [num_blocks, block_size, Hkv, D] tensors.
"""
from __future__ import annotations

import torch

from ..model.glm_ocr import GlmOcrModel
from ..model.text import AttentionMetadata
from .sampler import Sampler
from .sequence import Sequence


def allocate_kv_cache(model: GlmOcrModel, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    c = model.config.text
    shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
    return [
        (torch.zeros(shape, dtype=model.dtype, device=model.device), torch.zeros(shape, dtype=model.dtype, device=model.device))
        for _ in range(c.num_layers)
    ]


def kv_bytes_per_token(model: GlmOcrModel) -> int:
    c = model.config.text
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize


class ModelRunner:
    def __init__(self, model: GlmOcrModel, num_blocks: int, block_size: int, sampler: Sampler):
        self.model = model
        self.block_size = block_size
        self.kv_caches = allocate_kv_cache(model, num_blocks, block_size)
        self.sampler = sampler

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[i // bs] * bs + i % bs for i in range(start, end)]

    def _image_embeds(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Run one packed vision pass over every image of the batch not yet encoded."""
        todo = [s for s in seqs if s.image_embeds is None and s.pixel_values is not None]
        if todo:
            pixels = torch.cat([s.pixel_values for s in todo])
            grids = [g for s in todo for g in s.image_grid_thw]
            embeds = self.model.encode_images(pixels, grids)
            m2 = self.model.config.vision.spatial_merge_size**2
            offset = 0
            for s in todo:
                n = sum(t * h * w for t, h, w in s.image_grid_thw) // m2
                s.image_embeds = embeds[offset: offset + n]
                s.pixel_values = None
                offset += n
        parts = [s.image_embeds for s in seqs if s.image_embeds is not None]
        return torch.cat(parts) if parts else None

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        device = self.model.device
        if is_prefill:
            ids = [t for s in seqs for t in s.all_token_ids]
            positions = torch.cat([s.positions() for s in seqs], dim=1)
            lens = [s.num_tokens for s in seqs]
            cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
            slots = [x for s in seqs for x in self._slots(s, 0, s.num_tokens)]
            attn = AttentionMetadata(
                slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                cu_seqlens=cu.to(device), max_seqlen=max(lens),
            )
            image_embeds = self._image_embeds(seqs)
            last = (cu[1:] - 1).to(device=device, dtype=torch.int64)
        else:
            ids = [s.last_token_id for s in seqs]
            p = torch.tensor([s.num_tokens - 1 + s.rope_delta for s in seqs])
            positions = p.expand(3, -1)
            max_blocks = max(len(s.block_table) for s in seqs)
            tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs], dtype=torch.int32)
            slots = [self._slots(s, s.num_tokens - 1, s.num_tokens)[0] for s in seqs]
            attn = AttentionMetadata(
                slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                block_tables=tables.to(device),
                context_lens=torch.tensor([s.num_tokens for s in seqs], dtype=torch.int32, device=device),
            )
            image_embeds = None
            last = None
        input_ids = torch.tensor(ids, dtype=torch.int64, device=device)
        hidden = self.model.forward(input_ids, positions.to(device), attn, self.kv_caches, image_embeds)
        if last is not None:
            hidden = hidden[last]
        logits = self.model.compute_logits(hidden)
        return self.sampler(logits, seqs)
