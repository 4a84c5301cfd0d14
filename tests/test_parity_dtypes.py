"""The torch backend is bit-identical to transformers on CPU in fp32, bf16 and fp16.

transformers runs GlmOcrForConditionalGeneration with its default (sdpa) attention in the same
dtype; both sides get the token ids and pixel values glmrt's processor produced, so only model
numerics are compared. Vision embeddings, prefill logits (every row), the logits of every
decode step through the paged cache, and greedy tokens must all be equal (torch.equal).
"""
import pytest
import torch

import glmrt
from glmrt.config import ModelConfig
from glmrt.engine.runner import allocate_kv_cache
from glmrt.model.glm_ocr import GlmOcrModel
from glmrt.model.ops import make_ops
from glmrt.model.positions import mrope_positions
from glmrt.model.text import AttentionMetadata
from glmrt_testing.helpers import CASES, IMAGES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_TOKEN_ID = 59280
BLOCK_SIZE = 16
NEW_TOKENS = 28


@pytest.fixture(scope="module", params=DTYPES)
def dtype(request):
    return DTYPES[request.param]


@pytest.fixture(scope="module")
def hf(tiny_checkpoint, dtype):
    """transformers' model in `dtype` with its default attention (sdpa)."""
    from transformers import GlmOcrForConditionalGeneration

    model = GlmOcrForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype).eval()
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    return model


@pytest.fixture(scope="module")
def model(tiny_checkpoint, dtype):
    """glmrt's model on the torch backend, driven directly (no engine)."""
    return GlmOcrModel.from_pretrained(tiny_checkpoint, ModelConfig.from_pretrained(tiny_checkpoint), make_ops("torch"),
                                       torch.device("cpu"), dtype)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return glmrt.Processor.from_pretrained(tiny_checkpoint)


def processed(processor, case):
    names, prompt = CASES[case]
    images = [IMAGES[n] for n in names]
    return images, prompt, processor(images=images, prompt=prompt)


def hf_inputs_from(p) -> dict:
    """transformers' model inputs for glmrt's ProcessedPrompt `p`."""
    ids = torch.tensor([p.input_ids])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE_TOKEN_ID).int())
    if p.pixel_values is not None:
        inputs.update(pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
    return inputs


def grids_of(p) -> list[tuple[int, int, int]]:
    return [tuple(g) for g in p.image_grid_thw.tolist()] if p.image_grid_thw is not None else []


def test_vision_embeddings_bit_identical(hf, model, processor):
    p = processor(images=[IMAGES["wide"], IMAGES["page"]], prompt="x")
    ours = model.encode_images(p.pixel_values, grids_of(p))
    with torch.no_grad():
        theirs = torch.cat(hf.model.get_image_features(p.pixel_values, p.image_grid_thw).pooler_output)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs), f"max abs diff {(ours.float() - theirs.float()).abs().max()}"


@pytest.mark.parametrize("case", CASES)
def test_prefill_and_decode_logits_bit_identical(hf, model, processor, case):
    """Prefill logits of every prompt row, then NEW_TOKENS decode steps fed transformers' greedy
    tokens, through a block table whose blocks are out of order."""
    _, _, p = processed(processor, case)
    inputs = hf_inputs_from(p)
    with torch.no_grad():
        full = hf(**inputs).logits[0]
        gen = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    tokens = gen.sequences[0, len(p.input_ids):].tolist()
    steps = [s[0] for s in gen.logits]  # float32 copies of the model-dtype logits, one per new token

    ids = torch.tensor(p.input_ids)
    t = len(p.input_ids)
    positions, rope_delta = mrope_positions(p.input_ids, grids_of(p), IMAGE_TOKEN_ID, 2)
    num_blocks = -(-(t + len(tokens)) // BLOCK_SIZE)
    caches = allocate_kv_cache(model, num_blocks + 3, BLOCK_SIZE)
    table = torch.arange(num_blocks + 2, 2, -1, dtype=torch.int32)  # blocks num_blocks+2 .. 3
    slot = lambda i: int(table[i // BLOCK_SIZE]) * BLOCK_SIZE + i % BLOCK_SIZE  # noqa: E731
    attn = AttentionMetadata(slot_mapping=torch.tensor([slot(i) for i in range(t)]),
                             cu_seqlens=torch.tensor([0, t], dtype=torch.int32), max_seqlen=t)
    image_embeds = model.encode_images(p.pixel_values, grids_of(p)) if p.pixel_values is not None else None
    hidden = model.forward(ids, positions, attn, caches, image_embeds, ids == IMAGE_TOKEN_ID)
    ours = model.compute_logits(hidden)
    assert torch.equal(ours, full), f"prefill: max abs diff {(ours.float() - full.float()).abs().max()}"
    # The engine samples from the last row only, as generate does (logits_to_keep=1).
    last = model.compute_logits(hidden[-1:])[0]
    assert torch.equal(last.float(), steps[0]), f"prefill last row: max abs diff {(last.float() - steps[0]).abs().max()}"

    for n, (token, expected) in enumerate(zip(tokens[:-1], steps[1:]), start=1):
        i = t + n - 1  # cache index of the token fed in
        attn = AttentionMetadata(slot_mapping=torch.tensor([slot(i)]), block_tables=table[None],
                                 context_lens=torch.tensor([i + 1], dtype=torch.int32))
        hidden = model.forward(torch.tensor([token]), torch.full((3, 1), i + rope_delta), attn, caches)
        got = model.compute_logits(hidden)[0].float()
        assert torch.equal(got, expected), f"decode step {n}: max abs diff {(got - expected).abs().max()}"


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_identical(hf, tiny_checkpoint, dtype, case):
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype=dtype, backend="torch")
    images, prompt, p = processed(llm.processor, case)
    with torch.no_grad():
        out = hf.generate(**hf_inputs_from(p), max_new_tokens=NEW_TOKENS, do_sample=False)
    theirs = out[0, len(p.input_ids):].tolist()
    [ours] = llm.generate({"images": images, "prompt": prompt}, glmrt.SamplingParams(max_tokens=NEW_TOKENS))
    assert ours.prompt_token_ids == p.input_ids
    assert ours.token_ids == theirs
    assert len(theirs) >= 24
