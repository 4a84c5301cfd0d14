"""Speculative decoding: k draft tokens per row, verified in one target step.

Drafts come from the MTP layer (on the device, below) or from the host (drafters.py: a reference
text, n-gram lookup over the output), per row: the host uploads each step's host drafts with
their count per row (`DeviceBatch.drafts`, `draft_lens`; -1 takes the MTP layer's k), so rows
with different sources and draft lengths share one verify step, and a row proposing fewer than k
drafts just accepts at most that many. Verification does not depend on where drafts came from:
greedy output is token-identical to plain decoding, sampled output keeps its distribution.

Cache indices: a sequence whose target cache holds n tokens (context_lens) has its next input
token t[n] in next_tokens. The MTP layer's entry at index i is computed from (h[i], t[i+1]), h
the target's final-normed hidden state, so it lags the target by one. A speculative step, all on
the device:

1. catch-up: the MTP layer over the rows the previous step verified (`carry_*`: their target
   hidden states and the target's tokens after them; rows 0..m valid, m = drafts accepted then)
   at indices n-1-m .. n-1, causal among them; its output at row m (index n-1) gives draft d1.
2. k - 1 chained draft steps at indices n .. n+k-2, each feeding its own output state back in.
3. verify: the target over [t[n], d1 .. dk] at indices n .. n+k (one multi-query paged
   attention per layer), the sampler accepts the longest valid prefix (`Sampler.verify`) and
   the step's hidden states and tokens become the next carry.

Steps 1 and 2 (with the host's drafts merged in) are one graph, step 3 another: between them the
host reads the previous step's tokens and, when a row is constrained, the drafts, to compute the
token masks of the k + 1 verified positions (llguidance advances a row's grammar through its
drafts). A draft its grammar does not allow is masked out at its position, so it is rejected and
the positions after it are never reached.

Steps 1 and 2 run whatever the rows' sources, so the MTP cache never has holes (an engine
without the MTP layer runs step 3 alone). Nothing is rolled back explicitly: cache entries past
the accepted tokens are simply overwritten by later steps before any query reads them, and the
scheduler gives back the slots it reserved. A prefill runs the MTP layer over the prompt (rows
0..P-2, embeddings of the next tokens, image tokens taking the target's image embeddings) and
leaves row P-1 as the carry; a plain decode step (a batch above speculative_max_batch, or
host drafts not worth a verify) runs the catch-up without the head and leaves its one row as the carry.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.glm_ocr import GlmOcrModel
from ..model.text import AttentionMetadata
from ..model.transfer import upload
from .sampler import Sampler


@dataclass
class SpecDecodeStats:
    """Acceptance counters over every sequence of every speculative step (vLLM's metric names)."""

    num_speculative_tokens: int
    num_drafts: int = 0  # verified rows that drafted: one per sequence per speculative step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts accepted at position i
    # source ("mtp", "text", "ngram") -> [drafts, draft tokens, accepted tokens]
    by_source: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.accepted_per_position = [0] * self.num_speculative_tokens

    def record(self, accepted: int, drafted: int, source: str = "mtp") -> None:
        """One sequence's verification: `accepted` of its `drafted` drafts (a prefix) were accepted.
        A row that proposed nothing is no draft."""
        if not drafted:
            return
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        counts = self.by_source.setdefault(source, [0, 0, 0])
        counts[0] += 1
        counts[1] += drafted
        counts[2] += accepted

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per sequence per speculative step (accepted drafts + the target's own token)."""
        return 1.0 + self.num_accepted_tokens / max(self.num_drafts, 1)

    def as_dict(self) -> dict:
        drafts = max(self.num_drafts, 1)
        return {
            "num_speculative_tokens": self.num_speculative_tokens, "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens, "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate_per_position": [n / drafts for n in self.accepted_per_position],
            "mean_accepted_length": self.mean_accepted_length,
            "by_source": {source: {"num_drafts": d, "num_draft_tokens": t, "num_accepted_tokens": a}
                          for source, (d, t, a) in self.by_source.items()},
        }


class SpeculativeDecoder:
    def __init__(self, model: GlmOcrModel, batch, sampler: Sampler, kv_caches: list, mtp_kv_cache: tuple | None,
                 num_speculative_tokens: int):
        self.model = model
        self.mtp = model.mtp  # None: drafts only from the host
        self.batch = batch  # the runner's DeviceBatch, with carry_hidden/tokens/accepted
        self.sampler = sampler
        self.kv_caches = kv_caches
        self.mtp_kv_cache = mtp_kv_cache
        self.k = num_speculative_tokens
        self.positions = torch.arange(self.k + 1, device=model.device)

    # --------------------------------------------------------------------------------- prefill

    def prefill(self, ids: torch.Tensor, image_embeds: torch.Tensor | None, image_mask: torch.Tensor | None,
                hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, lens: list[int]) -> None:
        """The MTP layer over a packed prefill: ids, image_mask [T] (None without images), hidden [T, H], positions [3, T],
        slots [T] of the target's prefill, sequences of `lens` tokens -> MTP cache entries for all
        but each sequence's last token (that one is carried into the first decode step)."""
        device = hidden.device
        firsts, lasts, start = [], [], 0
        for n in lens:
            firsts.append(start)
            lasts.append(start + n - 1)
            start += n
        keep = torch.ones(start, dtype=torch.bool)
        keep[lasts] = False
        rows = keep.nonzero()[:, 0]  # [T - B]: index i of each MTP row; its next token is i + 1
        if rows.numel() == 0:
            return
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32) - 1, 0)
        packed = upload(torch.cat([rows, cu.long()]), device)  # one asynchronous copy (pinned on CUDA)
        rows_d, cu_d = packed[: rows.numel()], packed[rows.numel():].int()
        next_d = rows_d + 1
        embeds = self.model.embed(ids[next_d], image_embeds, None if image_mask is None else image_mask[next_d],
                                  table=self.mtp.embed_tokens)
        attn = AttentionMetadata(slot_mapping=slots[rows_d], cu_seqlens=cu_d, max_seqlen=max(lens) - 1)
        self.mtp.forward(embeds, hidden[rows_d], positions[:, rows_d], attn, self.mtp_kv_cache)

    def carry_prefill(self, rows: slice, hidden: torch.Tensor, tokens: torch.Tensor) -> None:
        """After a prefill: each sequence's last hidden state [N, H] and its sampled token [N]."""
        b = self.batch
        b.carry_hidden[rows, 0] = hidden
        b.carry_tokens[rows, 0] = tokens
        b.carry_accepted[rows] = 0

    # ---------------------------------------------------------------------------------- decode

    def catch_up(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer over the carried rows of rows [0, bs) -> (normed, y), each [bs * (k+1), H]."""
        b, q = self.batch, self.k + 1
        n = b.context_lens[:bs].long()
        m = b.carry_accepted[:bs]
        active = b.active[:bs]
        index = (n - 1 - m)[:, None] + self.positions  # [bs, q] cache indices of the carried rows
        attn = AttentionMetadata(
            slot_mapping=b.slots(bs, index, active[:, None] & (self.positions <= m[:, None])).view(-1),
            block_tables=b.block_tables[:bs], context_lens=torch.where(active, index[:, -1] + 1, 0).int(),
            num_queries=q)
        positions = (index + b.rope_deltas[:bs, None]).view(1, -1).expand(3, -1)
        embeds = self.mtp.embed_tokens[b.carry_tokens[:bs].view(-1)]
        return self.mtp.forward(embeds, b.carry_hidden[:bs].view(bs * q, -1), positions, attn, self.mtp_kv_cache)

    def _draft(self, normed: torch.Tensor) -> torch.Tensor:
        return self.model.ops.argmax(self.mtp.compute_logits(normed))

    def propose(self, bs: int) -> torch.Tensor:
        """-> drafts [bs, k] for rows [0, bs): the MTP layer's greedy chain."""
        b = self.batch
        normed, y = self.catch_up(bs)
        last = torch.arange(bs, device=y.device) * (self.k + 1) + b.carry_accepted[:bs]
        state, draft = y[last], self._draft(normed[last])
        drafts = [draft]
        n, active = b.context_lens[:bs].long(), b.active[:bs]
        for i in range(1, self.k):
            index = n - 1 + i  # [bs]: the MTP index of draft i + 1
            attn = AttentionMetadata(slot_mapping=b.slots(bs, index[:, None], active[:, None]).view(-1),
                                     block_tables=b.block_tables[:bs],
                                     context_lens=torch.where(active, index + 1, 0).int())
            positions = (index + b.rope_deltas[:bs]).expand(3, bs)
            normed, state = self.mtp.forward(self.mtp.embed_tokens[draft], state, positions, attn, self.mtp_kv_cache)
            draft = self._draft(normed)
            drafts.append(draft)
        return torch.stack(drafts, dim=1)

    def verify(self, bs: int, drafts: torch.Tensor, draft_lens: torch.Tensor, do_sample: bool,
               token_masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target over [next token, drafts [bs, k]] of rows [0, bs), of which the first
        draft_lens [bs] are proposed, sampled under token_masks [bs * (k + 1), W] when given ->
        ([bs, k + 2] tokens (see Sampler.verify), the raw logits [bs * (k + 1), V] they were
        sampled from); advances the rows past their new tokens and carries the step into the next
        catch-up."""
        b, q = self.batch, self.k + 1
        n, active = b.context_lens[:bs].long(), b.active[:bs]
        index = n[:, None] + self.positions  # [bs, q]
        attn = AttentionMetadata(slot_mapping=b.slots(bs, index, active[:, None]).view(-1),
                                 block_tables=b.block_tables[:bs],
                                 context_lens=torch.where(active, n + q, 0).int(), num_queries=q)
        positions = (index + b.rope_deltas[:bs, None]).view(1, -1).expand(3, -1)
        tokens = torch.cat([b.next_tokens[:bs, None], drafts], dim=1)
        hidden = self.model.forward(tokens.view(-1), positions, attn, self.kv_caches)  # [bs * q, H]
        logits = self.model.compute_logits(hidden)
        out = self.sampler.verify(logits, drafts, slice(0, bs), do_sample, draft_lens, token_masks)
        count = out[:, 0]
        b.context_lens[:bs] += torch.where(active, count, 0).int()
        b.next_tokens[:bs] = out[:, 1:].gather(1, (count - 1)[:, None])[:, 0]
        if self.mtp is not None:
            b.carry_hidden[:bs] = hidden.view(bs, q, -1)
            b.carry_tokens[:bs] = out[:, 1:]
            b.carry_accepted[:bs] = count - 1
        return out, logits

    def propose_drafts(self, bs: int) -> None:
        """A speculative step's first half: the drafts of rows [0, bs) that its verify checks,
        into batch.verify_drafts [bs, k] and verify_lens [bs]: the host's, or the MTP layer's k
        where a row's draft_lens is -1. Captured per bucket; the host may read them (for the token
        masks of the verified positions) before the verify is launched."""
        b = self.batch
        drafts, lens = b.drafts[:bs], b.draft_lens[:bs]
        if self.mtp is not None:
            from_mtp = lens < 0
            drafts = torch.where(from_mtp[:, None], self.propose(bs), drafts)
            lens = torch.where(from_mtp, self.k, lens)
        b.verify_drafts[:bs] = drafts
        b.verify_lens[:bs] = lens

    def verify_step(self, bs: int, do_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The second half: `verify` of the proposed drafts under the token masks of their
        k + 1 positions (all ones where a row has no constraint). Captured per (bucket, do_sample)."""
        b = self.batch
        masks = b.token_masks[:bs].view(bs * (self.k + 1), -1)
        return self.verify(bs, b.verify_drafts[:bs], b.verify_lens[:bs], do_sample, masks)
