"""GLM-Image's vision encoder and VQ tokenizer: condition images -> one codebook id per patch.

The encoder is a pre-norm ViT (LayerNorm, biased qkv, GELU MLP, no rotary, no final norm) whose
learned position table of (image_size / patch_size)² entries is resampled bilinearly to each
image's patch grid. The tokenizer projects every patch's feature with a 1x1 conv and picks the
nearest L2-normalized codebook entry. All images of a call are packed into one varlen sequence.

Each op is the one transformers runs, in its order and dtype (the table resampled in fp32 then
cast; the distances as |z|² + |e|² - 2 z·e on normalized vectors, image by image): near-tied
distances are common, and argmin follows the last bit, so the codes match only if the bits do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import GlmImageVisionConfig, VqConfig
from .ops import TorchOps
from .positions import vision_cu_seqlens, vision_positions
from .transfer import upload

Grids = list[tuple[int, int, int]]


def glm_image_vision_shapes(config: GlmImageVisionConfig, prefix: str = "model.visual.") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every vision-encoder tensor inference reads."""
    c = config
    w, i, p = c.hidden_size, c.intermediate_size, c.patch_size
    shapes = {
        prefix + "patch_embed.proj.weight": (w, c.in_channels, p, p),
        prefix + "patch_embed.proj.bias": (w,),
        prefix + "embeddings.position_embedding.weight": ((c.image_size // p) ** 2, w),
    }
    for b in range(c.depth):
        block = f"{prefix}blocks.{b}."
        for norm in ("norm1", "norm2"):
            shapes[f"{block}{norm}.weight"] = shapes[f"{block}{norm}.bias"] = (w,)
        shapes[block + "attn.qkv.weight"] = (3 * w, w)
        shapes[block + "attn.proj.weight"] = (w, w)
        if c.attention_bias:
            shapes[block + "attn.qkv.bias"] = (3 * w,)
            shapes[block + "attn.proj.bias"] = (w,)
        shapes.update({block + "mlp.fc1.weight": (i, w), block + "mlp.fc1.bias": (i,),
                       block + "mlp.fc2.weight": (w, i), block + "mlp.fc2.bias": (w,)})
    return shapes


def vq_shapes(config: VqConfig, prefix: str = "model.vqmodel.") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every VQ tensor encoding reads (see vq_unused_names for the rest)."""
    e = config.embed_dim
    return {
        prefix + "quant_conv.weight": (e, config.latent_channels, 1, 1),
        prefix + "quant_conv.bias": (e,),
        prefix + "quantize.embedding.weight": (config.num_embeddings, e),
    }


def vq_unused_names(prefix: str = "model.vqmodel.") -> frozenset[str]:
    """Tensors checkpoints carry that encoding never reads: post_quant_conv maps codes back to
    features for decoding, which GLM-Image's diffusion decoder does, not the AR stage."""
    return frozenset({prefix + "post_quant_conv.weight", prefix + "post_quant_conv.bias"})


def _check_grids(image_grid_thw: Grids, rows: int, what: str) -> None:
    for i, (t, h, w) in enumerate(image_grid_thw):
        if t != 1 or h < 1 or w < 1:
            raise ValueError(f"image_grid_thw[{i}] = {(t, h, w)}: GLM-Image encodes single images (t = 1, h, w >= 1)")
    expected = sum(h * w for _, h, w in image_grid_thw)
    if rows != expected:
        raise ValueError(f"{what} has {rows} patches but image_grid_thw describes {expected}")


@dataclass
class GlmImageBlockWeights:
    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    qkv_w: torch.Tensor  # [3W, W] rows q | k | v, each head-major
    qkv_b: torch.Tensor | None
    proj_w: torch.Tensor
    proj_b: torch.Tensor | None
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


class GlmImageVisionTower:
    def __init__(self, config: GlmImageVisionConfig, weights: dict[str, torch.Tensor], ops: TorchOps,
                 prefix: str = "model.visual."):
        if config.spatial_merge_size != 1:
            # transformers' get_image_features reads the output as one row-major feature per patch.
            raise ValueError(f"vision_config.spatial_merge_size {config.spatial_merge_size} is not supported (only 1)")
        self.config = config
        self.ops = ops
        w = lambda name: weights[prefix + name]  # noqa: E731
        bias = w if config.attention_bias else (lambda name: None)
        self.patch_w = w("patch_embed.proj.weight")  # Conv2d [W, C, P, P]
        self.patch_b = w("patch_embed.proj.bias")
        self.pos_table = w("embeddings.position_embedding.weight")  # [side², W], row-major (row, col)
        self.blocks = [
            GlmImageBlockWeights(
                norm1_w=w(p + "norm1.weight"), norm1_b=w(p + "norm1.bias"),
                qkv_w=w(p + "attn.qkv.weight"), qkv_b=bias(p + "attn.qkv.bias"),
                proj_w=w(p + "attn.proj.weight"), proj_b=bias(p + "attn.proj.bias"),
                norm2_w=w(p + "norm2.weight"), norm2_b=w(p + "norm2.bias"),
                fc1_w=w(p + "mlp.fc1.weight"), fc1_b=w(p + "mlp.fc1.bias"),
                fc2_w=w(p + "mlp.fc2.weight"), fc2_b=w(p + "mlp.fc2.bias"),
            )
            for p in (f"blocks.{b}." for b in range(config.depth))
        ]
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def position_embeddings(self, image_grid_thw: Grids) -> torch.Tensor:
        """-> [S, W] in the table's dtype: the table as a [side, side] image, sampled bilinearly in
        fp32 at each patch centre scaled to it (align_corners=False, edges clamped)."""
        table = self.pos_table
        side = int(table.shape[0] ** 0.5)
        image = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).to(torch.float32)  # [1, W, side, side]
        rows_cols = vision_positions(image_grid_thw, 1)  # [S, 2] int64
        sizes = torch.tensor([(h, w) for _, h, w in image_grid_thw], dtype=torch.float32)
        sizes = sizes.repeat_interleave(torch.tensor([h * w for _, h, w in image_grid_thw]), dim=0)  # [S, 2]
        coords = ((rows_cols + 0.5) / sizes) * 2 - 1  # in [-1, 1], fp32 as transformers computes them
        grid = upload(coords.flip(-1), table.device).view(1, -1, 1, 2)  # (x = col, y = row)
        sampled = F.grid_sample(image, grid, mode="bilinear", align_corners=False, padding_mode="border")
        return sampled.squeeze(0).squeeze(-1).permute(1, 0).to(table.dtype)  # [S, W]

    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: Grids) -> torch.Tensor:
        """pixel_values [S, C*P*P] (cast to the weights' dtype), rows in row-major patch order per
        image -> features [S, W]."""
        c, ops = self.config, self.ops
        if pixel_values.dim() != 2 or pixel_values.shape[1] != c.patch_dim:
            raise ValueError(f"pixel_values must be [S, {c.patch_dim}], got {tuple(pixel_values.shape)}")
        _check_grids(image_grid_thw, pixel_values.shape[0], "pixel_values")
        dtype, device = self.patch_w.dtype, self.patch_w.device
        patches = pixel_values.to(device=device, dtype=dtype).view(-1, c.in_channels, c.patch_size, c.patch_size)
        # transformers' Conv2d itself (ops.patch_embed is GLM-OCR's Conv3d; a GEMM over the rows rounds differently).
        x = F.conv2d(patches, self.patch_w, self.patch_b, stride=c.patch_size).view(-1, c.hidden_size)  # [S, W]
        x = x + self.position_embeddings(image_grid_thw)
        cu_seqlens, max_seqlen = vision_cu_seqlens(image_grid_thw)
        cu_seqlens = upload(cu_seqlens, device)
        s, width, heads, eps = x.shape[0], c.hidden_size, c.num_heads, c.layer_norm_eps
        for blk in self.blocks:
            h = F.layer_norm(x, (width,), blk.norm1_w, blk.norm1_b, eps)
            qkv = ops.linear(h, blk.qkv_w, blk.qkv_b).view(s, 3, heads, c.head_dim)
            attn = ops.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, max_seqlen, causal=False)
            x = x + ops.linear(attn.reshape(s, width), blk.proj_w, blk.proj_b)
            h = F.layer_norm(x, (width,), blk.norm2_w, blk.norm2_b, eps)
            h = F.gelu(ops.linear(h, blk.fc1_w, blk.fc1_b), approximate=self.approximate)
            x = x + ops.linear(h, blk.fc2_w, blk.fc2_b)
        return x


