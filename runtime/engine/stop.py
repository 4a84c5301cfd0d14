"""Stop strings: find them in streamed text and hold back what may turn out to be one.

Text arrives in deltas (from the incremental detokenizer). Each delta is searched together with
the last len(stop) - 1 characters before it, so a stop string split over several deltas is found
and the work per step is O(delta), not O(text). The match that ends first wins (ties: the longer
one), which is what feeding the text one character at a time would find, so the result does not
depend on how the text was split into tokens. The text is cut before the stop string, or after
it with include_stop_str_in_output.

While streaming, the last max(len(stop)) - 1 characters are held back: they may be the start of
a stop string whose end has not arrived yet, and once sent they could not be taken back. Nothing
is held back with include_stop_str_in_output, since a cut then never reaches text already seen.
"""
from __future__ import annotations

from typing import Sequence


class StopChecker:
    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.hold = max(map(len, self.stop)) - 1 if self.stop and not include_stop_str_in_output else 0
        self.text = ""  # all text so far; final once a stop string was found
        self.stop_str: str | None = None  # the stop string that ended the text
        self._sent = 0  # characters of `text` handed out by `pop_delta`

    def add(self, delta: str) -> str | None:
        """Append new text; return the stop string if one now ends the text (which is then cut),
        else None. Text added after a stop string was found is ignored."""
        if self.stop_str is not None or not delta:
            return None
        start = len(self.text)
        self.text += delta
        best: tuple[int, int, str] | None = None  # (end, begin, stop string) of the first match
        for s in self.stop:
            i = self.text.find(s, max(0, start - len(s) + 1))  # only matches that end in `delta`
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is None:
            return None
        end, begin, self.stop_str = best
        self.text = self.text[:end if self.include_stop_str_in_output else begin]
        return self.stop_str

    def pop_delta(self, finished: bool) -> str:
        """The text not handed out yet that can no longer be cut: all of it once the request has
        finished or a stop string was found, else all but the last `hold` characters."""
        end = len(self.text) if finished or self.stop_str is not None else max(self._sent, len(self.text) - self.hold)
        delta, self._sent = self.text[self._sent:end], end
        return delta

    @property
    def sent_text(self) -> str:
        """Everything `pop_delta` has handed out: the concatenation of the deltas."""
        return self.text[:self._sent]
