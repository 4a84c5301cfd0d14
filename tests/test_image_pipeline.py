"""glmrt.ImagePipeline and `glmrt image` on a tiny random GLM-Image pipeline
(tiny_glm_image.build_glm_image_pipeline; fp32, CPU): the PNG is byte-identical to diffusers' own
GlmImagePipeline's (transformers' AR stage, greedy through top_k=1, the same seed) for
text-to-image, image-to-image and several prompts batched; the CLI, as a real process, writes the
same PNGs; bad sizes, prompts and condition images are refused before anything runs.
"""
import io
import re
import subprocess
from pathlib import Path

import pytest
import torch

import glmrt
from glmrt.cli import _image_paths, main
from glmrt_testing import glmrt_command
from glmrt_testing.helpers import make_image
from glmrt_testing.tiny_glm_image import reference_pipeline

pytest.importorskip("diffusers")

# 96 x 64: the AR stage's 2 x 3 grid (half size, 16-pixel patches) upsampled 2x covers the 4 x 6
# DiT tokens of its latent, as diffusers' own pipeline needs.
CONDITION = make_image(96, 64, 3)
# (prompts, condition images per prompt, height, width): a 3 x 5 and a 4 x 3 AR grid.
CASES = {
    "t2i": (["a cat on a mat"], None, 96, 160),
    "i2i": (["make it blue"], [[CONDITION]], 128, 96),
    "t2i-batch": (["a cat on a mat", "on"], None, 96, 160),
}
STEPS, SEED = 2, 7
GREEDY = glmrt.SamplingParams(temperature=0.0)
TORCH_CPU = ["--device", "cpu", "--dtype", "float32", "--backend", "torch"]


def png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference(pipeline_dir, torchvision_available):
    """Each case's PNGs from diffusers' own pipeline on transformers (computed once)."""
    pipe = reference_pipeline(pipeline_dir)
    pngs = {}
    for case, (prompts, images, height, width) in CASES.items():
        out = pipe(prompts, image=images, height=height, width=width, num_inference_steps=STEPS,
                   generator=torch.Generator().manual_seed(SEED))
        pngs[case] = [png(picture) for picture in out.images]
    return pngs


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return glmrt.ImagePipeline(str(pipeline_dir), device="cpu", dtype="float32", backend="torch")


@pytest.mark.parametrize("case", ["t2i", "i2i"])
def test_one_prompt_gives_the_picture_diffusers_gives(pipe, reference, case):
    [prompt], images, height, width = CASES[case]
    picture = pipe(prompt, height=height, width=width, image=images[0] if images else None, seed=SEED,
                   num_inference_steps=STEPS, sampling_params=GREEDY, progress=False)
    assert picture.size == (width, height)
    assert png(picture) == reference[case][0]


def test_several_prompts_share_one_ar_batch(pipe, reference, monkeypatch):
    prompts, _, height, width = CASES["t2i-batch"]
    calls = []
    generate = pipe.llm.generate_image_tokens
    monkeypatch.setattr(pipe.llm, "generate_image_tokens",
                        lambda p, *args, **kwargs: calls.append(list(p)) or generate(p, *args, **kwargs))
    pictures = pipe(prompts, height=height, width=width, seed=SEED, num_inference_steps=STEPS,
                    sampling_params=GREEDY, progress=False)
    assert calls == [prompts]
    assert [png(p) for p in pictures] == reference["t2i-batch"]


def test_a_condition_image_diffusers_cannot_take_is_resized(pipe):
    """90 x 70: the AR stage makes it 48 x 32 (a 2 x 3 grid), diffusers 80 x 64 (4 x 5 tokens) and
    fails; the pipeline gives both stages the image at 96 x 64."""
    [prompt], _, height, width = CASES["i2i"]
    odd = make_image(90, 70, 3)
    call = dict(height=height, width=width, seed=SEED, num_inference_steps=1, sampling_params=GREEDY, progress=False)
    assert png(pipe(prompt, image=odd, **call)) == png(pipe(prompt, image=odd.resize((96, 64), 3), **call))


