"""Test session set-up.

Without a CUDA GPU the Triton kernels run in Triton's CPU interpreter; TRITON_INTERPRET must be
set before any kernel module is imported, which is why it happens here, first.
Tests marked `gpu` are skipped cleanly when no GPU is present.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random GLM-OCR checkpoint directory written by transformers (see tiny_checkpoint.py)."""
    from tests.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-glm-ocr"))


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    """transformers' own GlmOcrForConditionalGeneration on the tiny checkpoint, fp32 eager."""
    from transformers import GlmOcrForConditionalGeneration

    return GlmOcrForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()


class HFProcessor:
    """transformers' side of preprocessing: the tokenizer's apply_chat_template, the PIL image
    processor, and Glm46VProcessor's expansion rule (each `<|image|>` becomes grid.prod() / merge²
    copies in the text before tokenizing). Glm46VProcessor itself cannot be built here: it insists
    on a video processor, which needs torchvision."""

    def __init__(self, path):
        from transformers import AutoTokenizer, Glm46VImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = Glm46VImageProcessorPil.from_pretrained(path)

    def __call__(self, messages, images):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            merge = self.image_processor.merge_size**2
            pieces = text.split("<|image|>")
            assert len(pieces) == len(images) + 1
            text = pieces[0] + "".join(
                "<|image|>" * int(grid.prod() // merge) + piece for grid, piece in zip(vision["image_grid_thw"], pieces[1:])
            )
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        out.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == 59280).int())
        return out


@pytest.fixture(scope="session")
def hf_processor(tiny_checkpoint):
    return HFProcessor(tiny_checkpoint)
