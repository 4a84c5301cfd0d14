"""Tiny random GLM-OCR checkpoints built by transformers, for parity tests.

Small sizes but every structural feature of the real model: head_dim != hidden/heads, GQA, three
M-RoPE sections, q/k norms, several vision blocks and text layers, untied lm_head, an MTP layer
on disk (as in the real checkpoint), the real vocabulary size so the special tokens sit at
GLM-OCR's ids, and weights perturbed so that norms and biases are not trivial.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SPECIAL_TOKENS = {
    "<|endoftext|>": 59246, "[MASK]": 59247, "[gMASK]": 59248, "[sMASK]": 59249, "<sop>": 59250,
    "<eop>": 59251, "<|system|>": 59252, "<|user|>": 59253, "<|assistant|>": 59254,
    "<|observation|>": 59255, "<|begin_of_image|>": 59256, "<|end_of_image|>": 59257,
    "<|begin_of_video|>": 59258, "<|end_of_video|>": 59259, "<think>": 59267, "</think>": 59268,
    "<|image|>": 59280, "<|video|>": 59281,
}
VOCAB_SIZE = 59392

# A GLM-style chat template (our own text) rendering the prompt layout of GLM-OCR.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}<|system|>{{ '\\n' }}{{ m.content }}"
    "{%- elif m.role == 'user' -%}<|user|>{{ '\\n' }}"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}{%- for item in m.content -%}"
    "{%- if item.type == 'image' -%}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' -%}{{ item.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- elif m.role == 'assistant' -%}<|assistant|>{{ '\\n' }}<think></think>{{ '\\n' }}{{ m.content }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)

PREPROCESSOR_CONFIG = {
    "size": {"shortest_edge": 12544, "longest_edge": 9633792},
    "do_rescale": True,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Glm46VImageProcessor",
    "processor_class": "Glm46VProcessor",
}


def _glm_ocr_config(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                    mrope_section: list[int], max_positions: int, vision: dict):
    from transformers import GlmOcrConfig

    return GlmOcrConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "mrope_section": mrope_section,
                             "partial_rotary_factor": 1.0, "rope_theta": 10000.0},
            eos_token_id=[59246, 59253], pad_token_id=59246, max_position_embeddings=max_positions,
            num_nextn_predict_layers=1,
        ),
        vision_config=dict(out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           rms_norm_eps=1e-5, **vision),
    )


def tiny_config():
    """Small, but head_dim != hidden/heads, GQA, three M-RoPE sections, 2 vision blocks, 2 layers."""
    return _glm_ocr_config(48, 72, 2, 4, 2, 16, [2, 3, 3], 4096,
                           dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64))


def real_config():
    """GLM-OCR's real config.json values, for random-weight GPU tests and benchmarks."""
    return _glm_ocr_config(1536, 4608, 16, 16, 8, 128, [16, 24, 24], 131072,
                           dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096))


def build_tokenizer():
    """Byte-level BPE over 256 byte symbols, with GLM-OCR's special tokens at their real ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("e", "x"), ("Ġt", "ex"), ("o", "n"), ("i", "on")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    by_id = {i: tok for tok, i in SPECIAL_TOKENS.items()}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[by_id.get(i, f"<r{i}>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def perturbed_(name: str, noise: torch.Tensor) -> torch.Tensor:
    """Parameter `name`'s value from standard normal `noise` of its shape, in place: norm weights
    1 + 0.2 n, biases 0.1 n, the rest n / sqrt(fan_in), so that activations keep their scale
    through every layer at any size."""
    if name.endswith("norm.weight") or "layernorm" in name or "norm1" in name or "norm2" in name:
        return noise.mul_(0.2).add_(1.0)
    if name.endswith("bias"):
        return noise.mul_(0.1)
    fan_in = math.prod(noise.shape[1:]) if noise.dim() > 1 else 1
    return noise.div_(math.sqrt(fan_in))


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(perturbed_(name, torch.randn(p.shape, generator=gen)))


def build_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    return build_checkpoint(path, tiny_config(), seed)


def mtp_layer_shapes(text_config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the MTP layer the real checkpoint carries as layer index num_layers
    (transformers drops it): a decoder layer's 10 tensors, enorm, hnorm, eh_proj [H, 2H],
    shared_head.norm, and its own copies of embed_tokens and shared_head.head."""
    c = text_config
    h, q, kv, inter = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
    shapes = {
        "input_layernorm.weight": (h,), "post_self_attn_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,), "post_mlp_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "mlp.gate_up_proj.weight": (2 * inter, h), "mlp.down_proj.weight": (h, inter),
        "enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h), "shared_head.norm.weight": (h,),
        "shared_head.head.weight": (c.vocab_size, h), "embed_tokens.weight": (c.vocab_size, h),
    }
    return {f"model.language_model.layers.{c.num_hidden_layers}.{name}": shape for name, shape in shapes.items()}


def mtp_layer_weights(text_config, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The MTP layer's tensors (mtp_layer_shapes), random with the magnitudes `_perturb_` gives the
    main model; its embed_tokens and shared_head.head differ from the main ones, so that a mix-up shows."""
    gen = torch.Generator().manual_seed(seed)
    return {name: perturbed_(name, torch.randn(shape, generator=gen)).to(dtype)
            for name, shape in mtp_layer_shapes(text_config).items()}


def build_checkpoint(path: Path, config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write config, safetensors weights (random, perturbed, plus an MTP layer as the real checkpoint
    has), tokenizer, chat template and preprocessor config into `path`."""
    from safetensors.torch import load_file, save_file
    from transformers import GlmOcrForConditionalGeneration

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = GlmOcrForConditionalGeneration(config).eval()
    _perturb_(model, seed)
    model.to(dtype).save_pretrained(path, max_shard_size="100GB")  # one safetensors file, as the real one
    weights = load_file(path / "model.safetensors")
    weights.update(mtp_layer_weights(config.text_config, seed + 1, dtype))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    write_processor_files(path)
    return path


def write_processor_files(path: Path) -> None:
    """Tokenizer, tokenizer config, chat template and preprocessor config into `path`."""
    build_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
    }))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
