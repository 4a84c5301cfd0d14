"""Token selection for a batch: repetition penalty, temperature, top-k, top-p, per-request seeds.

Semantics follow transformers' logits processors (and vLLM): the repetition penalty covers
prompt + generated tokens (x < 0 -> x * p, else x / p), then temperature, top-k, top-p
(smallest set whose probability reaches top_p, at least one token), then a draw. Temperature 0
is greedy (argmax after the penalty). Rows with a seed draw from their own generator, so a
fixed seed reproduces regardless of batch composition.
"""
from __future__ import annotations

import torch

from ..sampling_params import SamplingParams
from .sequence import Sequence


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[list[int]], penalties: list[float]) -> torch.Tensor:
    """logits [B, V] float32, in place."""
    for row, (ids, p) in enumerate(zip(token_ids, penalties)):
        if p == 1.0 or not ids:
            continue
        idx = torch.tensor(sorted(set(ids)), device=logits.device)
        score = logits[row, idx]
        logits[row, idx] = torch.where(score < 0, score * p, score / p)
    return logits


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] float32 -> logits with filtered-out entries at -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1.0 - top_p
        remove[-1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


class Sampler:
    """Reference sampler (plain torch); the oracle for the device sampler."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [B, V] (rows in `seqs` order) -> one token id per sequence."""
        logits = logits.float()
        params: list[SamplingParams] = [s.sampling_params for s in seqs]
        apply_repetition_penalty(logits, [s.all_token_ids for s in seqs], [p.repetition_penalty for p in params])
        tokens = logits.argmax(dim=-1)
        for row, (seq, p) in enumerate(zip(seqs, params)):
            if p.greedy:
                continue
            row_logits = top_k_top_p_filter(logits[row] / p.temperature, p.top_k, p.top_p)
            probs = row_logits.softmax(-1)
            tokens[row] = torch.multinomial(probs, 1, generator=seq.generator)[0]
        return tokens.tolist()
