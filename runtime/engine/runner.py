"""Turns a scheduled batch into model inputs, runs the model, samples.

Owns the paged KV cache: per layer a (K, V) pair of [num_blocks, block_size, Hkv, D] tensors.
Decode steps replay CUDA graphs when they were captured (CUDA, triton backend, not eager).
"""
from __future__ import annotations

import torch

from ..model.glm_ocr import GlmOcrModel
from ..model.text import AttentionMetadata
from .graphs import DecodeGraphs
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
    def __init__(self, model: GlmOcrModel, num_blocks: int, block_size: int, sampler: Sampler,
                 graph_max_num_seqs: int = 0, max_blocks_per_seq: int = 0):
        self.model = model
        self.block_size = block_size
        self.kv_caches = allocate_kv_cache(model, num_blocks, block_size)
        self.sampler = sampler
        self.graphs = (
            DecodeGraphs(model, self.kv_caches, graph_max_num_seqs, max_blocks_per_seq) if graph_max_num_seqs else None
        )

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

    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Varlen prefill of every token of each sequence -> logits at each sequence's last token."""
        device = self.model.device
        image_id = self.model.config.image_token_id
        ids = torch.tensor([t for s in seqs for t in s.all_token_ids], dtype=torch.int64)
        # Only prompt tokens can be image slots (a generated <|image|> id is embedded as text).
        image_mask = torch.cat([
            torch.tensor([t == image_id for t in s.prompt_token_ids] + [False] * len(s.output_token_ids)) for s in seqs
        ])
        lens = torch.tensor([s.num_tokens for s in seqs], dtype=torch.int32)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor([x for s in seqs for x in self._slots(s, 0, s.num_tokens)], device=device),
            cu_seqlens=cu.to(device), max_seqlen=int(lens.max()),
        )
        positions = torch.cat([s.positions() for s in seqs], dim=1).to(device)
        hidden = self.model.forward(ids.to(device), positions, attn, self.kv_caches,
                                    self._image_embeds(seqs), image_mask.to(device))
        return self.model.compute_logits(hidden[(cu[1:] - 1).to(device=device, dtype=torch.int64)])

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token per sequence (its last, not yet cached) -> logits [B, V]."""
        device = self.model.device
        input_ids = torch.tensor([s.last_token_id for s in seqs], dtype=torch.int64)
        positions = torch.tensor([s.num_tokens - 1 + s.rope_delta for s in seqs]).expand(3, -1)
        slots = torch.tensor([self._slots(s, s.num_tokens - 1, s.num_tokens)[0] for s in seqs], dtype=torch.int64)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
        context_lens = torch.tensor([s.num_tokens for s in seqs], dtype=torch.int32)
        if self.graphs is not None and self.graphs.bucket_for(len(seqs)) is not None:
            return self.graphs.run(input_ids, positions, slots, tables, context_lens)
        attn = AttentionMetadata(
            slot_mapping=slots.to(device), block_tables=tables.to(device), context_lens=context_lens.to(device)
        )
        hidden = self.model.forward(input_ids.to(device), positions.to(device), attn, self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        logits = self._prefill(seqs) if is_prefill else self._decode(seqs)
        return self.sampler(logits, seqs)
