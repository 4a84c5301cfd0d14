"""What callers pass in and get back."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

# The content parts of transformers' chat format that a request can carry, with their keys.
# An image part holds no image: request['images'] fill the image parts in order.
PART_KEYS = {"text": {"type", "text"}, "image": {"type"}}
PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")


@dataclass
class Request:
    """One request: images (PIL images, paths, bytes or data URIs) and exactly one of
    - `prompt`: the user text, rendered as one user turn with the images first (the model card's layout);
    - `messages`: chat messages in transformers' format, {"role": str, "content": str | [parts]} with
      parts {"type": "text", "text": str} or {"type": "image"}, rendered with the chat template in
      the order given; `images` fill the image parts in order;
    - `prompt_token_ids`: a raw prompt, no chat template and no images.

    Checked on construction; errors name the field as in the dict form (request['messages'][0]...).
    """

    prompt: str | None = None
    images: list[Any] = field(default_factory=list)
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        given = [name for name in PROMPT_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a request takes exactly one of {PROMPT_FIELDS}, got {given or 'none'}")
        if self.images is None:
            self.images = []
        self.images = list(self.images) if isinstance(self.images, (list, tuple)) else [self.images]
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(f"request['prompt'] must be a string, got {type(self.prompt).__name__}")
        if self.messages is not None:
            n_parts = _image_parts(self.messages)
            if n_parts != len(self.images):
                raise ValueError(
                    f"request['messages'] has {n_parts} image parts but request['images'] has {len(self.images)} images"
                )
        if self.prompt_token_ids is not None:
            self.prompt_token_ids = _token_ids(self.prompt_token_ids)
            if self.images:
                raise ValueError("request['prompt_token_ids'] is a raw text prompt: it takes no request['images']")

    @classmethod
    def coerce(cls, request: "Request | dict") -> "Request":
        if isinstance(request, Request):
            return request
        if isinstance(request, dict):
            unknown = set(request) - set(cls.__dataclass_fields__)
            if unknown:
                expected = f"'images' and one of {PROMPT_FIELDS}"
                raise ValueError(f"request has unknown keys {sorted(unknown, key=str)} (expected {expected})")
            return cls(**request)
        raise TypeError(f"a request must be a glmrt.Request or a dict, got {type(request).__name__}")


def _image_parts(messages: Any) -> int:
    """Checks chat messages; -> the number of image parts."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"request['messages'] must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("request['messages'] must not be empty")
    count = 0
    for i, message in enumerate(messages):
        where = f"request['messages'][{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        unknown = set(message) - {"role", "content"}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown, key=str)} (expected 'role' and 'content')")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}['role'] must be a non-empty string, got {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"{where}['content'] must be a string or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            at = f"{where}['content'][{j}]"
            if not isinstance(part, dict):
                raise ValueError(f"{at} must be a dict with a 'type', got {type(part).__name__}")
            kind = part.get("type")
            if kind not in PART_KEYS:
                raise ValueError(f"{at}['type'] must be 'text' or 'image', got {kind!r}")
            unknown = set(part) - PART_KEYS[kind]
            if unknown:
                hint = "; images go in request['images'], in part order" if kind == "image" else ""
                raise ValueError(
                    f"{at} has unknown keys {sorted(unknown, key=str)} (allowed: {sorted(PART_KEYS[kind])}{hint})"
                )
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{at}['text'] must be a string, got {type(part.get('text')).__name__}")
            count += kind == "image"
    return count


def _token_ids(ids: Any) -> list[int]:
    """A raw prompt: a non-empty list of ints (numpy ints too, never bools); the engine checks the range."""
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"request['prompt_token_ids'] must be a list of ints, got {type(ids).__name__}")
    if not ids:
        raise ValueError("request['prompt_token_ids'] must not be empty")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise ValueError(f"request['prompt_token_ids'][{i}] must be an int, got {type(token).__name__} {token!r}")
    return [int(t) for t in ids]


class Prefix:
    """What an engine output holds in place of copies of its request's token ids and text: the two
    lists the engine keeps growing for the request (its tokens, the text deltas handed out) and how
    long each was when the output was made, so that making one costs the same whatever the length
    of the output. RequestOutput makes token_ids and text from it when each is first read."""

    __slots__ = ("tokens", "num_tokens", "deltas", "num_deltas")

    def __init__(self, tokens: list[int], deltas: list[str]):
        self.tokens, self.num_tokens, self.deltas, self.num_deltas = tokens, len(tokens), deltas, len(deltas)


class _MadeOnRead:
    """A RequestOutput field that may be given a Prefix: its value, make(prefix), is made on the
    first read and kept (so a caller's changes to it stick, as with a plain field)."""

    def __init__(self, make: Callable[[Prefix], Any]):
        self.make = make

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:  # no class-level default: the dataclass field stays required
            raise AttributeError(self.name)
        value = obj.__dict__[self.name]
        if isinstance(value, Prefix):
            value = obj.__dict__[self.name] = self.make(value)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    # Generated tokens, including the stop token or the token that completed the stop string.
    # (The engine's outputs make it, and `text`, when first read: O(1) per step while streaming.)
    token_ids: list[int] = _MadeOnRead(lambda p: p.tokens[: p.num_tokens])
    # Detokenized output without the stop token, cut before the stop string (after it with
    # include_stop_str_in_output); while streaming, the text sent so far (all deltas joined).
    text: str = _MadeOnRead(lambda p: "".join(p.deltas[: p.num_deltas]))
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"; None while streaming
    delta_text: str = ""  # streaming: text added by this step
    delta_token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # finish_reason "error": what failed (the step this request was in raised)
    # finish_reason "stop": the stop string that ended the request, or the token id from
    # SamplingParams.stop_token_ids that did; None for an eos token and every other ending.
    stop_reason: int | str | None = None
    # SamplingParams.logprobs = N: entry i is for token_ids[i], {token id: log-probability} under the
    # model's raw distribution (before the structured-output mask, the repetition penalty and
    # temperature) of the N most likely tokens, most likely first, then of token_ids[i] itself
    # unless it is one of them (N or N + 1 entries).
    # The request's own list, grown in place as tokens are read (as vLLM's): an output read later may
    # already hold entries past its token_ids. None when not asked for.
    logprobs: list[dict[int, float]] | None = None
    # time.monotonic() when the engine read the request's first generated token back (None before):
    # a final_only request's time to first token.
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def made(cls, fields: dict[str, Any]) -> RequestOutput:
        """An output from a new dict of every field (the engine's, once per request and step),
        which it adopts as it is, Prefix values included, without the per-field calls of __init__."""
        out = cls.__new__(cls)
        out.__dict__ = fields
        return out


class IncompleteOutputError(Exception):
    """A constrained output (LLM.ocr with a schema) that did not end with finish_reason "stop", so
    its text is not complete JSON: cut at the token limit ("length"), or its step failed ("error").
    `output` is the RequestOutput, text as far as it got."""

    def __init__(self, output: RequestOutput):
        self.output = output
        why = {"length": "; raise max_tokens (or max_model_len, when that is the limit)",
               "error": f": {output.error}"}.get(output.finish_reason, "")
        super().__init__(f"the output is incomplete JSON (finish_reason {output.finish_reason!r} after "
                         f"{len(output.token_ids)} tokens){why}")
