"""Test session set-up.

Without a CUDA GPU the Triton kernels run in Triton's CPU interpreter; TRITON_INTERPRET must be
set before any kernel module is imported, which is why it happens here, first.
Tests marked `gpu` are skipped cleanly when no GPU is present.

transformers' reference processor is its default, torchvision-backed one. On CPU-only machines
torchvision comes from `.torchvision/` in the repository root (tests/vendored_torchvision.py), put
on the path here, before transformers is imported.
"""
import os
import sys
from pathlib import Path

from glmrt_testing import REPO

# `python -m pytest` puts its working directory first on sys.path; from the repository root that
# makes the top-level `kernels/` folder importable as `kernels`, in place of the Hub's package that
# transformers imports. Nothing has imported transformers yet: drop the root before anything does.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]

import pytest  # noqa: E402
import torch  # noqa: E402

from glmrt_testing.vendored_torchvision import TORCHVISION_DIR, use_vendored_torchvision  # noqa: E402

use_vendored_torchvision()

HAS_CUDA = torch.cuda.is_available()
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's command): the workers share the cores, so each runs torch on one
    # thread, and so do the servers and scripts its tests start (they inherit the variable).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
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
    from glmrt_testing.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-glm-ocr"))


@pytest.fixture(scope="session")
def page_reader(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint fine-tuned to read three rendered pages (see page_reader.py) ->
    (checkpoint directory, [(image, prompt, text)])."""
    from glmrt_testing.page_reader import train_page_reader

    path = tmp_path_factory.mktemp("tiny-glm-ocr-page-reader")
    return path, train_page_reader(tiny_checkpoint, path)


@pytest.fixture(scope="session")
def tiny_layout_checkpoint(tmp_path_factory):
    """A tiny random PP-DocLayoutV3 checkpoint directory written by transformers (see tiny_layout.py)."""
    from glmrt_testing.tiny_layout import build_tiny_layout_checkpoint

    return build_tiny_layout_checkpoint(tmp_path_factory.mktemp("tiny-pp-doclayout-v3"))


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """A complete tiny GLM-Image pipeline folder, laid out as zai-org/GLM-Image is (see tiny_glm_image.py)."""
    from glmrt_testing.tiny_glm_image import build_glm_image_pipeline

    return build_glm_image_pipeline(tmp_path_factory.mktemp("tiny-glm-image-pipeline"))


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    """transformers' own GlmOcrForConditionalGeneration on the tiny checkpoint, fp32 eager."""
    from transformers import GlmOcrForConditionalGeneration

    return GlmOcrForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def require_torchvision() -> None:
    """Fails (on CI, where .ci/run installs it) or skips (elsewhere) when torchvision is missing."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    reason = f"torchvision is not importable: install it with `pip install --no-deps torchvision==0.28.0 --target {TORCHVISION_DIR}`"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


class HFProcessor:
    """transformers' default processor for the checkpoint (AutoProcessor: Glm46VProcessor with the
    torchvision image processor), applied to chat messages the way its apply_chat_template does."""

    def __init__(self, path):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)

    def __call__(self, messages, images):
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return dict(self.processor(text=[text], images=list(images) or None, return_tensors="pt"))


@pytest.fixture(scope="session")
def torchvision_available():
    """Requests torchvision for a test: see require_torchvision."""
    require_torchvision()


@pytest.fixture(scope="session")
def hf_processor(tiny_checkpoint, torchvision_available):
    return HFProcessor(tiny_checkpoint)
