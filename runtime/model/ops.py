"""The operations the GLM-OCR model is written in, one class per backend.

The model code (vision.py, text.py) calls only these methods, so a backend replaces ops one by
one without a second copy of the model. `TorchOps` is plain PyTorch making the calls transformers
makes (the CPU path and the oracle: bit-identical to transformers on CPU in fp32, bf16 and fp16);
`TritonOps` runs the same math through glmrt.kernels, equal within rounding.

Shapes: T tokens in a step, Hq/Hkv heads, D head dim, S vision patches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmrt.kernels import (activation, admission, attention, decode_inputs, invariant_attention, linear, paged,
                           rmsnorm, rope, sampling)

Tensor = torch.Tensor
# Weights (or biases) of projections sharing an input, in the backend's form (see fuse_rows).
FusedRows = Tensor | tuple[Tensor, ...]


class TorchOps:
    name = "torch"
    # Whether a row's results are the same bits whatever else is in the step (TritonOps' kernels);
    # transformers' ops, here, make no such promise (on CPU a GEMM's rounding can follow M).
    batch_invariant = False

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, weight, bias)

    def fuse_rows(self, weights: list[Tensor]) -> FusedRows:
        """Prepare the weights (or biases) of projections that share an input, which transformers
        runs as separate nn.Linears, for fused_linear / linear_silu_and_mul.

        Kept separate and as loaded: on CPU a GEMM's rounding can depend on its output width
        (bf16/fp16) and, for a single fp32 row (a decode step), on the weight's address modulo 16
        bytes. Only the same separate calls on tensors at the same addresses reproduce
        transformers' bits; when no dtype conversion is needed, both it and the loader keep views
        of the memory-mapped checkpoint file.
        """
        return tuple(weights)

    def fused_linear(self, x: Tensor, weight: FusedRows, bias: FusedRows | None = None) -> Tensor:
        """x [N, K] -> [N, sum of out sizes]: the projections of fuse_rows' weight side by side."""
        biases = bias if bias is not None else (None,) * len(weight)
        return torch.cat([F.linear(x, w, b) for w, b in zip(weight, biases)], dim=-1)

    def linear_silu_and_mul(self, x: Tensor, weight: FusedRows, bias: FusedRows | None) -> Tensor:
        """x [N, K] -> silu(gate) * up [N, I], with gate and up the projections of fuse_rows' (gate, up).

        transformers applies silu to the whole gate tensor; silu over a column view of one
        [N, 2I] product would not give the same bits (in fp32 a vector loop's scalar tail rounds
        differently, and the tails fall elsewhere).
        """
        gate_w, up_w = weight
        gate_b, up_b = bias if bias is not None else (None, None)
        return F.silu(F.linear(x, gate_w, gate_b)) * F.linear(x, up_w, up_b)

    def patch_embed(self, pixels: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """pixels [S, C*T*P*P] -> [S, W]: the Conv3d (kernel == stride) weight [W, C, T, P, P] applied
        to each patch, as the convolution transformers runs."""
        patches = pixels.view(-1, *weight.shape[1:])  # [S, C, T, P, P]
        return F.conv3d(patches, weight, bias, stride=weight.shape[2:]).view(-1, weight.shape[0])

    def downsample(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """x [S, W], each m*m consecutive rows one merge block in row-major (i, j) order -> [S/m², O]:
        the Conv2d (kernel == stride == m) weight [O, W, m, m] over each block, as transformers runs it."""
        m = weight.shape[-1]
        blocks = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2)  # [S/m², W, m, m], channels-last
        return F.conv2d(blocks, weight, bias, stride=m).view(-1, weight.shape[0])

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x [N, D] -> normed; with residual: (norm(x + residual), x + residual)."""
        return rmsnorm.rms_norm_ref(x, weight, eps, residual)

    def sandwich_rms_norm(self, branch: Tensor, residual: Tensor, post_weight: Tensor, pre_weight: Tensor,
                          eps: float) -> tuple[Tensor, Tensor]:
        """-> (pre_norm(r), r) with r = residual + post_norm(branch)."""
        return rmsnorm.sandwich_rms_norm_ref(branch, residual, post_weight, pre_weight, eps)

    def norm_linear(self, x: Tensor, weight: FusedRows, pre_weight: Tensor, eps: float, residual: Tensor | None = None,
                    post_weight: Tensor | None = None, bias: FusedRows | None = None,
                    silu_and_mul: bool = False) -> tuple[Tensor, Tensor]:
        """A projection of a normed input -> (y, r): r = residual + post_norm(x) (x itself without
        a residual), h = pre_norm(r), y = h's projections side by side (fused_linear), or with
        silu_and_mul the silu(gate) * up [N, I] of a [2I, K] weight."""
        if residual is None:
            r, h = x, self.rms_norm(x, pre_weight, eps)
        else:
            h, r = self.sandwich_rms_norm(x, residual, post_weight, pre_weight, eps)
        if silu_and_mul:
            return self.silu_and_mul(self.linear(h, weight, bias)), r
        return self.fused_linear(h, weight, bias), r

    def silu_and_mul(self, x: Tensor) -> Tensor:
        """x [N, 2I] (gate | up) -> silu(gate) * up [N, I]."""
        return activation.silu_and_mul_ref(x)

    def layer_norm_gelu(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return activation.layer_norm_gelu_ref(x, weight, bias, eps)

    def vision_qk_norm_rope(self, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, positions: Tensor,
                            theta: float, eps: float) -> tuple[Tensor, Tensor]:
        """q, k [S, H, D], positions [S, 2] -> normed and rotated (q, k)."""
        return rope.vision_qk_norm_rope_ref(q, k, q_weight, k_weight, positions, theta, eps)

    def mrope_write_kv(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                       mrope_section: tuple[int, int, int], theta: float, k_cache: Tensor, v_cache: Tensor,
                       slot_mapping: Tensor, rotary_dim: int | None = None,
                       interleaved: bool = True) -> tuple[Tensor, Tensor]:
        """q [T, Hq, D], k/v [T, Hkv, D], positions [3, T] -> rotated (q, k), rounded as transformers
        does; the rotated k and v are written into the paged caches at slot_mapping. rotary_dim
        (None = D) dims rotate, GPT-J pairs (interleaved, GLM-OCR) or NeoX halves (GLM-Image)."""
        q, k = rope.mrope_ref(q, k, positions, mrope_section, theta, rotary_dim, interleaved)
        self.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        return q, k

    def varlen_attention(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                         causal: bool) -> Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] packed by cu_seqlens -> [T, Hq, D]: per-sequence SDPA."""
        return attention.varlen_attention_ref(q, k, v, cu_seqlens, causal)

    def write_kv_cache(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
        """Scatter K/V [T, Hkv, D] into the paged caches [blocks, block_size, Hkv, D]; slot -1 skipped."""
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]

    def paged_decode_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                               context_lens: Tensor, num_queries: int = 1) -> Tensor:
        """q [B * Q, Hq, D] (Q queries per sequence, causal among them) over each sequence's cached
        K/V -> [B * Q, Hq, D]: per-query SDPA."""
        return paged.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens,
                                                num_queries=num_queries)

    def paged_prefill_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens: Tensor,
                                block_tables: Tensor, context_lens: Tensor, max_seqlen: int) -> Tensor:
        """q [T, Hq, D] packed by cu_seqlens: the last n_i of sequence i's context_lens[i] cached
        tokens -> [T, Hq, D], each query over its sequence's cache up to itself (chunked prefill)."""
        return paged.paged_prefill_attention_ref(q, k_cache, v_cache, cu_seqlens, block_tables, context_lens)

    def apply_repetition_penalty(self, logits: Tensor, presence: Tensor, penalty: Tensor) -> Tensor:
        """logits [B, V] fp32, presence [B, V] bool, penalty [B] -> penalised logits (maybe in place)."""
        return sampling.apply_repetition_penalty_ref(logits, presence, penalty)

    def apply_token_bitmask(self, logits: Tensor, bitmask: Tensor) -> Tensor:
        """logits [B, V], bitmask [B, ceil(V / 32)] int32 (bit set = allowed) -> logits with every
        disallowed entry -inf (maybe in place)."""
        return sampling.apply_token_bitmask_ref(logits, bitmask)

    def argmax(self, logits: Tensor, presence: Tensor | None = None, penalty: Tensor | None = None,
               bitmask: Tensor | None = None) -> Tensor:
        """logits [B, V] -> [B] int64, lowest index on ties; with bitmask [B, >= ceil(V / 32)] int32
        (bit set = allowed), of the logits with every disallowed entry -inf (0 for a row that
        allows nothing); with presence [B, V] bool and penalty [B] fp32, of the
        repetition-penalised fp32 logits (the mask first; logits are not written)."""
        return sampling.argmax_ref(logits, presence, penalty, bitmask)

    def sample(self, logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor,
               counters: Tensor, presence: Tensor | None = None, penalty: Tensor | None = None,
               bitmask: Tensor | None = None) -> Tensor:
        """logits [B, V], per-row temperature (0: greedy), top_k, top_p, seeds, counters [B], and
        optionally presence [B, V] and penalty [B], and bitmask [B, >= ceil(V / 32)] int32 -> [B]
        int64 tokens: the token bitmask, the repetition penalty, temperature, top-k, top-p and the
        seeded draw on fp32 logits, or argmax for greedy rows and rows the mask allows nothing
        (see glmrt.kernels.sampling.sample_ref); logits are not written."""
        return sampling.sample_ref(logits, temperature, top_k, top_p, seeds, counters, presence, penalty, bitmask)

    def decode_inputs(self, context_lens: Tensor, active: Tensor, block_tables: Tensor, block_size: int,
                      rope_deltas: Tensor, decode_positions: Tensor | None = None, prompt_lens: Tensor | None = None,
                      decode_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A decode step's inputs of B rows: context_lens [B] += active [B], in place -> (slot_mapping
        [B], positions [3, B]) of each row's fed token (see glmrt.kernels.decode_inputs)."""
        return decode_inputs.decode_inputs_ref(context_lens, active, block_tables, block_size, rope_deltas,
                                               decode_positions, prompt_lens, decode_lens)

    def prefill_slots(self, cu_seqlens: Tensor, starts: Tensor, block_tables: Tensor, block_size: int,
                      num_tokens: int) -> Tensor:
        """The KV slots [T] of a step's prefill chunks (cu_seqlens [n + 1], each chunk's first cache
        index starts [n] and block table [n, max_blocks], all int32; see glmrt.kernels.decode_inputs)."""
        return decode_inputs.prefill_slots_ref(cu_seqlens, starts, block_tables, block_size, num_tokens)

    def admit_rows(self, rows: admission.BatchRows, first_row: int, admitted: Tensor, tables: Tensor, ids: Tensor,
                   history: Tensor) -> None:
        """Write the batch rows of sequences admitted after their prefill, in place (admitted [n, C]
        int64 rows, the step's block tables [c, W] int32 and prefill ids [T], earlier ids [H]; see
        glmrt.kernels.admission)."""
        admission.admit_rows_ref(rows, first_row, admitted, tables, ids, history)


