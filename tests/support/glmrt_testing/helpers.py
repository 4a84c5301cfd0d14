"""Shared test inputs: synthetic images, transformers-side inputs and greedy references, and a
chi-square test for sampled distributions."""
import math

import numpy as np
import torch
from PIL import Image

import glmrt


def make_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 3 + yy) % 256, (yy * 5) % 256, (xx * yy) % 256], axis=-1)
    noise = rng.integers(0, 60, size=(height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGB")


IMAGES = {"small": make_image(100, 80, 0), "wide": make_image(150, 60, 1), "page": make_image(200, 260, 2)}
CASES = {
    "no-image": ([], "Describe nothing: 你好"),
    "one-image": (["small"], "Text Recognition:"),
    "two-images": (["wide", "page"], "Table Recognition:"),
}


def hf_inputs(hf_processor, images, prompt):
    return hf_processor(glmrt.Processor.messages(len(images), prompt), images)


def hf_greedy(hf_model, hf_processor, images, prompt, max_new_tokens):
    inputs = hf_inputs(hf_processor, images, prompt)
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1]:].tolist()


def chi_square_passes(counts: torch.Tensor, probs: torch.Tensor, alpha_z: float = 3.719) -> bool:
    """Pearson's test of counts [V] against probs [V] (cells with expectation < 5 pooled), at the
    1e-4 level (z = 3.719; Wilson-Hilferty's approximation of the chi-square quantile)."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)]).double()
    expected = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)]).double()
    keep = expected > 0
    assert (observed[~keep] == 0).all(), "a token with probability 0 was drawn"
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    critical = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical
