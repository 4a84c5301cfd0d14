"""Token selection for rows of the device-resident batch, inside the captured decode step.

Semantics follow transformers' logits processors (and vLLM): a structured-output request's token
bitmask comes first (disallowed tokens -inf), then the repetition penalty covers
prompt + generated tokens (x < 0 -> x * p, else x / p) on fp32 logits, then temperature, top-k,
top-p, then a draw. Temperature 0 is greedy: argmax after the penalty. Greedy and sampled rows
share one step.

top-k keeps every score >= the k-th largest and top-p the smallest set of the largest scores
whose probability reaches top_p (at least one token); both keep ties at their cut together, as
the threshold samplers of FlashInfer and vLLM do (transformers' sort-based top-p splits ties at
the cut by sort order). See glmrt.kernels.sampling.top_k_top_p_filter_ref.

Everything reads per-row state from device tensors of static shape (no host sync, no per-step
upload), so the sampler is captured in the decode graph: a step's tokens are one op, `ops.sample`
or `ops.argmax`, which applies the token mask (all ones for a row without a constraint) and the
repetition penalty as it reads the logits (on the Triton backend one kernel, no vocabulary
sort). The draw is the exponential race argmax(p / E), E = -log(u), taken in the log domain,
argmax(s - log(E)) over the kept scores s, which samples exactly from p = softmax(s). u comes from
a counter-based hash of (row seed, tokens generated so far, vocabulary id), so a request's draws
depend on its own seed and position only: a fixed seed reproduces whatever else is in the batch,
and a preempted request recomputed later continues the same stream.

Speculative decoding verifies k drafted tokens per row in one step (`Sampler.verify`): position j
is sampled as above from the target's logits there, with the drafts before it counted by the
repetition penalty. Drafts come from the MTP layer's argmax, a point mass q = onehot(d), so exact
rejection sampling (Leviathan et al. 2023) accepts d with probability p(d) and, on rejection,
draws from max(p - q, 0), i.e. p without d; greedy rows accept d when it is the argmax. The
output is distributed exactly as plain sampling, and greedy rows give plain greedy's tokens.
"""
from __future__ import annotations

import random

import torch

from glmrt.kernels.sampling import hashed_uniform, top_k_top_p_filter_ref

from ..model.ops import TorchOps

_seed_source = random.Random()


def random_seed() -> int:
    """A seed for a request that gave none (int64 range)."""
    return _seed_source.getrandbits(63)


def request_seed(seed: int | None) -> int:
    """The int64 a request's draws are keyed by: its SamplingParams.seed (any of [-2**63, 2**64),
    the seeds torch.Generator takes; those >= 2**63 by their two's-complement bits), else random."""
    if seed is None:
        return random_seed()
    return seed - 2**64 if seed >= 2**63 else seed


