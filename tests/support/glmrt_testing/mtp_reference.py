"""A plain-PyTorch reference of GLM-OCR's MTP layer over whole sequences, for tests.

Dense causal attention, no cache; the decoder layer and its M-RoPE are transformers' own
(GlmOcrTextDecoderLayer, GlmOcrTextRotaryEmbedding), the rest is written out:
    row i (token index i): e = embed(t[i+1]) (zero at position 0, an image token's row the
    target's image embedding), h = the target's final-normed hidden state at i,
    y = layer(eh_proj([enorm(e) | hnorm(h)])), logits = head(shared_head.norm(y)) predict t[i+2].
It is an nn.Module, so tests also train it (test_spec_decode.py).
"""
from __future__ import annotations

import torch
from torch import nn


class MtpReference(nn.Module):
    def __init__(self, text_config, weights: dict[str, torch.Tensor]):
        from transformers.models.glm_ocr.modeling_glm_ocr import (
            GlmOcrRMSNorm,
            GlmOcrTextDecoderLayer,
            GlmOcrTextRotaryEmbedding,
        )

        super().__init__()
        c = text_config
        h, eps = c.hidden_size, c.rms_norm_eps
        self.prefix = f"model.language_model.layers.{c.num_hidden_layers}."
        self.enorm, self.hnorm, self.head_norm = (GlmOcrRMSNorm(h, eps) for _ in range(3))
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        config = type(c)(**{**c.to_dict(), "num_hidden_layers": 1})
        config._attn_implementation = "eager"
        self.layer = GlmOcrTextDecoderLayer(config, layer_idx=0)
        self.rotary = GlmOcrTextRotaryEmbedding(config)
        self.embed = nn.Embedding(c.vocab_size, h)
        self.head = nn.Linear(h, c.vocab_size, bias=False)
        self.load_state_dict({self._module_name(n): t for n, t in weights.items() if n.startswith(self.prefix)})

    def _module_name(self, name: str) -> str:
        name = name.removeprefix(self.prefix)
        for ours, theirs in (("shared_head.norm.", "head_norm."), ("shared_head.head.", "head."),
                             ("embed_tokens.", "embed.")):
            if name.startswith(ours):
                return theirs + name.removeprefix(ours)
        return name if name.split(".")[0] in ("enorm", "hnorm", "eh_proj") else "layer." + name

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The module's weights under their checkpoint names."""
        names = {self._module_name(n): n for n in
                 [self.prefix + p for p in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                                            "shared_head.head.weight", "embed_tokens.weight")]
                 + [self.prefix + n.removeprefix("layer.") for n in self.state_dict() if n.startswith("layer.")]}
        return {names[n]: t.detach().clone() for n, t in self.state_dict().items()}

    def forward(self, next_embeds: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """next_embeds, hidden [T, H], position_ids [3, T] -> (logits [T, V], y [T, H])."""
        e = next_embeds * (position_ids[0] != 0)[:, None]
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(hidden)], dim=-1))[None]  # [1, T, H]
        t = x.shape[1]
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        y = self.layer(x, position_embeddings=self.rotary(x, position_ids[:, None, :]), attention_mask=mask)[0]
        return self.head(self.head_norm(y)), y
