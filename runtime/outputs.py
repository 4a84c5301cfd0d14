"""What callers pass in and get back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One OCR request: images (PIL images, paths, bytes or data URIs) and the user prompt text."""

    prompt: str
    images: list[Any] = field(default_factory=list)

    @classmethod
    def coerce(cls, request: "Request | dict") -> "Request":
        if isinstance(request, Request):
            return request
        if isinstance(request, dict):
            unknown = set(request) - {"prompt", "images"}
            if unknown:
                raise ValueError(f"request has unknown keys {sorted(unknown)} (expected 'prompt' and 'images')")
            if not isinstance(request.get("prompt"), str):
                raise ValueError("request['prompt'] must be a string")
            images = request.get("images") or []
            if not isinstance(images, (list, tuple)):
                images = [images]
            return cls(prompt=request["prompt"], images=list(images))
        raise TypeError(f"a request must be a glmrt.Request or a dict, got {type(request).__name__}")


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, including the stop token if one ended the request
    text: str  # detokenized output, without the stop token
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"; None while streaming
    delta_text: str = ""  # streaming: text added by this step
    delta_token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # finish_reason "error": what failed (the step this request was in raised)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