class TritonOps(TorchOps):
    """Every op that has a Triton kernel runs it.

    batch_invariant (the default): every GEMM is glmrt.kernels.linear's (one tiling for every M)
    and the decoder's attention glmrt.kernels.invariant_attention's (one reduction order per
    query, whether decoded, verified, prefilled whole or in chunks), so a row's logits are the
    same bits whatever else shares its step. Otherwise GEMMs are torch's (cuBLAS picks its tiling
    by M), decode-sized projections the fused norm + GEMM kernel, and attention paged.py's
    kernels, tuned per batch (split-KV count by batch size).
    """

    name = "triton"

    def __init__(self, batch_invariant: bool = True):
        self.batch_invariant = batch_invariant

    def linear(self, x, weight, bias=None):
        return linear.linear(x, weight, bias) if self.batch_invariant else F.linear(x, weight, bias)

    def fuse_rows(self, weights):
        # One GEMM for all projections: their weights stacked once, at load time.
        return torch.cat(weights)

    def fused_linear(self, x, weight, bias=None):
        return self.linear(x, weight, bias)

    def linear_silu_and_mul(self, x, weight, bias):
        if self.batch_invariant:
            return linear.linear(x, weight, bias, silu_and_mul=True)
        return self.silu_and_mul(F.linear(x, weight, bias))

    def patch_embed(self, pixels, weight, bias):
        # A Conv3d whose kernel equals its stride is a GEMM over the flattened patches.
        return self.linear(pixels, weight.view(weight.shape[0], -1), bias)

    def downsample(self, x, weight, bias):
        if not self.batch_invariant:
            return super().downsample(x, weight, bias)
        # The Conv2d (kernel == stride == m) as a GEMM over each block flattened as (W, i, j).
        out, width, m = weight.shape[0], x.shape[-1], weight.shape[-1]
        blocks = x.view(-1, m * m, width).transpose(1, 2).reshape(-1, width * m * m)
        return self.linear(blocks, weight.reshape(out, -1), bias)

    def rms_norm(self, x, weight, eps, residual=None):
        return rmsnorm.rms_norm(x, weight, eps, residual)

    def sandwich_rms_norm(self, branch, residual, post_weight, pre_weight, eps):
        return rmsnorm.sandwich_rms_norm(branch, residual, post_weight, pre_weight, eps)

    def norm_linear(self, x, weight, pre_weight, eps, residual=None, post_weight=None, bias=None, silu_and_mul=False):
        # Decode-sized steps (every step when batch-invariant): the norm and silu_and_mul in the
        # projection's own kernel, which reads the weights once (a layer in 7 launches); wider
        # steps: norm kernel, then cuBLAS.
        if self.batch_invariant or x.shape[0] <= linear.MAX_FUSED_ROWS:
            return linear.norm_linear(x, weight, pre_weight, eps, residual, post_weight, bias, silu_and_mul,
                                      batch_invariant=self.batch_invariant)
        return super().norm_linear(x, weight, pre_weight, eps, residual, post_weight, bias, silu_and_mul)

    def silu_and_mul(self, x):
        return activation.silu_and_mul(x)

    def layer_norm_gelu(self, x, weight, bias, eps):
        return activation.layer_norm_gelu(x, weight, bias, eps)

    def vision_qk_norm_rope(self, q, k, q_weight, k_weight, positions, theta, eps):
        rope.vision_qk_norm_rope_(q, k, q_weight, k_weight, positions, theta, eps)
        return q, k

    def mrope_write_kv(self, q, k, v, positions, mrope_section, theta, k_cache, v_cache, slot_mapping,
                       rotary_dim=None, interleaved=True):
        rope.mrope_write_kv_(q, k, v, positions, mrope_section, theta, k_cache, v_cache, slot_mapping,
                             rotary_dim, interleaved)  # one launch
        return q, k

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, causal):
        return attention.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal)

    def paged_decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, num_queries=1):
        if self.batch_invariant:
            return invariant_attention.decode_attention(q, k_cache, v_cache, block_tables, context_lens, num_queries)
        return paged.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, num_queries=num_queries)

    def paged_prefill_attention(self, q, k_cache, v_cache, cu_seqlens, block_tables, context_lens, max_seqlen):
        kernels = invariant_attention.prefill_attention if self.batch_invariant else paged.paged_prefill_attention
        return kernels(q, k_cache, v_cache, cu_seqlens, block_tables, context_lens, max_seqlen)

    def apply_repetition_penalty(self, logits, presence, penalty):
        return sampling.apply_repetition_penalty_(logits, presence, penalty)

    def apply_token_bitmask(self, logits, bitmask):
        return sampling.apply_token_bitmask_(logits, bitmask)

    def argmax(self, logits, presence=None, penalty=None, bitmask=None):
        # one launch, the bitmask and the penalty applied as rows are read
        return sampling.argmax(logits, presence, penalty, bitmask)

    def sample(self, logits, temperature, top_k, top_p, seeds, counters, presence=None, penalty=None, bitmask=None):
        # one launch, no sort; the bitmask and the penalty applied as rows are read
        return sampling.sample(logits, temperature, top_k, top_p, seeds, counters, presence, penalty, bitmask)

    def decode_inputs(self, context_lens, active, block_tables, block_size, rope_deltas, decode_positions=None,
                      prompt_lens=None, decode_lens=None):
        return decode_inputs.decode_inputs_(context_lens, active, block_tables, block_size, rope_deltas,
                                            decode_positions, prompt_lens, decode_lens)  # one launch

    def prefill_slots(self, cu_seqlens, starts, block_tables, block_size, num_tokens):
        return decode_inputs.prefill_slots(cu_seqlens, starts, block_tables, block_size, num_tokens)  # one launch

    def admit_rows(self, rows, first_row, admitted, tables, ids, history):
        admission.admit_rows(rows, first_row, admitted, tables, ids, history)  # one launch


def make_ops(backend: str, batch_invariant: bool = True) -> TorchOps:
    """batch_invariant: the Triton backend's kernels (the torch backend has one set of ops)."""
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        return TritonOps(batch_invariant)
    raise ValueError(f"backend {backend!r} is not one of 'torch', 'triton'")
