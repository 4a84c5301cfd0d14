"""Incremental detokenization for streaming.

Decoding one token at a time breaks multi-byte characters and merges that depend on their
neighbours, so each step decodes a short window (from `prefix_offset`) and emits only the text
beyond what that window already produced, holding back while the tail is an incomplete
character (U+FFFD).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence


class TokenDecoder:
    """A tokenizer's decode for one skip_special_tokens setting, single tokens cached: the
    detokenizer's prefix window is one token at most steps (a vocabulary's worth of strings at most)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool):
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        self._single: dict[int, str] = {}

    def __call__(self, token_ids: list[int]) -> str:
        if len(token_ids) != 1:
            return self._decode(token_ids)
        text = self._single.get(token_ids[0])
        if text is None:
            text = self._single[token_ids[0]] = self._decode(token_ids)
        return text


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.token_ids: list[int] = []
        self._deltas: list[str] = []  # the text so far, in the pieces `add` returned (no O(text) += per step)
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.token_ids.extend(token_ids)
        prefix = self._decode(self.token_ids[self._prefix_offset: self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._deltas.append(delta)
        return delta

    def extend(self, token_ids: Sequence[int]) -> None:
        """Append tokens without decoding anything: their text comes with `finish` (a request that
        is shown only its final text and has no stop strings to look for)."""
        self.token_ids.extend(token_ids)

    def finish(self) -> str:
        """Flush: the final text is the plain decode of all tokens; return what was not yet emitted."""
        final, text = self._decode(self.token_ids), self.text
        delta = final[len(text):] if final.startswith(text) else ""
        self._deltas = [final]
        return delta

    @property
    def text(self) -> str:
        """The text emitted so far (the plain decode of all tokens once finished)."""
        return "".join(self._deltas)
