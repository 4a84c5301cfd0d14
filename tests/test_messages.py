"""Chat messages and raw token-id prompts as requests, against transformers.

A `messages` request must give the input_ids, pixel_values and image_grid_thw that transformers'
`processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)` gives for the
same chat (roles and part order as given), and the same greedy tokens as `model.generate`. A
`prompt_token_ids` request skips the chat template: the ids of a rendered prompt generate what that
prompt does. Invalid requests fail naming the field.
"""
import numpy as np
import pytest
import torch

import glmrt
from glmrt_testing.helpers import IMAGES

MAX_TOKENS = 8
IMAGE_ID, VIDEO_ID, VOCAB = 59280, 59281, 59392  # the tiny checkpoint's (GLM-OCR's) ids and vocabulary


def image(name):
    return {"type": "image", "image": IMAGES[name]}


def text(value):
    return {"type": "text", "text": value}


# transformers' form: image parts carry their image.
CHATS = {
    "text-first": [{"role": "user", "content": [text("Text Recognition:"), image("small")]}],
    "image-first": [{"role": "user", "content": [image("wide"), text("Table Recognition:")]}],
    "interleaved": [{"role": "user", "content": [
        text("Left:"), image("wide"), text(" right:"), image("page"), text(" Formula Recognition:"),
    ]}],
    "system-and-history": [
        {"role": "system", "content": "You read documents."},
        {"role": "user", "content": [image("small"), text("Text Recognition:")]},
        {"role": "assistant", "content": "a previous answer"},
        {"role": "user", "content": [text("And this one:"), image("page")]},
    ],
    "text-only": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Describe nothing: 你好"},
    ],
}


def as_request(chat):
    """glmrt's form of a transformers chat: {"type": "image"} parts, the images in part order."""
    images, messages = [], []
    for message in chat:
        content = message["content"]
        if not isinstance(content, str):
            images += [part["image"] for part in content if part["type"] == "image"]
            content = [{"type": "image"} if part["type"] == "image" else part for part in content]
        messages.append({"role": message["role"], "content": content})
    return {"messages": messages, "images": images}


def hf_inputs(hf_processor, chat):
    return hf_processor.processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")


@pytest.mark.parametrize("case", list(CHATS))
def test_processor_matches_apply_chat_template(tiny_checkpoint, hf_processor, case):
    request = as_request(CHATS[case])
    ours = glmrt.Processor.from_pretrained(tiny_checkpoint)(request["images"], messages=request["messages"])
    theirs = hf_inputs(hf_processor, CHATS[case])
    assert ours.input_ids == theirs["input_ids"][0].tolist()
    if not request["images"]:
        assert ours.pixel_values is None and "pixel_values" not in theirs
        return
    np.testing.assert_array_equal(ours.image_grid_thw.numpy(), theirs["image_grid_thw"].numpy())
    np.testing.assert_array_equal(ours.pixel_values.numpy(), theirs["pixel_values"].numpy())


def test_part_order_is_kept(tiny_checkpoint):
    """Text-first and image-first render differently: the order is the caller's, not the model card's."""
    processor = glmrt.Processor.from_pretrained(tiny_checkpoint)
    first = [{"role": "user", "content": [text("Text Recognition:"), {"type": "image"}]}]
    ids = processor([IMAGES["small"]], messages=first).input_ids
    assert ids != processor([IMAGES["small"]], prompt="Text Recognition:").input_ids
    assert ids.index(IMAGE_ID) > ids.index(processor.tokenizer.token_to_id("<|user|>")) + 2


@pytest.mark.parametrize("case", ["text-first", "system-and-history"])
def test_greedy_tokens_match_generate(llm, hf_model, hf_processor, case):
    inputs = hf_inputs(hf_processor, CHATS[case])
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    [ours] = llm.generate(as_request(CHATS[case]), glmrt.SamplingParams(max_tokens=MAX_TOKENS))
    assert ours.prompt_token_ids == prompt
    assert ours.token_ids == out[0, len(prompt):].tolist()


def test_prompt_token_ids_generate_as_the_prompt(llm, hf_processor):
    """The ids of a rendered prompt (rendered by transformers), sent raw, generate what the prompt does."""
    prompt = "a text-only prompt"
    ids = hf_processor(glmrt.Processor.messages(0, prompt), [])["input_ids"][0].tolist()
    params = glmrt.SamplingParams(max_tokens=MAX_TOKENS)
    from_prompt, from_ids, from_request = llm.generate(
        [{"prompt": prompt}, {"prompt_token_ids": ids}, glmrt.Request(prompt_token_ids=list(np.array(ids)))], params
    )
    assert from_prompt.prompt_token_ids == ids
    assert from_ids.prompt_token_ids == ids and from_request.prompt_token_ids == ids
    assert from_ids.token_ids == from_prompt.token_ids == from_request.token_ids
    assert len(from_prompt.token_ids) == MAX_TOKENS


def test_prompt_token_ids_without_template(llm):
    """Raw ids are used as they are: no [gMASK]<sop> or turn tokens are added."""
    [out] = llm.generate({"prompt_token_ids": [72, 101, 108]}, glmrt.SamplingParams(max_tokens=2))
    assert out.prompt_token_ids == [72, 101, 108] and len(out.token_ids) == 2