class SamplingState:
    """Per-row sampling state on the device, [R] or [R, V]; rows follow the batch's rows."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.presence = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=device)  # ids seen
        self.penalty = torch.ones(max_rows, dtype=torch.float32, device=device)
        self.temperature = torch.zeros(max_rows, dtype=torch.float32, device=device)  # 0: greedy
        self.top_k = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.top_p = torch.ones(max_rows, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.counters = torch.zeros(max_rows, dtype=torch.int64, device=device)  # tokens drawn so far
        self.vocab_ids = torch.arange(vocab_size, device=device)

    @property
    def row_tensors(self) -> list[torch.Tensor]:
        return [self.presence, self.penalty, self.temperature, self.top_k, self.top_p, self.seeds, self.counters]


class Sampler:
    def __init__(self, ops: TorchOps, state: SamplingState):
        self.ops = ops
        self.state = state

    def _scores(self, logits: torch.Tensor, rows: slice, per_row: int = 1) -> torch.Tensor:
        """Penalised fp32 logits [N * per_row, V] of batch rows `rows` -> the kept scores of each
        (temperature, top-k, top-p; -inf elsewhere), those `ops.sample` draws from; greedy rows
        get finite but unused ones."""
        st = self.state
        temperature = st.temperature[rows].repeat_interleave(per_row)
        scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
        return top_k_top_p_filter_ref(scaled, st.top_k[rows].repeat_interleave(per_row),
                                      st.top_p[rows].repeat_interleave(per_row))

    def __call__(self, logits: torch.Tensor, rows: slice, do_sample: bool,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits [N, V] of the batch rows `rows` -> [N] int64 tokens; records them in the
        presence mask and advances the rows' RNG counters. do_sample=False takes every row's argmax
        (every row greedy), which keeps the common greedy step to the cheapest op.
        token_mask [N, ceil(V / 32)] int32: the structured-output bitmask (1 bits = allowed),
        applied first, as in vLLM, so that the penalty, temperature and draw see allowed tokens only.
        `logits` itself is left unchanged."""
        st = self.state
        # the mask and the penalty are applied as the sampling op reads the (fp32-converted)
        # logits: no copy, no pass of their own, and the raw logits stay intact for logprobs_of
        presence, penalty = st.presence[rows], st.penalty[rows]
        if do_sample:
            tokens = self.ops.sample(logits, st.temperature[rows], st.top_k[rows], st.top_p[rows],
                                     st.seeds[rows], st.counters[rows], presence, penalty, token_mask)
        else:
            tokens = self.ops.argmax(logits, presence, penalty, token_mask)
        st.presence[rows].scatter_(1, tokens[:, None], True)
        st.counters[rows] += 1
        return tokens

    def verify(self, logits: torch.Tensor, drafts: torch.Tensor, rows: slice, do_sample: bool,
               draft_lens: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits [N * (k + 1), V]: the target's at each row's input token and at its k drafts
        [N, k], of which the first draft_lens [N] (default: all) are proposed, under the
        structured-output bitmask token_mask [N * (k + 1), W] of each position (optional; a draft
        it disallows is rejected, as its probability is 0) -> [N, k + 2] int64:
        column 0 the count c of new tokens (accepted drafts + 1), then the tokens (the first c are
        valid: the accepted drafts and one token from the target). Records them in the presence
        mask and advances the RNG counters by c; `logits` itself is left unchanged."""
        st = self.state
        n, k = drafts.shape
        q, vocab = k + 1, logits.shape[-1]
        position = torch.arange(q, device=drafts.device)
        # Position j is penalised for the drafts before it: presence [N, q, V].
        presence = st.presence[rows].repeat_interleave(q, dim=0).view(n, q, vocab)
        for j in range(1, q):
            presence[:, j:].scatter_(2, drafts[:, j - 1, None, None].expand(n, q - j, 1), True)
        logits = logits.to(torch.float32, copy=True)  # the raw logits stay intact for logprobs_of
        if token_mask is not None:
            logits = self.ops.apply_token_bitmask(logits, token_mask)
        logits = self.ops.apply_repetition_penalty(logits, presence.view(n * q, vocab),
                                                   st.penalty[rows].repeat_interleave(q))
        target = self.ops.argmax(logits).view(n, q)  # greedy choice at every position
        accept = drafts == target[:, :k]
        if do_sample:
            scores = self._scores(logits, rows, q).view(n, q, vocab)
            probs = scores.softmax(-1)
            counters = st.counters[rows, None] + position  # [N, q]: the stream of output index j
            seeds = st.seeds[rows, None].expand(n, q)
            race = -torch.log(hashed_uniform(seeds.reshape(-1), counters.reshape(-1), st.vocab_ids)).view(n, q, vocab)
            # The acceptance draw: the hash of an id past the vocabulary, independent of the race.
            u = hashed_uniform(seeds[:, :k].reshape(-1), counters[:, :k].reshape(-1), st.vocab_ids[-1:] + 1).view(n, k)
            sampled = st.temperature[rows] > 0
            accept = torch.where(sampled[:, None], u < probs[:, :k].gather(2, drafts[..., None])[..., 0], accept)
        if draft_lens is not None:
            accept &= position[:k] < draft_lens[:, None]
        num_accepted = accept.int().cumprod(dim=1).sum(dim=1)  # [N]: the longest accepted prefix
        bonus = target.gather(1, num_accepted[:, None])[:, 0]
        if do_sample:
            at = num_accepted[:, None, None].expand(n, 1, vocab)
            s = scores.gather(1, at)[:, 0]  # [N, V]: the kept scores at the first unaccepted position
            rejected = drafts.gather(1, num_accepted.clamp(max=k - 1)[:, None])  # [N, 1]
            # The residual, p without the rejected draft; a row that ran out of drafts samples p,
            # by the same race as ops.sample.
            proposed = num_accepted < (k if draft_lens is None else draft_lens)
            s = s.masked_fill(proposed[:, None] & (st.vocab_ids == rejected), float("-inf"))
            bonus = torch.where(sampled, (s - torch.log(race.gather(1, at)[:, 0])).argmax(-1), bonus)
        tokens = torch.where(position[:k] < num_accepted[:, None], drafts, bonus[:, None])
        tokens = torch.cat([tokens, bonus[:, None]], dim=1)  # [N, q]
        valid = position <= num_accepted[:, None]
        st.presence[rows].scatter_(1, torch.where(valid, tokens, tokens[:, :1]), True)
        st.counters[rows] += num_accepted + 1
        return torch.cat([(num_accepted + 1)[:, None], tokens], dim=1)
