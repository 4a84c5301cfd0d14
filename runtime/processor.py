"""Prompt side of preprocessing: chat template, tokenizer, `<|image|>` expansion.

`Processor(images=..., prompt=...)` (or `messages=...` for a whole chat) gives what transformers'
Glm46VProcessor (the class AutoProcessor builds for GLM-OCR) gives after `apply_chat_template`: input
ids with each `<|image|>` expanded to grid_h*grid_w/merge² copies, pixel_values [N, 1176] and
image_grid_thw [n, 3]. The image processor backend ("torchvision", transformers' default, or "pil")
is chosen with `Processor.from_pretrained(path, image_backend=...)`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch
from jinja2 import TemplateError, TemplateSyntaxError, ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .image_processor import PREPROCESSOR_CONFIG, PROCESSOR_CONFIG, ImageProcessor, read_config_json

IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"
# processor_class names of GLM-OCR checkpoints (older and current Hub revisions).
PROCESSOR_CLASSES = ("Glm46VProcessor", "GlmOcrProcessor")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def named_special_tokens(config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json's named special tokens (bos_token, image_token, ...) in every form
    transformers writes: at top level (save_pretrained in 5.x, which also lists them under
    `model_specific_special_tokens` and makes `extra_special_tokens` a list of unnamed tokens, as
    the Hub's current files have it), or in an `extra_special_tokens` mapping (earlier files). A
    token written as an AddedToken object ({"content": ...}) becomes its text."""
    named = dict(config)
    for key in ("model_specific_special_tokens", "extra_special_tokens"):
        if isinstance(config.get(key), dict):
            named.update(config[key])
    return {key: value.get("content") if isinstance(value, dict) and "content" in value else value
            for key, value in named.items()}


def load_tokenizer(path: Path) -> Tokenizer:
    """The checkpoint's tokenizer.json; a missing or unparsable file is an error naming it."""
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"no tokenizer.json in {path}")
    try:
        return Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception for unparsable files
        raise ValueError(f"{tokenizer_file}: cannot load the tokenizer: {_one_line(exc)}") from exc


class ChatTemplate:
    """A checkpoint's chat template rendered in a sandbox, with the globals transformers provides.

    `origin` names where the template came from, for error messages.
    """

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str = "chat template"):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.origin = origin
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as exc:
            raise ValueError(
                f"{origin}: chat template syntax error at line {exc.lineno}: {_one_line(exc)}"
            ) from exc
        self._special_tokens = special_tokens

    @classmethod
    def from_pretrained(cls, path: Path) -> "ChatTemplate":
        config_file = path / "tokenizer_config.json"
        config = read_config_json(config_file) or {}
        special = {k: v for k, v in named_special_tokens(config).items() if k.endswith("_token") and isinstance(v, str)}
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), special, str(jinja_file))
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            raise ValueError(f"no chat template in {path} (chat_template.jinja or tokenizer_config.json)")
        return cls(source, special, f"{config_file} (chat_template)")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self._special_tokens,
            )
        except Exception as exc:  # raise_exception(), undefined filters/tests, type errors inside the template
            raise ValueError(
                f"chat template {self.origin} failed to render: {type(exc).__name__}: {_one_line(exc)}"
            ) from exc


@dataclass
class ProcessedPrompt:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # float32 [N, patch_dim]; uint8 [N, 3*P*P] with normalize=False
    image_grid_thw: torch.Tensor | None  # int64 [n, 3]


class Processor:
    """Tokenizer + chat template + image processor of one checkpoint."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate, image_processor: ImageProcessor):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_processor = image_processor
        image_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if image_id is None:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token")
        self.image_token_id = image_id
        self.video_token_id = tokenizer.token_to_id(VIDEO_TOKEN)  # None if the tokenizer has no video token

    @classmethod
    def from_pretrained(cls, path: str | Path, image_backend: str = "torchvision") -> "Processor":
        """Tokenizer, chat template and image processor of a checkpoint directory.

        `image_backend`: "torchvision" (what transformers' AutoProcessor uses when torchvision is
        installed, as with vLLM and SGLang) or "pil" (transformers without torchvision).
        """
        path = Path(path)
        for config_file in (path / PROCESSOR_CONFIG, path / PREPROCESSOR_CONFIG):
            name = (read_config_json(config_file) or {}).get("processor_class")
            if name is not None and name not in PROCESSOR_CLASSES:
                raise ValueError(
                    f"{config_file}: processor_class={name!r} is not a GLM-OCR processor (expected one of {PROCESSOR_CLASSES})"
                )
        return cls(load_tokenizer(path), ChatTemplate.from_pretrained(path), ImageProcessor.from_pretrained(path, image_backend))

    @staticmethod
    def messages(num_images: int, prompt: str) -> list[dict]:
        """One user turn: the images first, then the text (the model card's order)."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]

    def __call__(self, images: Sequence[Any] = (), prompt: str | None = None,
                 messages: list[dict] | None = None, normalize: bool = True) -> ProcessedPrompt:
        """Render `prompt` as one user turn with the images first, or `messages` (transformers' chat
        format, {"type": "image"} parts filled by `images` in order) exactly as given; then tokenize
        and expand each `<|image|>` to its image's token count. normalize=False keeps the pixels
        raw (ImageProcessor.normalize_patches finishes them on the device)."""
        if messages is None:
            messages = self.messages(len(images), prompt or "")
        elif prompt is not None:
            raise ValueError("pass either prompt or messages to the processor, not both")
        text = self.chat_template.render(messages)
        if VIDEO_TOKEN in text:  # transformers' processor raises too: video tokens without videos
            raise ValueError(f"the rendered prompt contains {VIDEO_TOKEN}; glmrt takes images only, not videos")
        # encode_batch, unlike encode, releases the GIL: a long prompt tokenized on a worker thread
        # (the server's) never holds up the event loop
        ids = self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        n_slots = ids.count(self.image_token_id)
        if n_slots != len(images):
            raise ValueError(f"the rendered prompt has {n_slots} {IMAGE_TOKEN} slots for {len(images)} images")
        if not images:
            return ProcessedPrompt(ids, None, None)
        vision = self.image_processor(list(images), normalize=normalize)
        grid = vision["image_grid_thw"]
        merge = self.image_processor.merge_size**2
        counts = iter((grid.prod(-1) // merge).tolist())
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        return ProcessedPrompt(expanded, vision["pixel_values"], grid)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
