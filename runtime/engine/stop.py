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
        longest = max(map(len, self.stop), default=0)
        self.hold = longest - 1 if not include_stop_str_in_output else 0
        self._context = max(longest - 1, 0)  # sent characters a stop string may begin in
        self.stop_str: str | None = None  # the stop string that ended the text
        # The text so far is "".join(sent) + unsent: the deltas `pop_delta` handed out (an output
        # refers to this list, never copies it), then what it has not handed out yet.
        self.sent: list[str] = []
        self._unsent = ""
        self._tail = ""  # the last `_context` characters of the sent text

    def add(self, delta: str) -> str | None:
        """Append new text; return the stop string if one now ends the text (which is then cut),
        else None. Text added after a stop string was found is ignored."""
        if self.stop_str is not None or not delta:
            return None
        if not self.stop:
            self._unsent += delta
            return None
        window = self._tail + self._unsent + delta  # all a match ending in `delta` can span
        start = len(window) - len(delta)
        best: tuple[int, int, str] | None = None  # (end, begin, stop string) of the first match
        for s in self.stop:
            i = window.find(s, max(0, start - len(s) + 1))  # only matches that end in `delta`
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is None:
            self._unsent += delta
            return None
        end, begin, self.stop_str = best
        cut = end if self.include_stop_str_in_output else begin
        # Held-back text covers the stop string (or, with it kept, the cut is past the sent text).
        assert cut >= len(self._tail), "a stop string cut into text already sent"
        self._unsent = window[len(self._tail): cut]
        return self.stop_str

    def send(self, text: str) -> str:
        """Append text of a request without stop strings (nothing is held back) and hand it out
        at once: add + pop_delta in one call -> text."""
        assert not self.stop, "a request with stop strings adds its text (add) and hands it out (pop_delta)"
        if text:
            self.sent.append(text)
        return text

    def pop_delta(self, finished: bool) -> str:
        """The text not handed out yet that can no longer be cut: all of it once the request has
        finished or a stop string was found, else all but the last `hold` characters."""
        if not self._unsent:
            return ""
        if finished or self.stop_str is not None or not self.hold:
            delta, self._unsent = self._unsent, ""
        else:
            n = max(0, len(self._unsent) - self.hold)
            delta, self._unsent = self._unsent[:n], self._unsent[n:]
        if delta:
            self.sent.append(delta)
            self._tail = (self._tail + delta)[-self._context:] if self._context else ""
        return delta

    @property
    def sent_text(self) -> str:
        """Everything `pop_delta` has handed out: the concatenation of the deltas (O(text))."""
        return "".join(self.sent)

    @property
    def text(self) -> str:
        """All text so far; final once a stop string was found (O(text))."""
        return self.sent_text + self._unsent
