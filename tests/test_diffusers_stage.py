"""glmrt as the autoregressive stage of diffusers' GlmImagePipeline, on a tiny random pipeline
(tiny_glm_image.build_glm_image_pipeline: the AR stage beside a tiny diffusion transformer, VAE,
T5 glyph encoder and scheduler sized as in diffusers' own GlmImagePipeline tests; fp32, CPU).

Greedy prior tokens identical to the pipeline's own generate_prior_tokens (transformers'
generate, greedy through top_k=1) for text-to-image and image-to-image; a full pipe(...) call on
glmrt, loaded without vision_language_encoder and processor, pixel-identical to the pipeline fed
the reference tokens; per-prompt seeds from the pipeline's generator; a generation that stops
before its grid is full is an error naming the prompt.
"""
import subprocess
import sys

import pytest
import torch

import glmrt
from glmrt.diffusers_stage import prior_tokens, use_glmrt
from glmrt_testing.helpers import make_image
from glmrt_testing.tiny_glm_image import (GENERATION_CONFIG, VISION_VOCAB_SIZE,
                                          reference_pipeline)

diffusers = pytest.importorskip("diffusers")

CONDITION = make_image(90, 70, 3)
# (prompt, condition images as the pipeline normalizes them, height, width): 3 x 5 and 4 x 3 grids.
CASES = {
    "t2i": ("a cat on a mat", None, 96, 160),
    "i2i": ("make it blue", [[CONDITION]], 128, 96),
}
GREEDY = glmrt.SamplingParams(temperature=0.0)
# Every vision id is a stop token: generation ends after its first token.
STOP_AT_ONCE = glmrt.SamplingParams(temperature=0.0, stop_token_ids=list(range(VISION_VOCAB_SIZE)))


@pytest.fixture(scope="module")
def reference_pipe(pipeline_dir, torchvision_available):
    """The pipeline with its own AR stage: transformers' model, greedy, and processor."""
    return reference_pipeline(pipeline_dir)


@pytest.fixture(scope="module")
def reference(reference_pipe):
    """Each case's triple from the pipeline's own generate_prior_tokens (computed once)."""
    triples = {}
    for case, (prompt, images, height, width) in CASES.items():
        with torch.no_grad():
            triples[case] = reference_pipe.generate_prior_tokens(
                prompt, height, width, image=images, device=torch.device("cpu"),
                generator=torch.Generator().manual_seed(0))
    return triples


@pytest.fixture(scope="module")
def llm(pipeline_dir):
    return glmrt.LLM(str(pipeline_dir), device="cpu", dtype="float32", backend="torch")


@pytest.fixture(scope="module")
def glmrt_pipe(pipeline_dir, llm):
    pipe = diffusers.GlmImagePipeline.from_pretrained(pipeline_dir, vision_language_encoder=None, processor=None)
    return use_glmrt(pipe, llm, GREEDY)


