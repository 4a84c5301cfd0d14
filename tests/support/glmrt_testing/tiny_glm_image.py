"""Tiny random GLM-Image checkpoints built by transformers, in the Hub repo's pipeline layout.

`<root>/model_index.json` (a diffusers pipeline), `<root>/vision_language_encoder/` (config,
safetensors weights, generation config) and `<root>/processor/` (tokenizer, chat template,
image preprocessing), as zai-org/GLM-Image ships its autoregressive stage; with
build_glm_image_pipeline, the diffusion stage's folders too (a complete pipeline). Small sizes but every
structural feature of the real model: the real vocabularies (168,064 in, 16,512 out) so the
special tokens sit at GLM-Image's ids, q/k/v biases, head_dim != hidden/heads, GQA, partial NeoX
M-RoPE with three sections, a learned vision position table that must be resampled, a VQ codebook,
and weights perturbed so that norms and biases are not trivial.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from glmrt_testing.tiny_checkpoint import _perturb_

MODEL_DIR, PROCESSOR_DIR = "vision_language_encoder", "processor"  # the pipeline's AR-stage subfolders
VOCAB_SIZE = 168064
VISION_VOCAB_SIZE = 16512
IMAGE_START, IMAGE_END = 16384, 16385  # <|dit_token_16384|>, <|dit_token_16385|>: also bos / eos
SPECIAL_TOKENS = {
    "<|dit_token_16384|>": IMAGE_START, "<|dit_token_16385|>": IMAGE_END,
    "<|endoftext|>": 167841, "[gMASK]": 167842, "<|user|>": 167843, "<|assistant|>": 167844,
    "<sop>": 167845, "<eop>": 167846, "<|image|>": 167855,
}
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.9, "top_p": 0.75, "top_k": 4096,
                     "eos_token_id": IMAGE_END, "pad_token_id": 167841}

# A GLM-style chat template (our own text): condition images as image_start <|image|> image_end,
# which is where get_rope_index finds them.
CHAT_TEMPLATE = (
    "[gMASK]"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}<|user|>{{ '\\n' }}"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}{%- for item in m.content -%}"
    "{%- if item.type == 'image' -%}<|dit_token_16384|><|image|><|dit_token_16385|>"
    "{%- elif item.type == 'text' -%}{{ item.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)

PREPROCESSOR_CONFIG = {
    "image_processor_type": "GlmImageImageProcessor",
    "processor_class": "GlmImageProcessor",
    "size": {"shortest_edge": 64 * 64, "longest_edge": 192 * 192},
    "patch_size": 16,
    "temporal_patch_size": 1,
    "merge_size": 1,
    "do_rescale": True,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}


def tiny_config(num_embeddings: int = 64):
    """Text: 2 layers, hidden 48, 4 q / 2 kv heads of 32 dims, rotary over 16 of them in sections
    [2, 3, 3]; vision: 2 blocks, 8x8 position table (patch 16, image_size 128); 64 VQ codes."""
    from transformers import GlmImageConfig

    return GlmImageConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, vision_vocab_size=VISION_VOCAB_SIZE, hidden_size=48, intermediate_size=72,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [2, 3, 3]},
            max_position_embeddings=8192, rms_norm_eps=1e-5, attention_bias=True, eos_token_id=IMAGE_END,
            pad_token_id=167841,
        ),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, image_size=128, patch_size=16,
                           layer_norm_eps=1e-6),
        vq_config=dict(embed_dim=24, num_embeddings=num_embeddings, latent_channels=32),
    )


def real_config():
    """GLM-Image's real AR-stage sizes (9B), for random-weight GPU benchmarks."""
    from transformers import GlmImageConfig

    return GlmImageConfig(text_config=dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [8, 12, 12]}))


def build_tokenizer():
    """Byte-level BPE over 256 byte symbols placed after the vision vocabulary, whose ids are
    <|dit_token_i|> tokens; GLM-Image's special tokens at their real ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    by_id = {i: tok for tok, i in SPECIAL_TOKENS.items()}
    vocab = {f"<|dit_token_{i}|>": i for i in range(VISION_VOCAB_SIZE) if i not in by_id}
    merges = [("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("o", "n")]
    text_tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]
    vocab.update({t: VISION_VOCAB_SIZE + i for i, t in enumerate(text_tokens)})
    used = set(vocab.values()) | set(by_id)
    for i in range(VOCAB_SIZE):
        if i not in used:
            vocab[f"<r{i}>"] = i
    for tok, i in SPECIAL_TOKENS.items():
        vocab[tok] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_glm_image_checkpoint(root: Path, config=None, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random, perturbed model of `config` (default: tiny_config()) written in `dtype` in the
    pipeline layout under `root` -> root."""
    from transformers import GlmImageForConditionalGeneration

    torch.manual_seed(seed)
    model = GlmImageForConditionalGeneration(config or tiny_config()).eval()
    _perturb_(model, seed)
    return save_glm_image_checkpoint(root, model.to(dtype))


