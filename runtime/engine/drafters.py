"""Draft tokens proposed on the host, for speculative decoding to verify (spec_decode.py).

Two lookups, prompt-lookup style, both O(new tokens) per step:
- `ReferenceLookup`: a reference text the output is expected to repeat for the most part (the PDF
  text layer of a region being read). A cursor follows the reference while the output matches
  it; after a mismatch it re-syncs on the longest tail of the output (MAX_NGRAM down to
  MIN_NGRAM tokens) found in the reference, preferring the first occurrence after where it lost
  track.
- `OutputLookup`: the request's own output so far. The longest tail (MAX_NGRAM down to
  MIN_NGRAM tokens) seen earlier proposes what followed its latest earlier occurrence; table
  and formula output repeats its own structure (`<td>`, `\\\\`, `&`).

A request's `Drafter` tries its sources in order and says which one proposed. Drafts never change
the output: the target verifies them (greedy token-identical, sampled exact).
"""
from __future__ import annotations

from bisect import bisect_left

MAX_NGRAM = 4  # the longest output tail matched
MIN_NGRAM = 2  # a single token (a space, a common word) recurs too often to say where the text goes on


class ReferenceLookup:
    def __init__(self, reference: list[int]):
        self.reference = reference
        # n-gram -> its start positions in the reference, ascending, for n = MIN_NGRAM .. MAX_NGRAM
        self.starts: dict[tuple[int, ...], list[int]] = {}
        for n in range(MIN_NGRAM, MAX_NGRAM + 1):
            for i in range(len(reference) - n + 1):
                self.starts.setdefault(tuple(reference[i: i + n]), []).append(i)
        self.cursor: int | None = 0  # reference position the next output token should match; None: lost
        self.last_cursor = 0  # where it was last in step, to re-sync forward from
        self.seen = 0  # output tokens followed so far

    def propose(self, output: list[int], k: int) -> list[int]:
        """Follow the tokens output since the last call -> up to k tokens the reference continues with."""
        for token in output[self.seen:]:
            if self.cursor is not None and self.cursor < len(self.reference) and self.reference[self.cursor] == token:
                self.cursor += 1
                self.last_cursor = self.cursor
            else:
                self.cursor = None
        self.seen = len(output)
        if self.cursor is None:
            self.cursor = self._resync(output)
        return [] if self.cursor is None else self.reference[self.cursor: self.cursor + k]

    def _resync(self, output: list[int]) -> int | None:
        """-> the reference position after the longest tail of `output` it holds (the first such
        occurrence at or after last_cursor, else the first), or None."""
        for n in range(min(MAX_NGRAM, len(output)), MIN_NGRAM - 1, -1):
            starts = self.starts.get(tuple(output[-n:]))
            if starts:
                i = bisect_left(starts, self.last_cursor - n)
                return (starts[i] if i < len(starts) else starts[0]) + n
        return None


class OutputLookup:
    def __init__(self):
        self.continuation: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest earlier occurrence's successor is
        self.seen = 0

    def propose(self, output: list[int], k: int) -> list[int]:
        """Index the tokens output since the last call -> up to k tokens that followed the longest
        tail of `output` seen before."""
        for i in range(max(self.seen, 1), len(output)):  # output[i] follows the n-grams ending at i - 1
            for n in range(MIN_NGRAM, min(MAX_NGRAM, i) + 1):
                self.continuation[tuple(output[i - n: i])] = i
        self.seen = len(output)
        for n in range(min(MAX_NGRAM, len(output)), MIN_NGRAM - 1, -1):
            start = self.continuation.get(tuple(output[-n:]))
            if start is not None:
                return output[start: start + k]
        return []


class Drafter:
    """One request's draft sources, in order of preference: "text" (its reference), "ngram" (its
    output), then "mtp" (the MTP layer drafts on the device when no host source proposes)."""

    def __init__(self, sources: tuple[str, ...], reference: list[int] | None = None):
        self.lookups = []
        if "text" in sources and reference:
            self.lookups.append(("text", ReferenceLookup(reference)))
        if "ngram" in sources:
            self.lookups.append(("ngram", OutputLookup()))
        self.mtp = "mtp" in sources

    @property
    def on_host(self) -> bool:
        """Whether it proposes from the output so far (which must then be read before each step)."""
        return bool(self.lookups)

    def propose(self, output: list[int], k: int) -> tuple[str, list[int]] | None:
        """-> (source, up to k draft tokens) after `output`, or None to let the MTP layer draft.
        Every lookup follows every token, whichever proposes."""
        proposals = [(source, lookup.propose(output, k)) for source, lookup in self.lookups]
        for source, drafts in proposals:
            if drafts:
                return source, drafts
        return None if self.mtp else ("off", [])
