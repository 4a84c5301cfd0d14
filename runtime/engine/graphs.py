"""CUDA-graph decode: the whole decode step (inputs from device state, decoder, lm_head,
sampling, state updates) captured once per batch-size bucket and per sampling mode.

A decode step of this small decoder is bound by kernel-launch overhead, so each step is one
replay. The step reads only the device-resident batch (block tables of fixed width, context
lengths, last tokens, sampling state), so a replay needs no input copy at all; rows past the
running count are inactive (no KV write, context 0). Two graphs per bucket: greedy-only, and with
the sampled path (temperature, top-k/top-p sort, draw), so greedy steps never pay for a sort.
All graphs share one memory pool. Capture happens at start-up, while every row is inactive,
so warm-up runs touch no request's state.
"""
from __future__ import annotations

from typing import Callable

import torch


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 40, ... up to max_num_seqs (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, step: Callable[[int, bool], torch.Tensor], buckets: list[int]):
        """step(bs, do_sample) -> [bs] tokens: the runner's decode step over rows [0, bs)."""
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for bs in reversed(buckets):  # largest first, so later captures fit in its pool
                for do_sample in (True, False):
                    step(bs, do_sample)  # warm-up: Triton compiles and cuBLAS picks its kernels outside capture
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self.outputs[bs, do_sample] = step(bs, do_sample)
                    pool = graph.pool()
                    self.graphs[bs, do_sample] = graph
        torch.cuda.synchronize()

    def replay(self, bs: int, do_sample: bool) -> torch.Tensor:
        """-> the bucket's static [bs] token output (valid until the next replay)."""
        self.graphs[bs, do_sample].replay()
        return self.outputs[bs, do_sample]
