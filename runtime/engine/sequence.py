"""One request's state inside the engine."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)  # a request is itself: identity, never field-by-field (tensors) equality
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    prompt_positions: torch.Tensor  # [3, P] int64 M-RoPE positions of the prompt
    rope_delta: int  # a token at cache index p has position p + rope_delta on all rows
    sampling_params: SamplingParams
    stop_token_ids: frozenset[int]
    max_total_tokens: int  # prompt + generated may not exceed this (context limit and max_tokens)
    pixel_values: torch.Tensor | None = None  # [N, patch_dim] float32, until the vision pass ran
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    image_embeds: torch.Tensor | None = None  # kept after the vision pass, so a preempted request recomputes no vision
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    seq_id: int = field(default_factory=lambda: next(_ids))
    generator: torch.Generator | None = None  # per-request RNG when a seed is given
    # Distinct ids of prompt + output, in first-seen order, for the repetition penalty: a page
    # prompt is thousands of identical <|image|> ids, so the sampler's per-step upload stays small.
    distinct_token_ids: list[int] = field(default_factory=list)
    _seen: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        for token in self.prompt_token_ids + self.output_token_ids:
            self._note(token)

    def _note(self, token_id: int) -> None:
        if token_id not in self._seen:
            self._seen.add(token_id)
            self.distinct_token_ids.append(token_id)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def positions(self) -> torch.Tensor:
        """[3, num_tokens]: the prompt's M-RoPE positions, then p + rope_delta for generated tokens."""
        p = self.num_prompt_tokens
        gen = torch.arange(p, self.num_tokens) + self.rope_delta
        return torch.cat([self.prompt_positions, gen.expand(3, -1)], dim=1)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._note(token_id)
        if token_id in self.stop_token_ids:
            self.finish("stop")
        elif len(self.output_token_ids) >= self.sampling_params.max_tokens or self.num_tokens >= self.max_total_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.pixel_values = None
        self.image_embeds = None
