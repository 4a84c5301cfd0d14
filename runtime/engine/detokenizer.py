"""Incremental detokenization for streaming.

Decoding one token at a time breaks multi-byte characters and merges that depend on their
neighbours. With a tokenizer's own decoder (`TokenDecoder`), the text comes from tokenizers'
DecodeStream, which keeps that state in Rust and yields the text each token completes. Any other
decode function gets the window method: each step decodes a short window (from `prefix_offset`)
and emits only the text beyond what that window already produced, holding back while the tail is
an incomplete character (U+FFFD). Either way the final text is the plain decode of all tokens.

A byte-level decoder (GLM's, GPT-2's) decodes the concatenation of its tokens' bytes as UTF-8, so
after text that ends in a whole character, a token whose own bytes are whole characters adds
exactly its own text: that text is looked up once per tokenizer and token, and the stream is
stepped only for the rest (split characters, tokens that decode to U+FFFD, the tokens after them
until a character completes).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from tokenizers.decoders import ByteLevel, DecodeStream

# What tokenizers raises when a stream's text so far stops being a prefix of its text with the next
# token (a tokenizer that rewrites earlier text): the stream starts over from that token (as vLLM).
INVALID_PREFIX = "Invalid prefix encountered"
_UNSEEN = object()  # a token not yet in TokenDecoder.texts


class TokenDecoder:
    """A tokenizer's decode for one skip_special_tokens setting, and its token streams."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)

    def __call__(self, token_ids: Sequence[int]) -> str:
        return self._decode(list(token_ids))

    def stream(self) -> DecodeStream:
        return DecodeStream(skip_special_tokens=self.skip_special_tokens)

    @functools.cached_property
    def texts(self) -> dict[int, str | None] | None:
        """token -> the text it adds after a whole character, None where that depends on its
        neighbours (its bytes split a character, or it decodes to U+FFFD); filled as tokens are
        first seen, shared by every request. None: the decoder is not byte-level."""
        return {} if isinstance(getattr(self.tokenizer, "decoder", None), ByteLevel) else None

    def token_text(self, token: int) -> str | None:
        """The `texts` entry of `token`, decoded and kept on first use."""
        text = self._decode([token])
        self.texts[token] = text = None if "\ufffd" in text else text
        return text


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._stream = decode.stream() if isinstance(decode, TokenDecoder) else None
        self._tokenizer = decode.tokenizer if self._stream is not None else None
        self._texts = decode.texts if self._stream is not None else None
        self._whole = True  # the text so far ends in a whole character (the stream emitted all it was given)
        self.token_ids: list[int] = []
        self._deltas: list[str] = []  # the text so far, in the pieces `add` returned (no O(text) += per step)
        self._prefix_offset = 0  # the window method's
        self._read_offset = 0

    def add_token(self, token: int) -> str:
        """Append one token; return the text it completed (possibly empty)."""
        self.token_ids.append(token)
        if self._stream is None:
            delta = self._window()
        else:
            # After a whole character, a token with text of its own adds just that; the stream, left
            # behind at a whole character, decodes what comes next as if it had seen these tokens.
            delta = self._texts.get(token, _UNSEEN) if self._whole and self._texts is not None else None
            if delta is _UNSEEN:
                delta = self._decode.token_text(token)
            if delta is None:
                delta = self._step_stream(token)
        if delta:
            self._deltas.append(delta)
        return delta

    def _step_stream(self, token: int) -> str:
        try:
            delta = self._stream.step(self._tokenizer, token) or ""
        except Exception as exc:
            if not str(exc).startswith(INVALID_PREFIX):
                raise
            self._stream = self._decode.stream()
            delta = self._stream.step(self._tokenizer, token) or ""
        self._whole = bool(delta)  # no text: it holds back bytes (or a skipped special token)
        return delta

    def _window(self) -> str:
        prefix = self._decode(self.token_ids[self._prefix_offset: self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return full[len(prefix):]

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