@pytest.mark.parametrize(
    "ids,error",
    [
        ([5, -1], r"request\['prompt_token_ids'\]\[1\] = -1 is not in the vocabulary \[0, 59392\)"),
        ([VOCAB], r"request\['prompt_token_ids'\]\[0\] = 59392 is not in the vocabulary"),
        ([5, 6, IMAGE_ID], r"request\['prompt_token_ids'\]\[2\] = 59280 is the <\|image\|> token, which needs pixels"),
        ([VIDEO_ID], r"request\['prompt_token_ids'\]\[0\] = 59281 is the <\|video\|> token"),
        ([], r"request\['prompt_token_ids'\] must not be empty"),
        ([5, "6"], r"request\['prompt_token_ids'\]\[1\] must be an int, got str"),
        ([5.0], r"request\['prompt_token_ids'\]\[0\] must be an int, got float"),
        ([5, True], r"request\['prompt_token_ids'\]\[1\] must be an int, got bool"),
        ("5 6", r"request\['prompt_token_ids'\] must be a list of ints, got str"),
    ],
)
def test_bad_prompt_token_ids(llm, ids, error):
    with pytest.raises(ValueError, match=error):
        llm.generate({"prompt_token_ids": ids})
    assert not llm.engine.has_unfinished() and not llm.engine.request_ids


USER_IMAGE = [{"role": "user", "content": [{"type": "image"}, text("Text Recognition:")]}]


@pytest.mark.parametrize(
    "request_,error",
    [
        ({"prompt": "x", "extra": 1}, r"request has unknown keys \['extra'\]"),
        ({"prompt": "x", "messages": USER_IMAGE, "images": [IMAGES["small"]]},
         r"exactly one of .*got \['prompt', 'messages'\]"),
        ({"prompt": "x", "prompt_token_ids": [1]}, r"exactly one of .*got \['prompt', 'prompt_token_ids'\]"),
        ({"images": [IMAGES["small"]]}, r"exactly one of .*got none"),
        ({"prompt": 5}, r"request\['prompt'\] must be a string, got int"),
        ({"messages": USER_IMAGE}, r"request\['messages'\] has 1 image parts but request\['images'\] has 0 images"),
        ({"messages": USER_IMAGE, "images": [IMAGES["small"], IMAGES["wide"]]},
         r"request\['messages'\] has 1 image parts but request\['images'\] has 2 images"),
        ({"prompt_token_ids": [1, 2], "images": [IMAGES["small"]]}, r"request\['prompt_token_ids'\] .*takes no"),
        ({"messages": []}, r"request\['messages'\] must not be empty"),
        ({"messages": {"role": "user", "content": "x"}}, r"request\['messages'\] must be a list of messages, got dict"),
        ({"messages": ["hello"]}, r"request\['messages'\]\[0\] must be a dict"),
        ({"messages": [{"role": "user", "content": "x", "name": "a"}]},
         r"request\['messages'\]\[0\] has unknown keys \['name'\]"),
        ({"messages": [{"content": "x"}]}, r"request\['messages'\]\[0\]\['role'\] must be a non-empty string"),
        ({"messages": [{"role": "user", "content": None}]},
         r"request\['messages'\]\[0\]\['content'\] must be a string or a list of parts, got NoneType"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": [text("a"), {"type": "video"}]}]},
         r"request\['messages'\]\[1\]\['content'\]\[1\]\['type'\] must be 'text' or 'image', got 'video'"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
         r"request\['messages'\]\[0\]\['content'\]\[0\]\['text'\] must be a string, got int"),
        ({"messages": [{"role": "user", "content": [image("small")]}], "images": [IMAGES["small"]]},
         r"request\['messages'\]\[0\]\['content'\]\[0\] has unknown keys \['image'\] .*images go in request\['images'\]"),
    ],
)
def test_invalid_requests_name_the_field(llm, request_, error):
    with pytest.raises(ValueError, match=error):
        llm.generate([{"prompt": "fine"}, request_])
    assert not llm.engine.has_unfinished() and not llm.engine.request_ids


def test_request_forms(tiny_checkpoint):
    """The positional prompt form is unchanged; a single image need not be in a list; Request
    checks the same rules as the dict form."""
    request = glmrt.Request("Text Recognition:", images=[IMAGES["small"]])
    assert request.prompt == "Text Recognition:" and request.messages is None and request.prompt_token_ids is None
    assert glmrt.Request.coerce({"prompt": "x", "images": IMAGES["small"]}).images == [IMAGES["small"]]
    assert glmrt.Request.coerce({"prompt": "x", "images": None}).images == []
    assert glmrt.Request(prompt_token_ids=(np.int64(3), 4)).prompt_token_ids == [3, 4]
    with pytest.raises(ValueError, match=r"request\['messages'\]\[0\]\['content'\]\[0\]\['type'\]"):
        glmrt.Request(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    processor = glmrt.Processor.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="either prompt or messages"):
        processor([], prompt="x", messages=[{"role": "user", "content": "x"}])


def test_template_slots_checked_against_images(tiny_checkpoint):
    """An image part the template does not render (the tiny template renders system content as a
    plain string) leaves its image without a slot: refused, not silently dropped."""
    processor = glmrt.Processor.from_pretrained(tiny_checkpoint)
    chat = [{"role": "system", "content": [{"type": "image"}]}]
    with pytest.raises(ValueError, match=r"0 <\|image\|> slots for 1 images"):
        processor([IMAGES["small"]], messages=chat)
