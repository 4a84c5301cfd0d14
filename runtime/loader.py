"""Checkpoint resolution and safetensors loading (never pickle).

Every tensor name and shape the architecture needs is checked before anything is
used; missing, unexpected and mis-shaped tensors are reported together, by name, in one error.
The MTP layer (`model.language_model.layers.{num_layers}.*`) is recognised and loaded only
for speculative decoding (`load_mtp`); its own copies of embed_tokens and shared_head.head are
optional (the main embedding and lm_head stand in for missing ones, as vLLM treats them as
interchangeable).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import GlmImageConfig, ModelConfig, TextConfig, VisionConfig
from .model.glm_image_vision import glm_image_vision_shapes, vq_shapes, vq_unused_names

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
# A diffusers pipeline (GLM-Image) keeps its autoregressive stage in two subfolders; only those
# are fetched (the diffusion transformer, VAE and text encoder are not glmrt's).
PIPELINE_INDEX = "model_index.json"
PIPELINE_MODEL_DIR = "vision_language_encoder"
PIPELINE_PROCESSOR_DIR = "processor"


class CheckpointError(ValueError):
    """The checkpoint's files are missing, corrupt, or do not match its config."""


class HubError(CheckpointError):
    """A Hub id that could not be fetched: offline, unreachable, unknown or gated."""


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a Hub repo id fetched into the HF cache.

    huggingface_hub honours HF_HUB_OFFLINE and HF_HOME; only the files inference needs are
    downloaded (no pickled weights).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model path {model} is a file; expected a checkpoint directory")
    if os.path.isabs(str(model)) or str(model).startswith((".", "~")) or str(model).count("/") != 1:
        raise CheckpointError(f"model {model!r} is neither a local directory nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id=str(model), allow_patterns=[PIPELINE_INDEX]))
        patterns = _CHECKPOINT_PATTERNS
        if (root / PIPELINE_INDEX).is_file():
            patterns = [f"{d}/{p}" for d in (PIPELINE_MODEL_DIR, PIPELINE_PROCESSOR_DIR) for p in _CHECKPOINT_PATTERNS]
        return Path(snapshot_download(repo_id=str(model), allow_patterns=patterns))
    except Exception as exc:
        raise HubError(f"could not resolve Hub model {model!r}: {exc}") from exc


def model_dirs(path: Path) -> tuple[Path, Path]:
    """-> (model directory, processor directory): a pipeline's autoregressive-stage subfolders,
    or `path` itself for both (GLM-OCR, or a GLM-Image directory saved flat)."""
    if (path / PIPELINE_MODEL_DIR / "config.json").is_file():
        return path / PIPELINE_MODEL_DIR, path / PIPELINE_PROCESSOR_DIR
    return path, path


def _text_shapes(c: TextConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {f"{prefix}embed_tokens.weight": (c.vocab_size, h), f"{prefix}norm.weight": (h,)}
    for i in range(c.num_layers):
        p = f"{prefix}layers.{i}."
        for norm in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (rows, h)
            if c.attention_bias:
                shapes[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * c.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, c.intermediate_size)
    return shapes


def _vision_shapes(c: VisionConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    w, i, o, d = c.hidden_size, c.intermediate_size, c.out_hidden_size, c.head_dim
    m, s = c.merger_size, c.spatial_merge_size
    shapes = {
        f"{prefix}patch_embed.proj.weight": (w, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size),
        f"{prefix}patch_embed.proj.bias": (w,),
        f"{prefix}post_layernorm.weight": (w,),
        f"{prefix}downsample.weight": (o, w, s, s),
        f"{prefix}downsample.bias": (o,),
        f"{prefix}merger.proj.weight": (o, o),
        f"{prefix}merger.post_projection_norm.weight": (o,),
        f"{prefix}merger.post_projection_norm.bias": (o,),
        f"{prefix}merger.gate_proj.weight": (m, o),
        f"{prefix}merger.up_proj.weight": (m, o),
        f"{prefix}merger.down_proj.weight": (o, m),
    }
    for b in range(c.depth):
        p = f"{prefix}blocks.{b}."
        shapes.update({
            p + "norm1.weight": (w,), p + "norm2.weight": (w,),
            p + "attn.qkv.weight": (3 * w, w), p + "attn.qkv.bias": (3 * w,),
            p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
            p + "attn.q_norm.weight": (d,), p + "attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, w), p + "mlp.gate_proj.bias": (i,),
            p + "mlp.up_proj.weight": (i, w), p + "mlp.up_proj.bias": (i,),
            p + "mlp.down_proj.weight": (w, i), p + "mlp.down_proj.bias": (w,),
        })
    return shapes


def expected_shapes(config: ModelConfig | GlmImageConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor inference needs (MTP layer excluded)."""
    shapes = _text_shapes(config.text, "model.language_model.")
    if isinstance(config, GlmImageConfig):
        shapes.update(glm_image_vision_shapes(config.vision, "model.visual."))
        shapes.update(vq_shapes(config.vq, "model.vqmodel."))
    else:
        shapes.update(_vision_shapes(config.vision, "model.visual."))
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.text.output_vocab_size, config.text.hidden_size)
    return shapes


def unused_names(config: ModelConfig | GlmImageConfig) -> frozenset[str]:
    """Tensors a checkpoint holds that inference never reads (GLM-Image: the VQ decoder side)."""
    if isinstance(config, GlmImageConfig):
        return vq_unused_names("model.vqmodel.")
    return frozenset()


def _mtp_prefix(config: ModelConfig) -> str:
    return f"model.language_model.layers.{config.text.num_layers}."


# The MTP layer's own copies of the embedding and the output head; either may be absent.
MTP_OPTIONAL = ("embed_tokens.weight", "shared_head.head.weight")


def mtp_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the MTP layer: a decoder layer plus enorm, hnorm, eh_proj,
    shared_head.norm and the optional MTP_OPTIONAL copies."""
    c, prefix = config.text, _mtp_prefix(config)
    h = c.hidden_size
    layer = _text_shapes(dataclasses.replace(c, num_layers=1), "")
    shapes = {prefix + name.removeprefix("layers.0."): shape for name, shape in layer.items() if name.startswith("layers.0.")}
    for name, shape in {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
                        "shared_head.norm.weight": (h,), "embed_tokens.weight": (c.vocab_size, h),
                        "shared_head.head.weight": (c.vocab_size, h)}.items():
        shapes[prefix + name] = shape
    return shapes


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, for a single file or a sharded index."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        return {name: path / shard for name, shard in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickled}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{single}: corrupt or truncated safetensors file ({exc})") from exc


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    mtp_tensor_names: list[str] = field(default_factory=list)  # present on disk, not loaded


class NoMtpLayerError(CheckpointError):
    """Speculative decoding was asked for, but the checkpoint has no MTP layer."""


def load_checkpoint(path: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                    load_mtp: bool = False) -> Checkpoint:
    """Load every expected tensor (with load_mtp, the MTP layer's too) straight to `device` in
    `dtype` after validating names and shapes."""
    files = _tensor_files(path)
    expected = expected_shapes(config)
    mtp_prefix = _mtp_prefix(config)
    mtp_names = sorted(n for n in files if n.startswith(mtp_prefix))
    if load_mtp:
        if config.text.num_mtp_layers < 1 or not mtp_names:
            raise NoMtpLayerError(
                f"checkpoint {path} has no MTP layer ({mtp_prefix}*; config num_nextn_predict_layers="
                f"{config.text.num_mtp_layers}), which speculative decoding drafts with (fine-tunes often drop "
                "it): run without speculation (num_speculative_tokens=0)"
            )
        optional = {mtp_prefix + n for n in MTP_OPTIONAL}
        expected.update({n: s for n, s in mtp_shapes(config).items() if n not in optional or n in files})
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - set(mtp_names) - unused_names(config))

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    wrong_shape: list[str] = []
    weights: dict[str, torch.Tensor] = {}
    # safetensors reads each tensor straight into the target device's memory.
    target = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    for file, names in by_file.items():
        if not file.is_file():
            raise CheckpointError(f"{file.name} is listed in {INDEX_FILE} but missing from {path}")
        try:
            with safe_open(file, framework="pt", device=target) as f:
                for name in names:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        wrong_shape.append(f"{name}: checkpoint {list(shape)} != expected {list(expected[name])}")
                    elif not (missing or unexpected or wrong_shape):
                        weights[name] = f.get_tensor(name).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from exc
    problems = (
        [f"missing tensor {n}" for n in missing]
        + [f"unexpected tensor {n}" for n in unexpected]
        + [f"wrong shape {s}" for s in wrong_shape]
    )
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(problems))
    return Checkpoint(weights=weights, mtp_tensor_names=mtp_names)
