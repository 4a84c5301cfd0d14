"""A checkpoint's generation_config.json: the default SamplingParams and extra eos ids.

Defaults follow transformers' generate(): do_sample (default false) false is greedy whatever
temperature says; when sampling, absent temperature / top_k / top_p are transformers' global
defaults 1.0 / 50 / 1.0. repetition_penalty applies in both modes, max_new_tokens becomes
max_tokens. Only the fields below are read (vLLM's generation_config="auto" reads the same
sampling fields); the rest of the file, e.g. pad_token_id or max_length, is ignored.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sampling_params import SamplingParams

FILE_NAME = "generation_config.json"
# transformers' global defaults for a sampling generate() call that the file does not set.
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
# generation_config.json field -> SamplingParams field
_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class GenerationConfig:
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # stop ids on top of config.json's

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "GenerationConfig":
        """Read `path`/generation_config.json; no file means transformers' defaults (greedy)."""
        file = Path(path) / FILE_NAME
        if not file.is_file():
            return cls()
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, str(file))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = FILE_NAME) -> "GenerationConfig":
        """Validate the fields glmrt reads; errors name `where`, the field and its value. null = absent."""
        do_sample = data.get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise ValueError(f"{where}: do_sample must be true or false, got {do_sample!r}")
        values = {}
        for name, param in _FIELDS.items():
            value = data.get(name)
            if value is None:
                continue
            try:
                SamplingParams(**{param: value})  # SamplingParams owns the types and ranges
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: {name}={value!r} is invalid ({exc})") from exc
            values[name] = value
        return cls(do_sample=bool(do_sample), eos_token_ids=_eos_ids(data.get("eos_token_id"), where), **values)

    def sampling_fields(self) -> dict[str, Any]:
        """The SamplingParams fields this file decides (greedy unless do_sample, then its sampling
        values or transformers' defaults; repetition_penalty and max_tokens only if it sets them)."""
        fields: dict[str, Any] = {"temperature": 0.0} if not self.do_sample else {
            name: default if getattr(self, name) is None else getattr(self, name)
            for name, default in _SAMPLING_DEFAULTS.items()
        }
        if self.repetition_penalty is not None:
            fields["repetition_penalty"] = self.repetition_penalty
        if self.max_new_tokens is not None:
            fields["max_tokens"] = self.max_new_tokens
        return fields

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The default SamplingParams; `overrides` (SamplingParams fields) win over the file."""
        return SamplingParams(**{**self.sampling_fields(), **overrides})


def _eos_ids(value: Any, where: str) -> tuple[int, ...]:
    """eos_token_id: null, an int or a list of ints."""
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in ids):
        raise ValueError(f"{where}: eos_token_id must be a non-negative int or a list of them, got {value!r}")
    return tuple(int(i) for i in ids)
