"""The GLM text decoder of GLM-OCR and GLM-Image: sandwich-norm layers with M-RoPE, GQA and a
paged KV cache (GLM-Image adds q/k/v biases and rotates only part of each head; see TextConfig).

One forward runs a whole step: a few decode tokens per sequence (one, or k + 1 when verifying
speculated tokens; attention over the paged cache) and/or a varlen prefill of several sequences
(causal per sequence; over the new tokens only, or, for a chunk of a longer prompt, over its
cached prefix too). K/V of every new token are written into the cache through the slot mapping
before attention reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TextConfig
from .ops import FusedRows, TorchOps


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, all on the model's device. A step's tokens are its decode
    tokens (rows of block_tables, num_queries each) followed by its prefill tokens (packed by
    cu_seqlens); either part may be absent (a mixed step has both)."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: padding, not written)
    # prefill: [N+1] int32 over the packed prefill tokens (offsets from the first of them)
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0  # prefill: longest sequence (chunk) of the step
    # prefill chunks after a cached prefix (chunked prefill): [N, max_blocks] int32 block tables
    # and [N] int32 cache lengths including each chunk; None: every sequence starts at index 0
    # and attends to its new tokens only
    prefill_block_tables: torch.Tensor | None = None
    prefill_context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None  # decode: [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # decode: [B] int32, including the new token(s)
    # decode: new tokens per sequence (speculative verification: Q = k + 1, rows b*Q + j, causal
    # within them; context_lens counts up to the last one)
    num_queries: int = 1

    @property
    def num_decode_tokens(self) -> int:
        return 0 if self.block_tables is None else self.block_tables.shape[0] * self.num_queries


def attention(ops: TorchOps, attn: AttentionMetadata, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of the step's tokens (already in the cache) -> [T, Hq, D]."""
    nd = attn.num_decode_tokens
    parts = []
    if attn.block_tables is not None:
        parts.append(ops.paged_decode_attention(q[:nd], k_cache, v_cache, attn.block_tables, attn.context_lens,
                                                attn.num_queries))
    if attn.cu_seqlens is not None:
        if attn.prefill_block_tables is None:
            parts.append(ops.varlen_attention(q[nd:], k[nd:], v[nd:], attn.cu_seqlens, attn.max_seqlen, causal=True))
        else:
            parts.append(ops.paged_prefill_attention(q[nd:], k_cache, v_cache, attn.cu_seqlens,
                                                     attn.prefill_block_tables, attn.prefill_context_lens,
                                                     attn.max_seqlen))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attn_branch_norm: torch.Tensor  # post_self_attn_layernorm: on the attention output
    pre_mlp_norm: torch.Tensor  # post_attention_layernorm: the MLP's input norm
    post_mlp_branch_norm: torch.Tensor  # post_mlp_layernorm: on the MLP output
    qkv: FusedRows  # q_proj [Hq D, hidden], k_proj and v_proj [Hkv D, hidden] (ops.fuse_rows)
    qkv_bias: FusedRows | None  # their biases [Hq D], [Hkv D], [Hkv D] (GLM-Image), fused the same way
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def load_layer(w, prefix: str, ops: TorchOps, attention_bias: bool = False) -> LayerWeights:
    """The decoder layer whose tensors are named `prefix` + ... in the checkpoint (w: name -> tensor)."""
    projections = [prefix + f"self_attn.{p}_proj." for p in "qkv"]
    return LayerWeights(
        input_norm=w(prefix + "input_layernorm.weight"),
        post_attn_branch_norm=w(prefix + "post_self_attn_layernorm.weight"),
        pre_mlp_norm=w(prefix + "post_attention_layernorm.weight"),
        post_mlp_branch_norm=w(prefix + "post_mlp_layernorm.weight"),
        qkv=ops.fuse_rows([w(p + "weight") for p in projections]),
        qkv_bias=ops.fuse_rows([w(p + "bias") for p in projections]) if attention_bias else None,
        o=w(prefix + "self_attn.o_proj.weight"),
        gate_up=w(prefix + "mlp.gate_up_proj.weight"),
        down=w(prefix + "mlp.down_proj.weight"),
    )


def run_layers(config: TextConfig, ops: TorchOps, layers: list[LayerWeights], final_norm: torch.Tensor,
               x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
               kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sandwich-norm layers over x [T, hidden] at positions [3, T] -> (final_norm(y), y) with y the
    last layer's output (its residual stream), each [T, hidden]. Shared by the decoder and the
    MTP layer, whose next draft step takes y itself."""
    c = config
    t, hq, hkv, d, eps = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
    # Each norm runs inside the op of the projection it feeds: the layer's input is the last
    # layer's MLP output `branch`, its residual stream and post-norm (x itself at layer 0).
    branch, residual, post_norm = x, None, None
    for layer, (k_cache, v_cache) in zip(layers, kv_caches, strict=True):
        # Sandwich: residual += post_norm(branch), then this branch's input norm, then q/k/v.
        qkv, residual = ops.norm_linear(branch, layer.qkv, layer.input_norm, eps, residual, post_norm,
                                        layer.qkv_bias)  # [T, (Hq + 2 Hkv) D]
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
        q, k = ops.mrope_write_kv(q, k, v, positions, c.mrope_section, c.rope_theta, k_cache, v_cache,
                                  attn.slot_mapping, rotary_dim=c.rotary_dim, interleaved=c.rope_interleaved)
        o = attention(ops, attn, q, k, v, k_cache, v_cache)
        a = ops.linear(o.reshape(t, hq * d), layer.o)
        mlp, residual = ops.norm_linear(a, layer.gate_up, layer.pre_mlp_norm, eps, residual,
                                        layer.post_attn_branch_norm, silu_and_mul=True)  # [T, I]
        branch, post_norm = ops.linear(mlp, layer.down), layer.post_mlp_branch_norm
    return ops.sandwich_rms_norm(branch, residual, post_norm, final_norm, eps)


class TextDecoder:
    def __init__(self, config: TextConfig, weights: dict[str, torch.Tensor], ops: TorchOps, tied_lm_head: bool,
                 prefix: str = "model.language_model."):
        self.config = config
        self.ops = ops
        w = lambda name: weights[prefix + name]  # noqa: E731
        self.embed_tokens = w("embed_tokens.weight")
        self.layers = [load_layer(w, f"layers.{i}.", ops, config.attention_bias) for i in range(config.num_layers)]
        self.final_norm = w("norm.weight")
        self.lm_head = self.embed_tokens if tied_lm_head else weights["lm_head.weight"]

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """inputs_embeds [T, hidden], positions [3, T] -> final-normed hidden states [T, hidden]."""
        return run_layers(self.config, self.ops, self.layers, self.final_norm, inputs_embeds, positions, attn,
                          kv_caches)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (only the rows that sample) -> logits [N, output_vocab_size] in the model dtype."""
        return self.ops.linear(hidden, self.lm_head)