def assert_same_tensor(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype == torch.long and ours.device == theirs.device
    assert torch.equal(ours, theirs)


def assert_same_prior_tokens(ours, theirs) -> None:
    assert_same_tensor(ours[0], theirs[0])
    for mine, ref in zip(ours[1:], theirs[1:]):  # per-prompt lists, or None for text-to-image
        assert (mine is None) == (ref is None)
        if ref is not None:
            assert len(mine) == len(ref)
            for x, y in zip(mine, ref):
                assert_same_tensor(x, y)


# ------------------------------------------------------------------------------ the AR stage


@pytest.mark.parametrize("case", CASES)
def test_prior_tokens_match_the_pipelines_own(llm, reference, case):
    prompt, images, height, width = CASES[case]
    ours = prior_tokens(llm, prompt, height, width, image=images, sampling_params=GREEDY)
    assert_same_prior_tokens(ours, reference[case])
    ids, codes, grids = ours
    assert ids.shape == (1, 4 * (height // 32) * (width // 32))
    if images:
        [[[t, h, w]]] = [g.tolist() for g in grids]
        assert t == 1 and codes[0].shape == (h * w,)


def test_images_in_the_pipelines_forms(llm):
    prompt, images, height, width = CASES["i2i"]
    assert diffusers.GlmImagePipeline._validate_and_normalize_images([CONDITION], 1) == images
    one_prompt = prior_tokens(llm, prompt, height, width, image=[CONDITION], sampling_params=GREEDY)
    assert_same_prior_tokens(one_prompt, prior_tokens(llm, prompt, height, width, image=images,
                                                      sampling_params=GREEDY))
    for image, match in [([CONDITION], "one list of condition images per prompt"),
                         ([[CONDITION]], "1 lists of condition images for 2 prompts"),
                         ([[CONDITION], []], r"image\[1\] is empty")]:
        with pytest.raises(ValueError, match=match):
            prior_tokens(llm, [prompt, prompt], height, width, image=image)


def test_generator_seeds_each_prompt(llm, monkeypatch):
    """seed + i (mod 2**64) per prompt over the checkpoint's sampling defaults, so a seeded batch
    is reproducible and its prompts are sampled independently."""
    prompt, images, height, width = CASES["i2i"]
    generate, seen = llm.generate_image_tokens, []

    def recording(*args, sampling_params=None, **kwargs):
        seen.append(sampling_params)
        return generate(*args, sampling_params=sampling_params, **kwargs)

    monkeypatch.setattr(llm, "generate_image_tokens", recording)
    runs = [prior_tokens(llm, [prompt] * 2, height, width, image=images * 2,
                         generator=torch.Generator().manual_seed(2**64 - 1)) for _ in range(2)]
    assert [[p.seed for p in params] for params in seen] == [[2**64 - 1, 0]] * 2
    assert all(p.temperature == GENERATION_CONFIG["temperature"] for p in seen[0])
    assert_same_prior_tokens(runs[0], runs[1])
    assert not torch.equal(runs[0][0][0], runs[0][0][1])
    prior_tokens(llm, prompt, height, width, image=images, generator=torch.Generator().manual_seed(7),
                 sampling_params=GREEDY)
    assert (seen[-1][0].seed, seen[-1][0].temperature) == (7, 0.0)


def test_a_grid_cut_short_is_an_error_naming_the_prompt(llm, glmrt_pipe):
    prompt, images, height, width = CASES["i2i"]
    cut_short = r"prompt 1 \('make it red'\): generation ended \(stop\) after 1 of 13 tokens, before its 4 x 3 grid"
    with pytest.raises(RuntimeError, match=cut_short):
        prior_tokens(llm, [prompt, "make it red"], height, width, image=images * 2,
                     sampling_params=[GREEDY, STOP_AT_ONCE])
    stopping = use_glmrt(diffusers.GlmImagePipeline(**glmrt_pipe.components), llm, STOP_AT_ONCE)
    prompt, _, height, width = CASES["t2i"]
    with pytest.raises(RuntimeError, match=r"prompt 0 \('a cat on a mat'\).*3 x 5 grid"):
        stopping(prompt, height=height, width=width, num_inference_steps=2)


# -------------------------------------------------------------------------- the whole pipeline


def test_pipeline_runs_on_glmrt(glmrt_pipe, reference_pipe, reference):
    assert glmrt_pipe.vision_language_encoder is None and glmrt_pipe.processor is None
    assert "generate_prior_tokens" in vars(glmrt_pipe) and "generate_prior_tokens" not in vars(reference_pipe)
    prompt, _, height, width = CASES["t2i"]
    call = dict(height=height, width=width, num_inference_steps=2, output_type="pt")
    with torch.no_grad():
        image = glmrt_pipe(prompt, generator=torch.Generator().manual_seed(0), **call).images
        theirs = reference_pipe(prompt, prior_token_ids=reference["t2i"][0], generator=torch.Generator().manual_seed(0),
                                **call).images
    assert image.shape == (1, 3, height, width) and torch.isfinite(image).all()
    assert torch.equal(image, theirs)


def test_glmrt_imports_without_diffusers():
    code = "import sys; sys.modules['diffusers'] = None; import glmrt, glmrt.diffusers_stage"
    subprocess.run([sys.executable, "-c", code], check=True)
