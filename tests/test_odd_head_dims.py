"""Head dims that are not powers of two, end to end: a tiny checkpoint with text head_dim 24 and
vision head_dim 20 gives transformers' greedy tokens on both backends (the Triton kernels pad
and mask their tiles), and a head dim the Triton kernels cannot run is refused when the engine is
constructed, not at the first generate."""
import pytest
import torch

import glmrt
from glmrt_testing.helpers import IMAGES
from glmrt_testing.tiny_checkpoint import _glm_ocr_config, build_checkpoint


def odd_config(vision_hidden: int):
    """Text: hidden 48, 4 q / 2 kv heads of 24 (M-RoPE sections 2+5+5); vision: 2 heads."""
    return _glm_ocr_config(48, 72, 2, 4, 2, 24, [2, 5, 5], 4096,
                           dict(depth=2, hidden_size=vision_hidden, num_heads=2, intermediate_size=64))


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("odd-head-dims"), odd_config(40))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_odd_head_dims_match_transformers(odd_checkpoint, backend):
    from transformers import GlmOcrForConditionalGeneration

    llm = glmrt.LLM(str(odd_checkpoint), device="cpu", dtype="float32", backend=backend)
    request = {"images": [IMAGES["small"]], "prompt": "Text Recognition:"}
    # 34 prompt tokens: the 16th token is decoded from slot 48, across a KV block boundary
    [ours] = llm.generate(request, glmrt.SamplingParams(max_tokens=16))
    processed = llm.processor(**request)
    hf = GlmOcrForConditionalGeneration.from_pretrained(odd_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([processed.input_ids])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == 59280).int(),
                          pixel_values=processed.pixel_values, image_grid_thw=processed.image_grid_thw,
                          max_new_tokens=16, do_sample=False)
    assert ours.token_ids == out[0, ids.shape[1]:].tolist()
    assert len(ours.token_ids) >= 8


def test_unsupported_head_dim_is_refused_at_construction(tmp_path):
    path = build_checkpoint(tmp_path / "ckpt", odd_config(36))  # vision head_dim 18: not a multiple of 4
    with pytest.raises(ValueError, match="vision head_dim 18 is not supported by the Triton kernels"):
        glmrt.LLM(str(path), device="cpu", dtype="float32", backend="triton")
    assert glmrt.LLM(str(path), device="cpu", dtype="float32", backend="torch").engine.backend == "torch"
