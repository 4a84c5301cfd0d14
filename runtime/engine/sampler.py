"""Token selection for a batch, on the logits' device: repetition penalty, temperature, top-k,
top-p, per-request seeds.

Semantics follow transformers' logits processors (and vLLM): the repetition penalty covers
prompt + generated tokens (x < 0 -> x * p, else x / p), then temperature, top-k, top-p (the
smallest set whose probability reaches top_p, at least one token), then a draw. Temperature 0
is greedy: argmax after the penalty. The draw is the exponential race argmax(p / E), E ~ Exp(1),
which samples exactly from p; each seeded request draws E from its own generator, so a fixed
seed reproduces whatever else is in the batch.

`use_kernels` runs the penalty and argmax as Triton kernels (triton backend); the default uses
their plain-torch twins and is the oracle.
"""
from __future__ import annotations

import torch

from glmrt.kernels import sampling

from .sequence import Sequence


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32; top_k [B] int64 (<= 0: off); top_p [B] float32 -> filtered logits (-inf)."""
    vocab = logits.shape[-1]
    ascending, order = torch.sort(logits, dim=-1)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ascending.gather(1, (vocab - k)[:, None])  # the k-th largest value
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    cumulative = ascending.softmax(-1).cumsum(-1)
    remove = cumulative <= (1.0 - top_p)[:, None]
    remove[:, -1] = False  # always keep the most likely token
    ascending = ascending.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ascending)


class Sampler:
    def __init__(self, use_kernels: bool = False):
        self.use_kernels = use_kernels

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [B, V] (rows in `seqs` order) -> one token id per sequence."""
        device = logits.device
        logits = logits.float()
        params = [s.sampling_params for s in seqs]
        if any(p.repetition_penalty != 1.0 for p in params):
            histories = [s.distinct_token_ids for s in seqs]  # a token penalised once however often seen
            width = max(len(h) for h in histories)
            ids = torch.tensor([h + [-1] * (width - len(h)) for h in histories], dtype=torch.int64, device=device)
            penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
            if self.use_kernels:
                sampling.apply_repetition_penalty_(logits, ids, penalty)
            else:
                logits = sampling.apply_repetition_penalty_ref(logits, ids, penalty)
        tokens = sampling.argmax(logits) if self.use_kernels else sampling.argmax_ref(logits)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            sub = logits[rows] / torch.tensor([params[i].temperature for i in rows], device=device)[:, None]
            sub = top_k_top_p_filter(
                sub,
                torch.tensor([params[i].top_k for i in rows], dtype=torch.int64, device=device),
                torch.tensor([params[i].top_p for i in rows], dtype=torch.float32, device=device),
            )
            race = torch.stack([
                torch.empty(sub.shape[1], device=device).exponential_(generator=seqs[i].generator) for i in rows
            ])
            tokens[rows] = (sub.softmax(-1) / race).argmax(-1)
        return tokens.tolist()
