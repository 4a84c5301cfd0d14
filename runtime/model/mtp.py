"""GLM-OCR's multi-token-prediction (MTP) layer: the drafter of speculative decoding.

The checkpoint carries it as decoder layer index num_layers (transformers ignores it). For a
token at cache index i it combines the target model's hidden state at i with the embedding of
token i + 1 and predicts token i + 2 (DeepSeek-V3 style):
    x = eh_proj([enorm(embed(t[i+1])) | hnorm(h[i])])      eh_proj [H, 2H]: columns [embedding | hidden]
    y = one sandwich-norm decoder layer over x (its own KV cache, the target's M-RoPE positions)
    logits = shared_head.head(shared_head.norm(y))
A chained draft step feeds its own y back in as the next h. The embedding of a token at
position 0 is zeroed, and an <|image|> token's embedding is the target's image embedding.

Which hidden state: the target's *final-normed* one (after `norm`), as both serving references
do: vLLM's GLM text model returns its states after the final norm and its MTP proposer feeds
those to GlmOcrMultiTokenPredictorLayer (vllm/model_executor/models/glm_ocr_mtp.py with
llama.py's model forward); SGLang's Glm4Model.forward applies `self.norm` before its EAGLE worker
hands the states to GlmOcrModelNextN (python/sglang/srt/models/glm_ocr_nextn.py). That is what
TextDecoder.forward returns.
"""
from __future__ import annotations

import torch

from ..config import TextConfig
from .ops import TorchOps
from .text import AttentionMetadata, TextDecoder, load_layer, run_layers


def _copy_or_main(copy: torch.Tensor | None, main: torch.Tensor) -> torch.Tensor:
    """The MTP layer's own embed/head copy, or the main one when it is absent or bit-identical
    (then the copy's memory is released: 182 MB each at the real sizes in bf16)."""
    if copy is None or (copy.shape == main.shape and torch.equal(copy, main)):
        return main
    return copy


class MtpDrafter:
    def __init__(self, config: TextConfig, weights: dict[str, torch.Tensor], ops: TorchOps, target: TextDecoder):
        self.config = config
        self.ops = ops
        prefix = f"model.language_model.layers.{config.num_layers}."
        w = lambda name: weights[prefix + name]  # noqa: E731
        self.enorm = w("enorm.weight")
        self.hnorm = w("hnorm.weight")
        self.eh_proj = w("eh_proj.weight")
        self.layer = load_layer(w, "", ops)
        self.head_norm = w("shared_head.norm.weight")
        self.embed_tokens = _copy_or_main(weights.get(prefix + "embed_tokens.weight"), target.embed_tokens)
        self.head = _copy_or_main(weights.get(prefix + "shared_head.head.weight"), target.lm_head)

    def forward(self, embeds: torch.Tensor, prev_hidden: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [T, H] (of the next tokens), prev_hidden [T, H], positions [3, T] ->
        (shared_head.norm(y), y), each [T, H]; K/V go into the MTP layer's cache."""
        ops, eps = self.ops, self.config.rms_norm_eps
        embeds = torch.where((positions[0] == 0)[:, None], 0.0, embeds)
        x = ops.linear(torch.cat([ops.rms_norm(embeds, self.enorm, eps), ops.rms_norm(prev_hidden, self.hnorm, eps)],
                                 dim=-1), self.eh_proj)
        return run_layers(self.config, ops, [self.layer], self.head_norm, x, positions, attn, [kv_cache])

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """normed [N, H] -> draft logits [N, vocab]."""
        return self.ops.linear(normed, self.head)
