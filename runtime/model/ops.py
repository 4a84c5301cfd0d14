"""The operations the GLM-OCR model is written in, one class per backend.

The model code (vision.py, text.py) calls only these methods, so a backend replaces ops one by
one without a second copy of the model. `TorchOps` is plain PyTorch with transformers' numerics
(the CPU path and the oracle); `TritonOps` runs the same math through glmrt.kernels.

Shapes: T tokens in a step, Hq/Hkv heads, D head dim, S vision patches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmrt.kernels import activation, attention, paged, rmsnorm, rope

Tensor = torch.Tensor


class TorchOps:
    name = "torch"

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, weight, bias)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x [N, D] -> normed; with residual: (norm(x + residual), x + residual)."""
        return rmsnorm.rms_norm_ref(x, weight, eps, residual)

    def sandwich_rms_norm(self, branch: Tensor, residual: Tensor, post_weight: Tensor, pre_weight: Tensor,
                          eps: float) -> tuple[Tensor, Tensor]:
        """-> (pre_norm(r), r) with r = residual + post_norm(branch)."""
        return rmsnorm.sandwich_rms_norm_ref(branch, residual, post_weight, pre_weight, eps)

    def silu_and_mul(self, x: Tensor) -> Tensor:
        """x [N, 2I] (gate | up) -> silu(gate) * up [N, I]."""
        return activation.silu_and_mul_ref(x)

    def layer_norm_gelu(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return activation.layer_norm_gelu_ref(x, weight, bias, eps)

    def vision_qk_norm_rope(self, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, positions: Tensor,
                            theta: float, eps: float) -> tuple[Tensor, Tensor]:
        """q, k [S, H, D], positions [S, 2] -> normed and rotated (q, k)."""
        return rope.vision_qk_norm_rope_ref(q, k, q_weight, k_weight, positions, theta, eps)

    def mrope(self, q: Tensor, k: Tensor, positions: Tensor, mrope_section: tuple[int, int, int],
              theta: float) -> tuple[Tensor, Tensor]:
        """q [T, Hq, D], k [T, Hkv, D], positions [3, T] -> rotated (q, k), rounded as transformers does."""
        return rope.mrope_ref(q, k, positions, mrope_section, theta)

    def varlen_attention(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                         causal: bool) -> Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] packed by cu_seqlens -> [T, Hq, D].

        Per-sequence SDPA, as transformers' default (sdpa) attention computes it. SDPA's fused
        kernels never materialise the [H, L, L] scores, which for a full page (24,576 patches)
        would take 38 GB in fp32.
        """
        out = torch.empty_like(q)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            seq = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # [1, H, L, D]
            o = F.scaled_dot_product_attention(*seq, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
            out[start:end] = o[0].transpose(0, 1)
        return out

    def write_kv_cache(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
        """Scatter K/V [T, Hkv, D] into the paged caches [blocks, block_size, Hkv, D]; slot -1 skipped."""
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]

    def paged_decode_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                               context_lens: Tensor) -> Tensor:
        """q [B, Hq, D] over each sequence's cached K/V -> [B, Hq, D]."""
        return paged.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens)


class TritonOps(TorchOps):
    """Every op that has a Triton kernel runs it; GEMMs stay with torch (cuBLAS)."""

    name = "triton"

    def rms_norm(self, x, weight, eps, residual=None):
        return rmsnorm.rms_norm(x, weight, eps, residual)

    def sandwich_rms_norm(self, branch, residual, post_weight, pre_weight, eps):
        return rmsnorm.sandwich_rms_norm(branch, residual, post_weight, pre_weight, eps)

    def silu_and_mul(self, x):
        return activation.silu_and_mul(x)

    def layer_norm_gelu(self, x, weight, bias, eps):
        return activation.layer_norm_gelu(x, weight, bias, eps)

    def vision_qk_norm_rope(self, q, k, q_weight, k_weight, positions, theta, eps):
        rope.vision_qk_norm_rope_(q, k, q_weight, k_weight, positions, theta, eps)
        return q, k

    def mrope(self, q, k, positions, mrope_section, theta):
        rope.mrope_(q, k, positions, mrope_section, theta)
        return q, k

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, causal):
        return attention.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal)

    def write_kv_cache(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        paged.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)

    def paged_decode_attention(self, q, k_cache, v_cache, block_tables, context_lens):
        return paged.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens)


def make_ops(backend: str) -> TorchOps:
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        return TritonOps()
    raise ValueError(f"backend {backend!r} is not one of 'torch', 'triton'")
