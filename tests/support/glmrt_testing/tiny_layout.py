"""A tiny random PP-DocLayoutV3 checkpoint built by transformers, for layout tests.

Small widths, one block per backbone stage, two decoder layers and 40 queries, but the real
25 classes (the SDK's id2label), the real 800x800 input and 200x200 masks, so every step of the
post-processing runs as on the real model. Random weights need help to give a page something to
post-process:

* weights are drawn at unit gain and every batch norm is calibrated on two synthetic pages
  (transformers' init leaves activations ~1e-20 after a few layers);
* `mask_enhanced` is off: with random weights the mask-derived initial boxes all cover the page,
  while the anchor-derived ones spread over it;
* the box, mask and class heads are scaled so that a page gets a few dozen boxes above 0.3, of
  several classes (abandoned ones included), overlapping and nested, with ragged masks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from glmrt.documents.layout import LABEL_TASK, LABELS, preprocess

# What PPDocLayoutV3ImageProcessor().save_pretrained writes (tests/test_layout.py checks it).
PREPROCESSOR_CONFIG = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0, 0, 0],
    "image_processor_type": "PPDocLayoutV3ImageProcessor",
    "image_std": [1, 1, 1],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 800, "width": 800},
}


def tiny_layout_config():
    from transformers import PPDocLayoutV3Config

    width = 16
    backbone = dict(
        model_type="hgnet_v2", embedding_size=8, depths=[1, 1, 1, 1], hidden_sizes=[width] * 4,
        stem_channels=[3, 8, 8], stage_in_channels=[8, width, width, width], stage_mid_channels=[8] * 4,
        stage_out_channels=[width] * 4, stage_num_blocks=[1] * 4, stage_numb_of_layers=[1] * 4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    id2label = dict(enumerate(LABELS))
    return PPDocLayoutV3Config(
        backbone_config=backbone, id2label=id2label, label2id={v: k for k, v in id2label.items()},
        encoder_hidden_dim=width, encoder_in_channels=[width] * 3, encoder_ffn_dim=32, encoder_attention_heads=2,
        mask_feature_channels=[8, 8], x4_feat_dim=width, d_model=width, num_prototypes=8, num_queries=40,
        decoder_in_channels=[width] * 3, decoder_ffn_dim=32, decoder_layers=2, decoder_attention_heads=2,
        num_denoising=0, global_pointer_head_size=8, mask_enhanced=False,
    )


def synthetic_page(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A white page with a dozen coloured blocks."""
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    for _ in range(12):
        x, y = int(rng.integers(0, width - 50)), int(rng.integers(0, height - 30))
        w, h = int(rng.integers(30, width // 2)), int(rng.integers(10, height // 6))
        draw.rectangle([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 200, 3)))
    return page


def build_tiny_layout_checkpoint(path: Path, seed: int = 0) -> Path:
    """Writes config.json, model.safetensors and preprocessor_config.json into `path`."""
    from transformers import PPDocLayoutV3ForObjectDetection

    torch.manual_seed(seed)
    model = PPDocLayoutV3ForObjectDetection(tiny_layout_config()).eval()
    net = model.model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.normal_(0.0, 1.0 / math.sqrt(module.weight[0].numel()))
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
            elif hasattr(module, "running_var") or isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        for head in (net.decoder.bbox_embed, net.enc_bbox_head):  # boxes of 5-40% of the page
            head.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.8, 0.8]))
        net.mask_query_head.layers[-1].weight.mul_(5.0)  # masks cut through boxes
        net.mask_query_head.layers[-1].bias.zero_()
        net.decoder.class_embed.weight.normal_(0.0, 12.0 / math.sqrt(net.config.d_model))
        net.decoder.class_embed.bias.uniform_(-2.0, 0.0)
        abandoned = torch.tensor([LABEL_TASK[label] == "abandon" for label in LABELS])
        net.decoder.class_embed.bias[abandoned] -= 1.5  # most boxes should survive to regions
        _calibrate_norms(model, np.random.default_rng(seed))
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    return path


def _calibrate_norms(model, rng: np.random.Generator) -> None:
    """Sets every batch norm's running statistics to those of its input on two synthetic pages,
    layer by layer in one forward pass, so that activations stay near unit scale."""
    def take_stats(module, args):
        x = args[0]  # [B, C, H, W]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(take_stats) for m in model.modules() if hasattr(m, "running_var")]
    pages = [synthetic_page(rng, 800, 1100), synthetic_page(rng, 1100, 800)]
    model(pixel_values=preprocess(pages)["pixel_values"])
    for hook in hooks:
        hook.remove()
