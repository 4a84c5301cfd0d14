"""A tiny GLM-OCR checkpoint fine-tuned to read three rendered pages: for speculative drafts taken
from a page's known text (a PDF's text layer), which a trained reader accepts almost entirely.

The pages are drawn with Pillow's built-in font (no font files, no network), so they are the same
pixels on every machine with FreeType. The tiny checkpoint's text layers and lm_head are trained
with Adam (its vision tower and input embedding frozen) until transformers' greedy `generate` of
"Text Recognition:" on each page is exactly the page's text followed by eos; the checkpoint's own
tensor names are kept, and its MTP layer is copied unchanged.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

PROMPT = "Text Recognition:"
PAGES = (
    ("Invoice No. 42", "Total: $17.50", "Paid!"),
    ("Meeting at 9 am;", "room B-3, floor 2."),
    ("Order #7 shipped", "ETA: Friday, 5 pm"),
)
PAGE_SIZE = (196, 84)  # 7 x 3 merged patches after the processor's resize: 21 image tokens
MAX_STEPS = 300


def render_page(lines: tuple[str, ...], size: tuple[int, int] = PAGE_SIZE) -> Image.Image:
    """Black lines of text on a white RGB page, in Pillow's embedded font."""
    try:
        font = ImageFont.load_default(size=14)  # Pillow >= 10.1 with FreeType: an embedded TrueType font
    except TypeError:  # older Pillow: the bitmap default
        font = ImageFont.load_default()
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((6, 4 + 18 * i), line, fill="black", font=font)
    return image


def _greedy_tokens(model, inputs, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def train_page_reader(tiny_checkpoint: Path, out_dir: Path) -> list[tuple[Image.Image, str, str]]:
    """Fine-tune `tiny_checkpoint` to read PAGES, write it to `out_dir` -> [(image, prompt, text)]."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor, GenerationConfig, GlmOcrForConditionalGeneration
    from transformers.utils import logging

    import glmrt

    tiny_checkpoint, out_dir = Path(tiny_checkpoint), Path(out_dir)
    torch.manual_seed(0)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the MTP layer's tensors are "unexpected" to transformers
    try:
        model = GlmOcrForConditionalGeneration.from_pretrained(
            tiny_checkpoint, dtype=torch.float32, attn_implementation="eager")
    finally:
        logging.set_verbosity(verbosity)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    eos = GenerationConfig.from_pretrained(tiny_checkpoint).eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    image_token = model.config.image_token_id

    chat = processor.apply_chat_template(glmrt.Processor.messages(1, PROMPT), tokenize=False,
                                         add_generation_prompt=True)
    cases = [(render_page(lines), PROMPT, "\n".join(lines)) for lines in PAGES]
    single = [dict(processor(text=[chat], images=[image], return_tensors="pt")) for image, _, _ in cases]
    targets = [processor.tokenizer(text, add_special_tokens=False).input_ids + [eos] for _, _, text in cases]

    # One batch of the three pages: equal pages give equal prompts; the texts are right-padded
    # (causal attention: the padding changes nothing before it) and the padding is not scored.
    batch = dict(processor(text=[chat] * len(cases), images=[image for image, _, _ in cases], return_tensors="pt"))
    prompt_len, longest = batch["input_ids"].shape[1], max(map(len, targets))
    ids = torch.full((len(cases), prompt_len + longest), eos)
    ids[:, :prompt_len] = batch["input_ids"]
    scored = torch.zeros_like(ids, dtype=torch.bool)  # position i predicts token i + 1
    for row, target in enumerate(targets):
        ids[row, prompt_len: prompt_len + len(target)] = torch.tensor(target)
        scored[row, prompt_len - 1: prompt_len - 1 + len(target)] = True
    labels = ids[:, 1:][scored[:, :-1]]
    batch.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_token).long())

    # The text model and lm_head learn; the vision tower and the input embedding stay as they are.
    model.model.visual.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(MAX_STEPS):
        optimizer.zero_grad()
        hidden = model.model(**batch).last_hidden_state[scored]
        logits = model.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        final = float(loss.detach())
        if bool((logits.argmax(-1) == labels).all()) and final < 0.02:  # right everywhere, with a margin
            break
        loss.backward()
        optimizer.step()
    model.eval()

    for inputs, target, (_, _, text) in zip(single, targets, cases):
        got = _greedy_tokens(model, inputs, len(target) + 4)
        assert got == target, (f"the page reader did not learn page {text!r} (loss {final:.4f}): greedy gave "
                               f"{processor.tokenizer.decode(got)!r}, tokens {got} against {target}")

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_checkpoint, out_dir, dirs_exist_ok=True)
    weights = load_file(tiny_checkpoint / "model.safetensors")
    trained = model.state_dict()
    missing = set(trained) - set(weights)
    assert not missing, f"transformers' parameter names are not the checkpoint's: {sorted(missing)[:5]}"
    weights.update({name: t.detach().to(weights[name].dtype).contiguous().clone() for name, t in trained.items()})
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    return cases
