"""glmrt_testing.random_weights, the fast writer of random checkpoints, against the transformers-based
builders it stands in for.

On the CPU in float32 and bfloat16 it writes the builders' very files (tensor names, shapes, dtypes
and values, configs, tokenizer, templates), byte for byte; glmrt and transformers load what it
writes (bf16 on disk, fp32 in memory) and agree on logits and greedy tokens; seeds are reproducible;
the sharded layout (GLM-Image's 9B) loads as the single file does; and at the real sizes, without
writing anything, its tensors are exactly those glmrt's loader expects.
"""
import hashlib

import pytest
import torch

import glmrt
from glmrt.config import GlmImageConfig, ModelConfig
from glmrt.engine.runner import allocate_kv_cache
from glmrt.loader import INDEX_FILE, SINGLE_FILE, expected_shapes, mtp_shapes, unused_names
from glmrt.model.positions import glm_image_positions, mrope_positions
from glmrt.model.text import AttentionMetadata
from glmrt_testing import random_weights, tiny_checkpoint, tiny_glm_image
from glmrt_testing.helpers import IMAGES, hf_greedy, hf_inputs, make_image
from glmrt_testing.random_weights import meta_model, saved_shapes, write_glm_image, write_glm_ocr

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def file_digests(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tensors(root) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files under root (a single file or shards)."""
    from safetensors.torch import load_file

    return {name: t for file in sorted(root.rglob("*.safetensors")) for name, t in load_file(file).items()}


def signatures(model_dir) -> dict[str, tuple]:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors(model_dir).items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_glm_ocr_is_build_checkpoints_files(tmp_path, dtype):
    ours = write_glm_ocr(tmp_path / "ours", tiny_checkpoint.tiny_config(), device="cpu", dtype=DTYPES[dtype], seed=3)
    theirs = tiny_checkpoint.build_checkpoint(tmp_path / "theirs", tiny_checkpoint.tiny_config(), 3, DTYPES[dtype])
    assert signatures(ours) == signatures(theirs)  # names (MTP layer included), shapes, dtypes
    assert file_digests(ours) == file_digests(theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_glm_image_is_build_glm_image_checkpoints_files(tmp_path, dtype):
    ours = write_glm_image(tmp_path / "ours", tiny_glm_image.tiny_config(), device="cpu", dtype=DTYPES[dtype], seed=3)
    theirs = tiny_glm_image.build_glm_image_checkpoint(tmp_path / "theirs", seed=3, dtype=DTYPES[dtype])
    model_dir = tiny_glm_image.MODEL_DIR
    assert signatures(ours / model_dir) == signatures(theirs / model_dir)
    assert file_digests(ours) == file_digests(theirs)


@pytest.mark.parametrize("write, config", [(write_glm_ocr, tiny_checkpoint.tiny_config),
                                           (write_glm_image, tiny_glm_image.tiny_config)], ids=["glm-ocr", "glm-image"])
def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, write, config):
    first, again, other = (write(tmp_path / name, config(), device="cpu", seed=seed)
                           for name, seed in (("first", 5), ("again", 5), ("other", 6)))
    assert file_digests(first) == file_digests(again)
    a, b = tensors(first), tensors(other)
    assert a.keys() == b.keys() and all(a[n].dtype == torch.bfloat16 for n in a)
    assert not any(torch.equal(a[n], b[n]) for n in a)


def test_sharded_write_loads_as_the_single_file(tmp_path, monkeypatch):
    """Shards and their index (GLM-Image's 9B takes 5), written over a single-file checkpoint: the
    same tensors as the single file, which is gone, and both glmrt and transformers load them."""
    from transformers import GlmImageForConditionalGeneration

    root = write_glm_image(tmp_path, tiny_glm_image.tiny_config(), device="cpu", dtype=torch.float32)
    model_dir = root / tiny_glm_image.MODEL_DIR
    expected = tensors(model_dir)
    monkeypatch.setattr(random_weights, "SHARD_BYTES", 8 << 20)
    write_glm_image(tmp_path, tiny_glm_image.tiny_config(), device="cpu", dtype=torch.float32)
    assert (model_dir / INDEX_FILE).is_file() and not (model_dir / SINGLE_FILE).exists()
    assert len(list(model_dir.glob("*.safetensors"))) > 2
    got = tensors(model_dir)
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in got)
    glmrt.LLM(str(root), device="cpu", dtype="float32", backend="torch")
    hf = GlmImageForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    assert all(torch.equal(t, expected[n]) for n, t in hf.state_dict().items())


def test_glm_ocr_loads_in_glmrt_and_transformers(tmp_path, hf_processor):
    """bf16 on disk, fp32 on both sides: prefill logits within 1e-4, the same greedy tokens.
    (hf_processor is the tiny checkpoint's: the writer writes the same processor files.)"""
    from transformers import GlmOcrForConditionalGeneration

    path = write_glm_ocr(tmp_path, tiny_checkpoint.tiny_config(), device="cpu", dtype=torch.bfloat16, seed=1)
    llm = glmrt.LLM(str(path), device="cpu", dtype="float32", backend="torch")
    hf = GlmOcrForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    images, prompt = [IMAGES["small"]], "Text Recognition:"

    inputs = hf_inputs(hf_processor, images, prompt)
    with torch.no_grad():
        theirs = hf(**inputs).logits[0]
    model = llm.engine.model
    ids = inputs["input_ids"][0]
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    positions, _ = mrope_positions(ids.tolist(), grids, 59280, 2)
    t = len(ids)
    caches = allocate_kv_cache(model, -(-t // 16), 16)
    attn = AttentionMetadata(slot_mapping=torch.arange(t), cu_seqlens=torch.tensor([0, t], dtype=torch.int32), max_seqlen=t)
    ours = model.compute_logits(model.forward(ids, positions, attn, caches, model.encode_images(inputs["pixel_values"], grids),
                                              ids == 59280))
    assert (ours - theirs).abs().max() / theirs.abs().max() <= 1e-4

    [out] = llm.generate([{"images": images, "prompt": prompt}], glmrt.SamplingParams(max_tokens=6, ignore_eos=True))
    assert out.token_ids == hf_greedy(hf, hf_processor, images, prompt, 6)[1]


def test_glm_image_loads_in_glmrt_and_transformers(tmp_path, torchvision_available):
    """bf16 on disk, fp32 on both sides: the text-to-image prompt's last logits within 1e-4, and an
    image-to-image request's greedy tokens (its condition image through the vision model and the VQ
    codebook) equal transformers' generate."""
    from transformers import AutoProcessor, GlmImageForConditionalGeneration

    root = write_glm_image(tmp_path, tiny_glm_image.tiny_config(), device="cpu", dtype=torch.bfloat16, seed=1)
    llm = glmrt.LLM(str(root), device="cpu", dtype="float32", backend="torch")
    hf = GlmImageForConditionalGeneration.from_pretrained(root / tiny_glm_image.MODEL_DIR, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(root / tiny_glm_image.PROCESSOR_DIR)

    def hf_inputs_for(prompt, images, height, width):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        return dict(processor(text=[text], images=images or None, target_h=height, target_w=width, return_tensors="pt"))

    inputs = hf_inputs_for("a cat on a mat", [], 64, 64)
    with torch.no_grad():
        theirs = hf(**inputs).logits[0, -1]
    model = llm.engine.model
    ids = inputs["input_ids"][0]
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    positions, _ = glm_image_positions(ids.tolist(), grids, tiny_glm_image.IMAGE_START, tiny_glm_image.IMAGE_END)
    t = len(ids)
    caches = allocate_kv_cache(model, -(-t // 16), 16)
    attn = AttentionMetadata(slot_mapping=torch.arange(t), cu_seqlens=torch.tensor([0, t], dtype=torch.int32), max_seqlen=t)
    ours = model.compute_logits(model.forward(ids, positions, attn, caches))[-1]
    assert (ours - theirs).abs().max() / theirs.abs().max() <= 1e-4

    condition = make_image(40, 56, 7)
    [out] = llm.generate_image_tokens("make it blue", 64, 64, images=[condition],
                                      sampling_params=glmrt.SamplingParams(temperature=0.0))
    inputs = hf_inputs_for("make it blue", [condition], 64, 64)
    with torch.no_grad():
        generated = hf.generate(**inputs, max_new_tokens=len(out.token_ids), do_sample=False)
    assert out.token_ids == generated[0, inputs["input_ids"].shape[1]:].tolist()


def test_real_size_tensors_are_what_glmrt_loads():
    """The real configs' tensors as the writer plans them (meta device: nothing allocated) are
    exactly the ones glmrt's loader expects, GLM-OCR's MTP layer included."""
    from transformers import GlmImageForConditionalGeneration, GlmOcrForConditionalGeneration

    config = tiny_checkpoint.real_config()
    planned = saved_shapes(meta_model(GlmOcrForConditionalGeneration, config, torch.bfloat16))
    planned.update(tiny_checkpoint.mtp_layer_shapes(config.text_config))
    ours = ModelConfig.from_dict(config.to_dict())
    assert planned == {**expected_shapes(ours), **mtp_shapes(ours)}

    config = tiny_glm_image.real_config()
    planned = saved_shapes(meta_model(GlmImageForConditionalGeneration, config, torch.bfloat16))
    ours = GlmImageConfig.from_dict(config.to_dict())
    expected = expected_shapes(ours)
    assert set(planned) - set(expected) == set(unused_names(ours))
    assert {n: s for n, s in planned.items() if n in expected} == expected
    assert 9e9 < sum(torch.Size(s).numel() for s in planned.values()) < 11e9