def save_glm_image_checkpoint(root: Path, model) -> Path:
    """Write `model` (a GlmImageForConditionalGeneration) with our tokenizer, chat template,
    image preprocessing and generation config in the pipeline layout under `root` -> root."""
    model.save_pretrained(root / MODEL_DIR, max_shard_size="100GB")
    write_pipeline_files(root)
    return root


def write_pipeline_files(root: Path) -> None:
    """Everything of the pipeline layout under `root` but the model's config and weights: our
    generation config (over the one save_pretrained writes), model_index.json and processor/."""
    model_dir, processor_dir = root / MODEL_DIR, root / PROCESSOR_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    processor_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "GlmImagePipeline", "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"],
        "processor": ["transformers", "GlmImageProcessor"],
    }))
    build_tokenizer().save(str(processor_dir / "tokenizer.json"))
    (processor_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "bos_token": "<|dit_token_16384|>", "eos_token": "<|dit_token_16385|>", "pad_token": "<|endoftext|>",
        "extra_special_tokens": {"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
    }))
    (processor_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (processor_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    (processor_dir / "processor_config.json").write_text(json.dumps({"processor_class": "GlmImageProcessor"}))


def diffusion_components() -> dict:
    """The pipeline's other components, sized as in diffusers' own GlmImagePipeline tests (random,
    fp32): 8x VAE and patch 2 give 16 pixels per DiT token, which the AR grid (32 pixels per token)
    upsampled 2x matches; the prior embedding covers the whole vision vocabulary, since a random AR
    model may emit any of its ids."""
    import diffusers
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = ByT5Tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4))
    transformer = diffusers.GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=VISION_VOCAB_SIZE)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(4, 8, 16, 16), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, norm_num_groups=4, sample_size=128, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "transformer": transformer, "vae": vae,
            "scheduler": diffusers.FlowMatchEulerDiscreteScheduler()}


def build_glm_image_pipeline(root: Path) -> Path:
    """A complete tiny GLM-Image pipeline folder under `root`, laid out as zai-org/GLM-Image: the
    AR stage of build_glm_image_checkpoint and the diffusion_components -> root."""
    return add_diffusion_components(build_glm_image_checkpoint(root))


def add_diffusion_components(root: Path) -> Path:
    """The tiny diffusion_components saved into the AR-stage checkpoint at `root` (any writer's)
    and listed in its model_index.json, making it a complete pipeline -> root."""
    index = json.loads((root / "model_index.json").read_text())
    for name, component in diffusion_components().items():
        component.save_pretrained(root / name)
        index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def reference_pipeline(root: Path):
    """diffusers' own GlmImagePipeline on the pipeline folder `root`, with its own AR stage:
    transformers' model (fp32) and processor, greedy (the pipeline samples, so top_k=1)."""
    import diffusers
    from transformers import AutoProcessor, GlmImageForConditionalGeneration

    model = GlmImageForConditionalGeneration.from_pretrained(root / MODEL_DIR, dtype=torch.float32)
    model.generation_config.top_k = 1  # the pipeline passes do_sample=True: top-1 sampling is argmax
    accept_concatenated_features(model)
    processor = AutoProcessor.from_pretrained(root / PROCESSOR_DIR)
    return diffusers.GlmImagePipeline.from_pretrained(root, vision_language_encoder=model, processor=processor)


def accept_concatenated_features(model) -> None:
    """diffusers 0.42's generate_prior_tokens torch.cat's the condition images' features before
    get_image_tokens, while transformers 5 returns them as a list of [C, h, w] that its
    get_image_tokens iterates over: give it the list back (exact for one condition image)."""
    get_image_tokens = model.get_image_tokens

    def unconcatenated(hidden_states, image_grid_thw=None):
        if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3:  # [n * C, h, w]
            hidden_states = hidden_states.chunk(len(image_grid_thw))
        return get_image_tokens(hidden_states, image_grid_thw)

    model.get_image_tokens = unconcatenated