class VqTokenizer:
    def __init__(self, config: VqConfig, weights: dict[str, torch.Tensor], prefix: str = "model.vqmodel."):
        self.config = config
        self.quant_w = weights[prefix + "quant_conv.weight"]  # Conv2d 1x1 [E, W, 1, 1]
        self.quant_b = weights[prefix + "quant_conv.bias"]
        # transformers normalizes the codebook on every call; the same call once gives the same bits.
        self.codebook = F.normalize(weights[prefix + "quantize.embedding.weight"], p=2, dim=-1)  # [N, E]
        self.codebook_sq = torch.sum(self.codebook**2, dim=1)  # [N]

    def __call__(self, features: torch.Tensor, image_grid_thw: Grids) -> torch.Tensor:
        """features [S, W] (the tower's output) -> codes [S] int64, per image row-major over its
        (h, w) grid: transformers' get_image_tokens(get_image_features(...)) flattened."""
        if features.dim() != 2 or features.shape[1] != self.config.latent_channels:
            raise ValueError(f"features must be [S, {self.config.latent_channels}], got {tuple(features.shape)}")
        _check_grids(image_grid_thw, features.shape[0], "features")
        codes, start = [], 0
        for _, h, w in image_grid_thw:
            # One image at a time, as transformers' [1, W, h, w] feature map: a GEMM's rounding
            # may depend on its row count, and the conv's on the layout.
            image = features[start:start + h * w].view(1, h, w, -1).permute(0, 3, 1, 2).contiguous()
            start += h * w
            z = F.conv2d(image, self.quant_w, self.quant_b).permute(0, 2, 3, 1).contiguous()  # [1, h, w, E]
            z = F.normalize(z.view(-1, self.config.embed_dim), p=2, dim=-1)  # [h*w, E]
            distances = (torch.sum(z**2, dim=1, keepdim=True) + self.codebook_sq
                         - 2 * torch.einsum("bd,dn->bn", z, self.codebook.transpose(0, 1)))  # [h*w, N]
            codes.append(torch.argmin(distances, dim=1))
        return torch.cat(codes)
