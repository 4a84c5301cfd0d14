"""glmrt.Processor against transformers' default processor (AutoProcessor), and its load errors."""
import shutil

import numpy as np
import pytest

import glmrt
from glmrt_testing.helpers import CASES, IMAGES

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json")


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint's processor files (no weights), free to modify."""
    for name in PROCESSOR_FILES:
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    return tmp_path


EXTRA_CASES = {
    "odd-sizes": ([IMAGES["wide"], IMAGES["small"].convert("RGBA"), IMAGES["page"].convert("L")], "Formula Recognition:"),
    "same-shape-twice": ([IMAGES["small"], IMAGES["small"].transpose(0)], "Text Recognition:"),
}


@pytest.mark.parametrize("case", sorted(CASES) + sorted(EXTRA_CASES))
def test_matches_auto_processor(tiny_checkpoint, hf_processor, case):
    """Same input_ids, bit-identical pixel_values and the same grids as AutoProcessor, which picks
    the torchvision image processor; glmrt's default backend is that one."""
    assert type(hf_processor.processor.image_processor).__name__ == "Glm46VImageProcessor"
    if case in CASES:
        names, prompt = CASES[case]
        images = [IMAGES[n] for n in names]
    else:
        images, prompt = EXTRA_CASES[case]
    ours = glmrt.Processor.from_pretrained(tiny_checkpoint)(images, prompt)
    theirs = hf_processor(glmrt.Processor.messages(len(images), prompt), images)
    assert ours.input_ids == theirs["input_ids"][0].tolist()
    if not images:
        assert ours.pixel_values is None and "pixel_values" not in theirs
        return
    np.testing.assert_array_equal(ours.image_grid_thw.numpy(), theirs["image_grid_thw"].numpy())
    np.testing.assert_array_equal(ours.pixel_values.numpy(), theirs["pixel_values"].numpy())


def test_image_backend_option(tiny_checkpoint):
    assert glmrt.Processor.from_pretrained(tiny_checkpoint).image_processor.backend == "torchvision"
    assert glmrt.Processor.from_pretrained(tiny_checkpoint, image_backend="pil").image_processor.backend == "pil"
    with pytest.raises(ValueError, match=r"ImageProcessor.backend .*'fast'"):
        glmrt.Processor.from_pretrained(tiny_checkpoint, image_backend="fast")


@pytest.mark.parametrize("prompt", ["<|video|>", "describe <|video|> and <|video|>"])
def test_video_token_rejected(tiny_checkpoint, hf_processor, prompt):
    with pytest.raises(ValueError, match=r"<\|video\|>"):
        glmrt.Processor.from_pretrained(tiny_checkpoint)([IMAGES["small"]], prompt)
    with pytest.raises(ValueError, match=r"<\|video\|>"):  # transformers refuses it too
        hf_processor(glmrt.Processor.messages(1, prompt), [IMAGES["small"]])


def test_image_slot_count_checked(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"2 <\|image\|> slots for 1 images"):
        glmrt.Processor.from_pretrained(tiny_checkpoint)([IMAGES["small"]], "<|image|>")


def test_corrupt_tokenizer_json(checkpoint):
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", ')
    with pytest.raises(ValueError, match="cannot load the tokenizer") as info:
        glmrt.Processor.from_pretrained(checkpoint)
    message = str(info.value)
    assert str(checkpoint / "tokenizer.json") in message and "\n" not in message


@pytest.mark.parametrize("in_config", [False, True])
def test_chat_template_syntax_error(checkpoint, in_config):
    broken = "{% for m in messages %}{{ m.content }"
    if in_config:
        (checkpoint / "chat_template.jinja").unlink()
        (checkpoint / "tokenizer_config.json").write_text(f'{{"chat_template": "{broken}"}}')
        origin = "tokenizer_config.json (chat_template)"
    else:
        (checkpoint / "chat_template.jinja").write_text(broken)
        origin = "chat_template.jinja"
    with pytest.raises(ValueError, match="chat template syntax error at line 1") as info:
        glmrt.Processor.from_pretrained(checkpoint)
    message = str(info.value)
    assert origin in message and "\n" not in message


@pytest.mark.parametrize(
    "template,cause",
    [
        ("{{ raise_exception('no system role here') }}", "no system role here"),
        ("{% if messages %}{{ messages | no_such_filter }}{% endif %}", "no_such_filter"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
    ],
)
def test_chat_template_render_error(checkpoint, template, cause):
    (checkpoint / "chat_template.jinja").write_text(template)
    processor = glmrt.Processor.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="chat template .*chat_template.jinja failed to render") as info:
        processor([], "hello")
    assert cause in str(info.value)


def test_tokenizer_config_not_json(checkpoint):
    (checkpoint / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        glmrt.Processor.from_pretrained(checkpoint)


@pytest.mark.parametrize("file", ["preprocessor_config.json", "processor_config.json"])
def test_processor_class(checkpoint, file):
    (checkpoint / file).write_text('{"processor_class": "GlmOcrProcessor"}')
    assert glmrt.Processor.from_pretrained(checkpoint).image_token_id == 59280
    (checkpoint / file).write_text('{"processor_class": "LlavaProcessor"}')
    with pytest.raises(ValueError, match=r"processor_class='LlavaProcessor' is not a GLM-OCR processor") as info:
        glmrt.Processor.from_pretrained(checkpoint)
    assert file in str(info.value)
