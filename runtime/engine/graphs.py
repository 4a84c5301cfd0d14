"""CUDA-graph decode: one captured step (decoder forward + lm_head) per batch-size bucket.

A decode step of this small decoder is bound by kernel-launch overhead, so every bucket's whole
step is captured once at start-up and replayed. Inputs live in static buffers sized for the
largest bucket; a batch is padded up to its bucket with rows whose slot is -1 (no KV write) and
whose context length is 0 (the decode kernel returns zeros for them), so no padded row touches
real state. Block tables are always `max_blocks` wide, which keeps every kernel's grid static.
All buckets share one memory pool. With capture=False every bucket runs eagerly through the same
static buffers and padding, which lets CPU tests check everything but the capture itself.
"""
from __future__ import annotations

import torch

from ..model.glm_ocr import GlmOcrModel
from ..model.text import AttentionMetadata


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 40, ... up to max_num_seqs (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model: GlmOcrModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_num_seqs: int, max_blocks: int, capture: bool = True):
        self.model = model
        self.capture = capture
        self.kv_caches = kv_caches
        self.max_blocks = max_blocks
        self.buckets = batch_buckets(max_num_seqs)
        n, device = self.buckets[-1], model.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(3, n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _step(self, bs: int) -> torch.Tensor:
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs]
        )
        hidden = self.model.forward(self.input_ids[:bs], self.positions[:, :bs], attn, self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bs in reversed(self.buckets):  # largest first, so later captures fit in its pool
            self._step(bs)  # warm-up: Triton compiles and cuBLAS picks its kernels outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._step(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """Replay the bucket that fits; inputs are [B]-sized host or device tensors. -> logits [B, V]."""
        b = input_ids.shape[0]
        bs = self.bucket_for(b)
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:, :b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[b:bs].fill_(-1)
        self.block_tables[:b, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.context_lens[:b].copy_(context_lens, non_blocking=True)
        self.context_lens[b:bs].fill_(0)
        if not self.capture:
            return self._step(bs)[:b]
        self.graphs[bs].replay()
        return self.logits[bs][:b]
