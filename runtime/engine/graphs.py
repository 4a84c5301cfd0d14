"""CUDA-graph decode: each decode step (inputs from device state, decoder, lm_head, sampling,
state updates) as two captured graphs per batch-size bucket, replayed one after the other.

A decode step of this small decoder is bound by kernel-launch overhead, so each half is one
replay. The step reads only the device-resident batch (block tables of fixed width, context
lengths, last tokens, sampling state, token masks), so a replay needs no input copy at all; rows
past the running count are inactive (no KV write, context 0). Per bucket
(ModelRunner._capture_graphs): the forward up to the logits, then the sampling under the token
masks (all ones for rows without a constraint), greedy-only and with the sampled path
(temperature, top-k/top-p, draw: its threshold searches cost a filtered row ~19 passes over the
vocabulary), so greedy steps never pay for them. Between the two replays the host reads the
previous step's tokens and, when a row is constrained, uploads the masks they lead to: a batch
with a json_schema row runs the same graphs as one without, plus that upload. With speculation
also the drafts and the verify in both modes: 3 graphs per bucket, 6 with speculation. The
forward's raw logits are a static output, so that a step whose requests ask for
log-probabilities computes them eagerly after the replay (steps that do not, pay nothing). All
graphs share one memory pool. Capture happens at start-up, while every row is inactive, so
warm-up runs touch no request's state.
"""
from __future__ import annotations

from typing import Callable

import torch

StaticOutput = torch.Tensor | tuple[torch.Tensor, ...]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 40, ... up to max_num_seqs (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    """CUDA graphs keyed by what they run, all in one memory pool. Capture the largest batch
    bucket first, so that later (smaller) captures fit in the pool it reserved."""

    def __init__(self):
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple, StaticOutput] = {}
        self._pool = None

    @torch.inference_mode()
    def capture(self, key: tuple, run: Callable[[], StaticOutput]) -> None:
        """Capture `run` (reading and writing device state only) under `key`; its output tensors
        are static: every replay rewrites them."""
        run()  # warm-up: Triton compiles and cuBLAS picks its kernels outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.outputs[key] = run()
        self._pool = graph.pool()
        self.graphs[key] = graph
        torch.cuda.synchronize()

    def replay(self, key: tuple) -> StaticOutput:
        """-> the graph's static output (valid until its next replay)."""
        self.graphs[key].replay()
        return self.outputs[key]
