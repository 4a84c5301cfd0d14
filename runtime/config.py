"""Typed view of a GLM-OCR checkpoint's config.json.

Only the fields inference needs are read. A missing required field or an unknown model_type is
an error naming it: guessing a default here would silently load a different architecture
(the class defaults documented by transformers do not match the real checkpoint).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("glm_ocr",)


class ConfigError(ValueError):
    """config.json is missing a field, has a wrong value, or describes another model."""


def _require(section: dict, key: str, where: str) -> Any:
    if key not in section or section[key] is None:
        raise ConfigError(f"config.json: missing field '{where}.{key}'")
    return section[key]


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    num_mtp_layers: int

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        where = "text_config"
        hidden = int(_require(d, "hidden_size", where))
        heads = int(_require(d, "num_attention_heads", where))
        # head_dim is NOT hidden/heads in GLM-OCR (128 vs 96); fall back only when absent.
        head_dim = int(d.get("head_dim") or hidden // heads)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is None:
            raise ConfigError("config.json: missing field 'text_config.rope_parameters.rope_theta'")
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"config.json: text_config rope_type {rope['rope_type']!r} is not supported")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError("config.json: text_config partial_rotary_factor != 1.0 is not supported")
        section = tuple(int(s) for s in _require(rope, "mrope_section", f"{where}.rope_parameters"))
        if len(section) != 3 or sum(section) * 2 != head_dim:
            raise ConfigError(
                f"config.json: text_config mrope_section {list(section)} must have 3 entries summing to head_dim/2 = {head_dim // 2}"
            )
        eos = _require(d, "eos_token_id", where)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return cls(
            vocab_size=int(_require(d, "vocab_size", where)),
            hidden_size=hidden,
            intermediate_size=int(_require(d, "intermediate_size", where)),
            num_layers=int(_require(d, "num_hidden_layers", where)),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(_require(d, "rms_norm_eps", where)),
            rope_theta=float(theta),
            mrope_section=section,  # type: ignore[arg-type]
            max_position_embeddings=int(_require(d, "max_position_embeddings", where)),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            num_mtp_layers=int(d.get("num_nextn_predict_layers") or 0),
        )


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    rms_norm_eps: float
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P (1176 for GLM-OCR)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merger_size(self) -> int:
        """Width of the merger's SwiGLU; transformers derives it as out_hidden_size * in_channels."""
        return self.out_hidden_size * self.in_channels

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        where = "vision_config"
        rope = d.get("rope_parameters") or {}
        for key in ("hidden_size", "out_hidden_size", "intermediate_size"):
            _require(d, key, where)
        return cls(
            depth=int(_require(d, "depth", where)),
            hidden_size=int(d["hidden_size"]),
            num_heads=int(_require(d, "num_heads", where)),
            intermediate_size=int(d["intermediate_size"]),
            out_hidden_size=int(d["out_hidden_size"]),
            in_channels=int(d.get("in_channels", 3)),
            patch_size=int(_require(d, "patch_size", where)),
            temporal_patch_size=int(_require(d, "temporal_patch_size", where)),
            spatial_merge_size=int(_require(d, "spatial_merge_size", where)),
            rms_norm_eps=float(_require(d, "rms_norm_eps", where)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    video_start_token_id: int
    video_end_token_id: int
    tie_word_embeddings: bool  # False for GLM-OCR: lm_head is its own tensor

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})"
            )
        text = TextConfig.from_dict(_require(d, "text_config", "config"))
        vision = VisionConfig.from_dict(_require(d, "vision_config", "config"))
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"config.json: vision_config.out_hidden_size {vision.out_hidden_size} != text_config.hidden_size {text.hidden_size}"
            )
        return cls(
            text=text,
            vision=vision,
            image_token_id=int(_require(d, "image_token_id", "config")),
            image_start_token_id=int(_require(d, "image_start_token_id", "config")),
            image_end_token_id=int(_require(d, "image_end_token_id", "config")),
            video_start_token_id=int(d.get("video_start_token_id", -1)),
            video_end_token_id=int(d.get("video_end_token_id", -1)),
            tie_word_embeddings=bool(
                d.get("tie_word_embeddings") or (d.get("text_config") or {}).get("tie_word_embeddings")
            ),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"no config.json in {path}")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