def test_progress_shows_both_stages(pipe, capsys):
    [prompt], images, height, width = CASES["i2i"]
    pipe(prompt, height=height, width=width, image=images[0], num_inference_steps=STEPS, progress=True)
    err = capsys.readouterr().err
    assert "image tokens" in err and "13/13" in err  # the 4 x 3 grid and the image end
    assert "diffusion steps" in err and f"{STEPS}/{STEPS}" in err


@pytest.mark.parametrize(("call", "match"), [
    (dict(height=100), "height must be a multiple of 32 pixels from 32 to 2048, got 100"),
    (dict(width=4096), "width must be a multiple of 32 pixels from 32 to 2048, got 4096"),
    (dict(prompt=[]), "prompt: give at least one"),
    (dict(prompt=["a cat", " "]), "prompt 1 must be a non-empty string"),
    (dict(image=b"not an image"), "image 0: cannot decode image bytes"),
    (dict(prompt=["a", "b"], image=[CONDITION]), "one list of condition images per prompt"),
    (dict(seed=-1), "seed must be an int from 0"),
])
def test_bad_calls_are_refused_naming_the_field(pipe, call, match):
    call = {"prompt": "a cat", "height": 64, "width": 64, **call}
    with pytest.raises(ValueError, match=match):
        pipe(call.pop("prompt"), progress=False, **call)


# ----------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_same_pngs(pipeline_dir, reference, tmp_path):
    """One process: several prompts (text-to-image) to a folder; another: image-to-image to a .png path."""
    model = ["--model", str(pipeline_dir), *TORCH_CPU, "--seed", str(SEED), "--steps", str(STEPS), "--temperature", "0"]
    prompts, _, height, width = CASES["t2i-batch"]
    folder = tmp_path / "pictures"
    done = subprocess.run(glmrt_command("image", *prompts, "-o", str(folder), "--size", f"{width}x{height}", *model),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    paths = [folder / "1-a-cat-on-a-mat.png", folder / "2-on.png"]
    assert done.stdout.splitlines() == [str(p) for p in paths]
    assert [p.read_bytes() for p in paths] == reference["t2i-batch"]

    [prompt], _, height, width = CASES["i2i"]
    condition, out = tmp_path / "condition.png", tmp_path / "blue.png"
    CONDITION.save(condition)
    done = subprocess.run(glmrt_command("image", prompt, "-o", str(out), "--image", str(condition),
                                        "--size", f"{width}x{height}", *model),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(out)]
    assert out.read_bytes() == reference["i2i"][0]


def test_output_names():
    prompts = ["A red fox, in snow!", "夕焼けの富士山", "???", *["x"] * 7]
    paths = _image_paths(prompts, Path("out"))
    assert [p.name for p in paths[:4]] == ["01-a-red-fox-in-snow.png", "02-夕焼けの富士山.png", "03.png", "04-x.png"]
    assert _image_paths(["a"], Path("fox.PNG")) == [Path("fox.PNG")]


@pytest.mark.parametrize(("args", "match"), [
    (["a cat", "--size", "1000x1000"], r"--size 1000x1000: height must be a multiple of 32"),
    (["a cat", "--size", "1024x4096"], r"--size 1024x4096: height must be a multiple of 32 pixels from 32 to 2048"),
    (["a cat", "--size", "big"], r"argument --size: 'big' is not WIDTHxHEIGHT"),
    (["   "], "prompt 1 is empty"),
    (["a cat", "a dog", "-o", "x.png"], "-o x.png is one file for 2 prompts; give a folder"),
    (["a cat", "--image", "missing.png"], "--image missing.png: image file not found"),
    (["a cat", "--image", "bad.png"], "--image bad.png: cannot decode image file"),
    (["a cat", "--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_cli_usage_errors_before_loading(args, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    output = [] if "-o" in args else ["-o", "out.png"]
    assert main(["image", *args, *output, "--model", str(tmp_path / "no-model")]) == 2  # not 1: nothing loaded
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_cli_needs_a_prompt(capsys):
    assert main(["image", "-o", "out.png"]) == 2
    assert "the following arguments are required: PROMPT" in capsys.readouterr().err
