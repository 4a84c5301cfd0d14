"""RequestOutput.logprobs entries -> OpenAI's `logprobs` objects: chat's
{"content": [{token, logprob, bytes, top_logprobs}]} and the legacy completions'
{tokens, token_logprobs, top_logprobs, text_offset}.

A token's string is its text decoded alone (a special token's is its content, as vLLM shows it)
and its bytes are exactly the bytes it stands for, so the bytes of a response's tokens join up to
its text's UTF-8 (a token that ends inside a multi-byte character shows as U+FFFD in its string;
special tokens that the text skips and text cut at a stop string aside).
"""
from __future__ import annotations

from tokenizers import Tokenizer


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class TokenTexts:
    """Token id -> (its string, its bytes), cached: each id is worked out once per server."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._bytes = _byte_decoder()
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            piece = self._added.get(token_id)
            if piece is not None:
                data = piece.encode()
            else:
                piece = self.tokenizer.id_to_token(token_id) or ""
                if all(c in self._bytes for c in piece):  # a byte-level vocabulary string
                    data = bytes(self._bytes[c] for c in piece)
                else:
                    data = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
            found = self._cache[token_id] = (data.decode("utf-8", errors="replace"), data)
        return found

    def _item(self, token_id: int, logprob: float) -> dict:
        text, data = self(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    def chat(self, token_ids: list[int], entries: list[dict[int, float]], top: int) -> dict:
        """The chat `logprobs` of tokens `token_ids` with their RequestOutput.logprobs `entries`,
        `top` alternatives each (the request's top_logprobs)."""
        return {"content": [{**self._item(t, entry[t]),
                             "top_logprobs": [self._item(i, lp) for i, lp in list(entry.items())[:top]]}
                            for t, entry in zip(token_ids, entries)]}

    def completion(self, token_ids: list[int], entries: list[dict[int, float]], top: int, offset: int) -> dict:
        """The legacy completions `logprobs` (`top` the request's logprobs; each top_logprobs map
        also holds the token itself, as vLLM's), text offsets counted from `offset`."""
        tokens, offsets = [], []
        for t in token_ids:
            offsets.append(offset)
            tokens.append(self(t)[0])
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [entry[t] for t, entry in zip(token_ids, entries)],
                "top_logprobs": [{self(i)[0]: lp for i, lp in entry.items()} if top else None for entry in entries],
                "text_offset": offsets}
