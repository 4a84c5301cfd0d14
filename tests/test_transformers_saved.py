"""Checkpoints as the installed transformers writes them load in glmrt and generate what
transformers generates.

GLM-Image: the tiny checkpoint's processor rewritten in the Hub's current form (named tokens at
top level of tokenizer_config.json, `extra_special_tokens` a list; min_pixels / max_pixels), then
loaded and saved again by transformers' own AutoProcessor / GlmImageForConditionalGeneration
save_pretrained, in the diffusers pipeline layout (vision_language_encoder/ + processor/) and
flat; each loads in glmrt with greedy image tokens identical to transformers' generate on the
saved files. GLM-OCR: the tiny checkpoint saved again by transformers generates the same text.
"""
import json
import shutil

import pytest
import torch

import glmrt
from glmrt.processor import named_special_tokens
from glmrt_testing.helpers import make_image
from glmrt_testing.tiny_glm_image import MODEL_DIR, PROCESSOR_DIR, build_glm_image_checkpoint

CONDITION = make_image(90, 70, 3)
CASES = {"t2i": ("a cat on a mat", [], 96, 160), "i2i": ("make it blue", [CONDITION], 128, 96)}
GREEDY = glmrt.SamplingParams(temperature=0.0)
# The unnamed special tokens GLM's tokenizers list (additional_special_tokens before transformers 5).
UNNAMED = ["<|endoftext|>", "[gMASK]", "<|user|>", "<|assistant|>", "<sop>", "<eop>"]


def hub_form(processor_dir) -> None:
    """Rewrite processor/ as the Hub's files have it: named tokens at top level, an
    extra_special_tokens list, the pixel budget as min_pixels / max_pixels."""
    config_file = processor_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(config.pop("extra_special_tokens"), extra_special_tokens=UNNAMED)
    config_file.write_text(json.dumps(config))
    pre_file = processor_dir / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text())
    size = pre.pop("size")
    pre.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    pre_file.write_text(json.dumps(pre))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = build_glm_image_checkpoint(tmp_path_factory.mktemp("hub-form"))
    hub_form(root / PROCESSOR_DIR)
    return root


@pytest.fixture(scope="module")
def saved(hub, tmp_path_factory, torchvision_available):
    """{layout: root} of the checkpoint as transformers' save_pretrained writes it."""
    from transformers import AutoProcessor, GlmImageForConditionalGeneration

    model = GlmImageForConditionalGeneration.from_pretrained(hub / MODEL_DIR, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(hub / PROCESSOR_DIR)
    pipeline, flat = tmp_path_factory.mktemp("saved-pipeline"), tmp_path_factory.mktemp("saved-flat")
    shutil.copy(hub / "model_index.json", pipeline / "model_index.json")
    for model_dir, processor_dir in ((pipeline / MODEL_DIR, pipeline / PROCESSOR_DIR), (flat, flat)):
        model.save_pretrained(model_dir)
        processor.save_pretrained(processor_dir)
    return {"pipeline": pipeline, "flat": flat}


@pytest.fixture(scope="module")
def hf_greedy(saved):
    """Each case's greedy continuation by transformers' generate on the saved pipeline layout."""
    from transformers import AutoProcessor, GlmImageForConditionalGeneration

    root = saved["pipeline"]
    model = GlmImageForConditionalGeneration.from_pretrained(root / MODEL_DIR, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(root / PROCESSOR_DIR)
    tokens = {}
    for case, (prompt, images, height, width) in CASES.items():
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        inputs = processor(text=[text], images=images or None, target_h=height, target_w=width, return_tensors="pt")
        grids = glmrt.ImageRequest(prompt, height, width, images).targets
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=sum(h * w for _, h, w in grids) + 1)
        tokens[case] = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens


def test_the_saved_files_have_the_forms_under_test(saved):
    config = json.loads((saved["pipeline"] / PROCESSOR_DIR / "tokenizer_config.json").read_text())
    assert isinstance(config["extra_special_tokens"], list) and config["image_token"] == "<|image|>"
    assert named_special_tokens(config)["grid_bos_token"] == "<sop>"
    assert not (saved["flat"] / "preprocessor_config.json").exists()  # processor_config.json's image_processor


@pytest.mark.parametrize("layout", ["hub", "pipeline", "flat"])
def test_glm_image_loads_and_generates_as_transformers(hub, saved, hf_greedy, layout):
    llm = glmrt.LLM(str(hub if layout == "hub" else saved[layout]), device="cpu", dtype="float32", backend="torch")
    for case, (prompt, images, height, width) in CASES.items():
        [out] = llm.generate_image_tokens(prompt, height, width, images=images, sampling_params=GREEDY)
        assert out.token_ids == hf_greedy[case], case


def test_named_tokens_in_every_form():
    forms = [
        {"image_token": "<|image|>", "extra_special_tokens": ["<sop>"]},  # transformers 5 save_pretrained, the Hub
        {"extra_special_tokens": {"image_token": "<|image|>"}},  # a mapping (earlier files)
        {"model_specific_special_tokens": {"image_token": "<|image|>"}},
        {"image_token": {"__type": "AddedToken", "content": "<|image|>", "special": True}},  # an AddedToken object
    ]
    for config in forms:
        assert named_special_tokens(config)["image_token"] == "<|image|>", config


def test_glm_ocr_saved_by_transformers_generates_the_same(tiny_checkpoint, tmp_path, torchvision_available):
    from transformers import AutoProcessor, GlmOcrForConditionalGeneration

    GlmOcrForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path)
    request = glmrt.Request(prompt="Text Recognition:", images=[CONDITION])
    params = glmrt.SamplingParams(temperature=0.0, max_tokens=12)
    outputs = [glmrt.LLM(str(path), device="cpu", dtype="float32", backend="torch").generate(request, params)[0]
               for path in (tiny_checkpoint, tmp_path)]
    assert outputs[0].prompt_token_ids == outputs[1].prompt_token_ids
    assert outputs[0].token_ids == outputs[1].token_ids
