"""Typed views of the checkpoints' config.json: GLM-OCR (`ModelConfig`) and GLM-Image's
autoregressive stage (`GlmImageConfig`), chosen by model_type (`load_config`).

Only the fields inference needs are read. A missing required field or an unknown model_type is
an error naming it: guessing a default here would silently load a different architecture
(the class defaults documented by transformers do not match the real checkpoint).

Both text decoders are the same sandwich-norm GLM layer with 3D M-RoPE; they differ in a few
fields of TextConfig: q/k/v biases, the rotary layout (GLM-OCR: GPT-J interleaved pairs over the
whole head dim; GLM-Image: NeoX half-rotate over the first rotary_dim dims) and the output head
(GLM-Image's lm_head covers only its vision vocabulary).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("glm_ocr", "glm_image")
CONFIG_FILE = "config.json"


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
    rotary_dim: int  # leading dims of each head that rotate (the rest pass through)
    rope_interleaved: bool  # GPT-J pairs (GLM-OCR) or NeoX halves (GLM-Image)
    attention_bias: bool  # q/k/v projections carry biases (GLM-Image)
    output_vocab_size: int  # rows of lm_head: vocab_size, or GLM-Image's vision vocabulary

    @classmethod
    def from_dict(cls, d: dict, glm_image: bool = False) -> "TextConfig":
        """glm_image: GLM-Image's decoder (NeoX partial rotary, attention biases, lm_head over
        vision_vocab_size; transformers falls back to mrope_section [8, 12, 12] when absent)."""
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
        factor = float(rope.get("partial_rotary_factor", 1.0))
        if not glm_image and factor != 1.0:
            raise ConfigError("config.json: text_config partial_rotary_factor != 1.0 is not supported")
        rotary_dim = int(head_dim * factor)
        if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            raise ConfigError(f"config.json: text_config partial_rotary_factor {factor} gives rotary dim {rotary_dim}, "
                              f"which must be even and in (0, head_dim={head_dim}]")
        if glm_image:
            section = tuple(int(s) for s in rope.get("mrope_section") or (8, 12, 12))
        else:
            section = tuple(int(s) for s in _require(rope, "mrope_section", f"{where}.rope_parameters"))
        if len(section) != 3 or sum(section) * 2 != rotary_dim:
            raise ConfigError(
                f"config.json: text_config mrope_section {list(section)} must have 3 entries summing to the rotary "
                f"dim/2 = {rotary_dim // 2}"
            )
        eos = _require(d, "eos_token_id", where)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        vocab = int(_require(d, "vocab_size", where))
        output_vocab = int(_require(d, "vision_vocab_size", where)) if glm_image else vocab
        if not 0 < output_vocab <= vocab:
            raise ConfigError(f"config.json: text_config.vision_vocab_size {output_vocab} must be in (0, vocab_size={vocab}]")
        return cls(
            vocab_size=vocab,
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
            rotary_dim=rotary_dim,
            rope_interleaved=not glm_image,
            # GLM-OCR's text attention has no biases whatever its config says.
            attention_bias=glm_image and bool(_require(d, "attention_bias", where)),
            output_vocab_size=output_vocab,
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
        _check_model_type(d, "glm_ocr")
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
        return cls.from_dict(_read_config(path))


@dataclass(frozen=True)
class GlmImageVisionConfig:
    """GLM-Image's vision encoder: a ViT (LayerNorm, biased qkv, GELU MLP, no rotary) with a learned
    position table of (image_size / patch_size)² entries, resampled to each image's grid."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    in_channels: int
    patch_size: int
    image_size: int
    spatial_merge_size: int
    layer_norm_eps: float
    hidden_act: str
    attention_bias: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * P * P (a single frame: no temporal patch)."""
        return self.in_channels * self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict) -> "GlmImageVisionConfig":
        where = "vision_config"
        hidden, heads = int(_require(d, "hidden_size", where)), int(_require(d, "num_heads", where))
        if hidden % heads:
            raise ConfigError(f"config.json: vision_config.hidden_size {hidden} is not a multiple of num_heads {heads}")
        sizes = {key: d.get(key) for key in ("image_size", "patch_size")}
        for key, value in sizes.items():
            if isinstance(value, (list, tuple)):  # transformers allows [h, w]; the position table is square
                if len(set(value)) != 1:
                    raise ConfigError(f"config.json: vision_config.{key} {value} must be square")
                sizes[key] = value[0]
        act = str(_require(d, "hidden_act", where))
        if act not in ("gelu", "gelu_pytorch_tanh"):
            raise ConfigError(f"config.json: vision_config.hidden_act {act!r} is not supported (gelu, gelu_pytorch_tanh)")
        return cls(
            depth=int(_require(d, "depth", where)),
            hidden_size=hidden,
            num_heads=heads,
            intermediate_size=int(_require(d, "intermediate_size", where)),
            in_channels=int(d.get("in_channels", 3)),
            patch_size=int(_require(sizes, "patch_size", where)),
            image_size=int(_require(sizes, "image_size", where)),
            spatial_merge_size=int(d.get("spatial_merge_size", 1)),
            layer_norm_eps=float(_require(d, "layer_norm_eps", where)),
            hidden_act=act,
            attention_bias=bool(d.get("attention_bias", True)),
        )


@dataclass(frozen=True)
class VqConfig:
    """The VQ tokenizer that turns vision features into codebook ids: a 1x1 conv from
    latent_channels (the vision hidden size) to embed_dim, then the nearest of num_embeddings
    L2-normalized codes."""

    embed_dim: int
    num_embeddings: int
    latent_channels: int

    @classmethod
    def from_dict(cls, d: dict) -> "VqConfig":
        where = "vq_config"
        return cls(
            embed_dim=int(_require(d, "embed_dim", where)),
            num_embeddings=int(_require(d, "num_embeddings", where)),
            latent_channels=int(_require(d, "latent_channels", where)),
        )


@dataclass(frozen=True)
class GlmImageConfig:
    """GLM-Image's autoregressive stage (`vision_language_encoder/config.json`): condition images
    are encoded by the vision model and the VQ tokenizer into input ids; the decoder generates
    ids of the vision vocabulary (the preview grid, then the full grid, then image_end)."""

    text: TextConfig
    vision: GlmImageVisionConfig
    vq: VqConfig
    image_token_id: int  # <|image|>: a placeholder in the prompt, replaced by a VQ code
    image_start_token_id: int  # opens an image's codes; the prompt ends with it
    image_end_token_id: int  # closes an image's codes; the generation ends with it
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "GlmImageConfig":
        _check_model_type(d, "glm_image")
        text = TextConfig.from_dict(_require(d, "text_config", "config"), glm_image=True)
        vision = GlmImageVisionConfig.from_dict(_require(d, "vision_config", "config"))
        vq = VqConfig.from_dict(_require(d, "vq_config", "config"))
        if vq.latent_channels != vision.hidden_size:
            raise ConfigError(
                f"config.json: vq_config.latent_channels {vq.latent_channels} != vision_config.hidden_size {vision.hidden_size}"
            )
        if d.get("tie_word_embeddings") or (d.get("text_config") or {}).get("tie_word_embeddings"):
            raise ConfigError("config.json: tie_word_embeddings is not supported for glm_image (lm_head covers the "
                              "vision vocabulary only)")
        config = cls(
            text=text, vision=vision, vq=vq,
            image_token_id=int(d.get("image_token_id", 167855)),
            image_start_token_id=int(d.get("image_start_token_id", 16384)),
            image_end_token_id=int(d.get("image_end_token_id", 16385)),
        )
        for name in ("image_start_token_id", "image_end_token_id"):
            if not 0 <= getattr(config, name) < text.output_vocab_size:
                raise ConfigError(f"config.json: {name} {getattr(config, name)} is outside the vision vocabulary "
                                  f"[0, {text.output_vocab_size})")
        if vq.num_embeddings > text.output_vocab_size:
            raise ConfigError(f"config.json: vq_config.num_embeddings {vq.num_embeddings} exceeds the vision "
                              f"vocabulary ({text.output_vocab_size})")
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "GlmImageConfig":
        return cls.from_dict(_read_config(path))


def _check_model_type(d: dict, expected: str) -> None:
    model_type = d.get("model_type")
    if model_type != expected:
        raise ConfigError(f"config.json: model_type {model_type!r} is not {expected!r}"
                          + ("" if model_type in SUPPORTED_MODEL_TYPES else f" (supported: {SUPPORTED_MODEL_TYPES})"))


def _read_config(path: str | Path) -> dict:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"no {CONFIG_FILE} in {path}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: not a JSON object")
    return data


def load_config(path: str | Path) -> "ModelConfig | GlmImageConfig":
    """The checkpoint's config, typed by its model_type (the model registry's first step)."""
    data = _read_config(path)
    model_type = data.get("model_type")
    if model_type not in _CONFIG_CLASSES:
        raise ConfigError(
            f"{Path(path) / CONFIG_FILE}: model_type {model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})"
        )
    return _CONFIG_CLASSES[model_type].from_dict(data)


_CONFIG_CLASSES = {"glm_ocr": ModelConfig, "glm_image": GlmImageConfig}
