"""One request's host-side state inside the engine."""
from __future__ import annotations

import enum
from dataclasses import InitVar, dataclass, field
from typing import Any

import numpy as np
import torch

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    PREFILLING = "prefilling"  # holds KV blocks, its prompt partly computed (chunked prefill), no row yet
    RUNNING = "running"  # holds KV blocks and a row of the device-resident batch
    DRAINING = "draining"  # holds KV blocks; its last token is scheduled, its result not yet read
    FINISHED = "finished"


FINISHED = SequenceStatus.FINISHED  # for the per-row checks of the engine's hot loops (`is FINISHED`)


@dataclass(eq=False)  # a request is itself: identity, never field-by-field (tensors) equality
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    prompt_positions: InitVar[torch.Tensor]  # [3, P] int64 M-RoPE positions of the prompt (kept in _prompt_rows)
    rope_delta: int  # a token at cache index p has position p + rope_delta on all rows
    sampling_params: SamplingParams
    stop_token_ids: frozenset[int]
    # prompt + generated may not exceed this: min(the context limit, prompt + max_tokens), the one
    # length limit the engine checks (set where the Sequence is made; sampling_params is not read)
    max_total_tokens: int
    seed: int  # the per-request RNG stream: the user's seed, or a random one
    pixel_values: torch.Tensor | None = None  # uint8 [N, 3*P*P] raw patch pixels, until the vision pass ran
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)  # tokens read back so far
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why a request failed (finish_reason "error")
    # Steps scheduled but not yet read back: with overlapped steps the host schedules step N+1
    # before it has read step N's tokens. Each yields at least one token (up to k + 1 with k
    # speculative tokens), so outputs + num_pending is what the sequence is sure to reach.
    num_pending: int = 0
    # Cache slots reserved by the launched steps: the tokens whose K/V they write (its prefill
    # chunks' tokens, one per decode step), exact without speculation, an upper bound with it
    # (each decode step reserves room for k + 1; reading its result gives back the rest).
    num_reserved: int = 0
    row: int | None = None  # its row in the device-resident batch while RUNNING
    # Set when a prefill shared with other requests failed: it is prefilled again in a step of
    # its own, so that a request that breaks a step fails alone.
    prefill_alone: bool = False
    # Set when a step it shared failed for a reason no single request could be blamed for: it
    # runs only beside sequences of the same group, half of the failed step's rows per group, so
    # a row that breaks every step it is in is narrowed down and fails alone (Scheduler.isolate).
    isolation_group: int | None = None
    # The llguidance matcher of a constrained request (json_schema, regex, ...), advanced by every
    # token read back; None when unconstrained.
    grammar: Any = None
    # Where its speculative drafts come from (drafters.Drafter); None: it does not draft.
    drafter: Any = None
    # GLM-Image: [3, L] positions of generated tokens, precomputed from the target grids
    # (generated token j is at column min(j, L - 1)); None: p + rope_delta.
    decode_positions: torch.Tensor | None = None
    # SamplingParams.logprobs set: one entry per output token ({token id: log-probability}, the
    # token's and its step's top N), appended as tokens are read back; None when not asked for.
    logprobs: list[dict[int, float]] | None = None
    # int64 [4, P]: the prompt's ids (row 0) and M-RoPE positions (rows 1-3), made with the
    # Sequence (on the preprocessing worker, not in a step) and sliced by its prefill chunks.
    _prompt_rows: np.ndarray = field(init=False, repr=False)

    def __post_init__(self, prompt_positions: torch.Tensor) -> None:
        self._prompt_rows = np.empty((4, len(self.prompt_token_ids)), dtype=np.int64)
        self._prompt_rows[0] = self.prompt_token_ids
        self._prompt_rows[1:] = prompt_positions.numpy()

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens known on the host."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_unencoded_patches(self) -> int:
        """Vision patches its prefill still has to encode (0 once its images are encoded)."""
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def can_schedule_more(self) -> bool:
        """Whether one more step may be scheduled (max_tokens and the context limit, counting one
        token per step already scheduled); stop tokens are only known once read back."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending < self.max_total_tokens

    def fill_placeholders(self, placeholder: int, ids: list[int]) -> None:
        """Write `ids` into the prompt in place of its `placeholder` tokens, in order (GLM-Image's
        condition image codes)."""
        slots = [i for i, t in enumerate(self.prompt_token_ids) if t == placeholder]
        if len(slots) != len(ids):
            raise ValueError(f"{len(slots)} <|image|> tokens but {len(ids)} condition image codes")
        for i, token in zip(slots, ids):
            self.prompt_token_ids[i] = token
        self._prompt_rows[0, slots] = ids

    def input_array(self, start: int, end: int) -> np.ndarray:
        """int64 [4, end - start]: the ids (row 0) and M-RoPE positions (rows 1-3) at cache indices
        [start, end): the prompt's, then those of generated tokens (p + rope_delta at cache index
        p, or their decode_positions columns)."""
        p = self.num_prompt_tokens
        if end <= p:
            return self._prompt_rows[:, start: end]
        generated = np.arange(max(start, p), end)
        rows = np.empty((4, len(generated)), dtype=np.int64)
        rows[0] = self.output_token_ids[max(start - p, 0): end - p]
        if self.decode_positions is not None:
            rows[1:] = self.decode_positions.numpy()[:, np.minimum(generated - p, self.decode_positions.shape[1] - 1)]
        else:
            rows[1:] = generated + self.rope_delta
        return np.concatenate([self._prompt_rows[:, start: p], rows], axis=1) if start < p else rows

    def append_token(self, token_id: int) -> None:
        """Record a token read back from the device and finish the request if it ends here.
        As in vLLM, the length limit is checked first: a stop token that is also the
        max_tokens-th token ends the request with "length"."""
        outputs = self.output_token_ids
        outputs.append(token_id)
        if len(self.prompt_token_ids) + len(outputs) >= self.max_total_tokens:
            self.finish("length")
        elif token_id in self.stop_token_ids:
            self.finish("stop")

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.pixel_values = None
