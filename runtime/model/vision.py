"""GLM-OCR vision tower (CogViT): patch embed, 24 pre-norm blocks, downsample, merger.

All images of a step are packed into one varlen sequence; attention is block-diagonal per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import VisionConfig
from .ops import FusedRows, TorchOps
from .positions import vision_cu_seqlens, vision_positions
from .transfer import upload


@dataclass
class VisionBlockWeights:
    norm1: torch.Tensor
    norm2: torch.Tensor
    qkv_w: torch.Tensor  # [3W, W] rows q | k | v, each head-major
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    q_norm: torch.Tensor  # [D]
    k_norm: torch.Tensor
    gate_up_w: FusedRows  # gate_proj, up_proj weights [I, W] (ops.fuse_rows)
    gate_up_b: FusedRows
    down_w: torch.Tensor
    down_b: torch.Tensor


class VisionTower:
    def __init__(self, config: VisionConfig, weights: dict[str, torch.Tensor], ops: TorchOps, prefix: str = "model.visual."):
        self.config = config
        self.ops = ops
        w = lambda name: weights[prefix + name]  # noqa: E731
        c = config
        self.patch_w = w("patch_embed.proj.weight")  # Conv3d [W, C, T, P, P]
        self.patch_b = w("patch_embed.proj.bias")
        self.blocks = []
        for b in range(c.depth):
            p = f"blocks.{b}."
            self.blocks.append(VisionBlockWeights(
                norm1=w(p + "norm1.weight"), norm2=w(p + "norm2.weight"),
                qkv_w=w(p + "attn.qkv.weight"), qkv_b=w(p + "attn.qkv.bias"),
                proj_w=w(p + "attn.proj.weight"), proj_b=w(p + "attn.proj.bias"),
                q_norm=w(p + "attn.q_norm.weight"), k_norm=w(p + "attn.k_norm.weight"),
                gate_up_w=ops.fuse_rows([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
                gate_up_b=ops.fuse_rows([w(p + "mlp.gate_proj.bias"), w(p + "mlp.up_proj.bias")]),
                down_w=w(p + "mlp.down_proj.weight"), down_b=w(p + "mlp.down_proj.bias"),
            ))
        self.post_norm = w("post_layernorm.weight")
        self.down_w = w("downsample.weight")  # Conv2d [O, W, m, m]
        self.down_b = w("downsample.bias")
        self.merger_proj = w("merger.proj.weight")
        self.merger_norm_w = w("merger.post_projection_norm.weight")
        self.merger_norm_b = w("merger.post_projection_norm.bias")
        self.merger_gate_up = ops.fuse_rows([w("merger.gate_proj.weight"), w("merger.up_proj.weight")])
        self.merger_down = w("merger.down_proj.weight")

    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values [S, C*T*P*P] (any float dtype) -> image embeddings [S/m², out_hidden]."""
        c, ops = self.config, self.ops
        dtype, device = self.patch_w.dtype, self.patch_w.device
        if pixel_values.shape[-1] != c.patch_dim:
            raise ValueError(f"pixel_values rows have {pixel_values.shape[-1]} values, expected {c.patch_dim}")
        expected = sum(t * h * w for t, h, w in image_grid_thw)
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw describes {expected}")
        x = ops.patch_embed(pixel_values.to(device=device, dtype=dtype), self.patch_w, self.patch_b)  # [S, W]
        positions = upload(vision_positions(image_grid_thw, c.spatial_merge_size), device)  # [S, 2]
        cu_seqlens, max_seqlen = vision_cu_seqlens(image_grid_thw)
        cu_seqlens = upload(cu_seqlens, device)
        s, heads, d, eps = x.shape[0], c.num_heads, c.head_dim, c.rms_norm_eps
        h = ops.rms_norm(x, self.blocks[0].norm1, eps)
        for i, blk in enumerate(self.blocks):
            qkv = ops.linear(h, blk.qkv_w, blk.qkv_b).view(s, 3, heads, d)
            q, k = ops.vision_qk_norm_rope(qkv[:, 0], qkv[:, 1], blk.q_norm, blk.k_norm, positions, c.rope_theta, eps)
            attn = ops.varlen_attention(q, k, qkv[:, 2], cu_seqlens, max_seqlen, causal=False)  # [S, H, D]
            # The residual adds are fused into the following norm: (norm(x + branch), x + branch).
            h, x = ops.rms_norm(ops.linear(attn.reshape(s, heads * d), blk.proj_w, blk.proj_b), blk.norm2, eps, residual=x)
            mlp = ops.linear(ops.linear_silu_and_mul(h, blk.gate_up_w, blk.gate_up_b), blk.down_w, blk.down_b)
            next_norm = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else self.post_norm
            h, x = ops.rms_norm(mlp, next_norm, eps, residual=x)
        x = h  # post_layernorm output
        x = ops.downsample(x, self.down_w, self.down_b)  # [S/m², out]
        x = ops.layer_norm_gelu(ops.linear(x, self.merger_proj), self.merger_norm_w, self.merger_norm_b, 1e-5)
        return ops.linear(ops.linear_silu_and_mul(x, self.merger_gate_up, None), self.merger_down)
