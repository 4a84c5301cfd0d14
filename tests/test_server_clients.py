"""`glmrt serve` driven by the clients that use it, unchanged: the glmocr SDK's OCRClient, the
`openai` package, and raw HTTP shaped like docling-glm-ocr's requests and docling's glm_ocr preset.

Every answer is compared with glmrt.LLM on the same inputs (the engine's parity with transformers is
tested elsewhere), so these tests check what the server adds: request parsing, the defaults for
absent fields, message order, image decoding, stop strings, streaming and the response shapes.
"""
from __future__ import annotations

import base64
import copy
import io
import json
import re

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from PIL import Image
from tokenizers import Tokenizer

import glmrt
from glmrt_testing.server_process import ServerProcess

SERVED = ("glm-ocr", "zai-org/GLM-OCR")
# Small, so that a request asking for 16384 new tokens (as docling-glm-ocr does) ends at the context
# limit after a few dozen tokens.
MAX_MODEL_LEN = 256
# The server's values for absent sampling fields on the tiny checkpoint (its generation_config.json
# sets none): greedy and repetition_penalty 1.1, the glmocr SDK's profile.
SERVER_DEFAULTS = {"temperature": 0.0, "repetition_penalty": 1.1}
# docling-glm-ocr's default prompt (GlmOcrRemoteOptions.prompt).
DOCLING_GLM_OCR_PROMPT = ("Recognize the text in the image and output in Markdown format.\n"
                          "Preserve the original layout (headings/paragraphs/tables/formulas).\n"
                          "Do not fabricate content that does not exist in the image.")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ServerProcess(tiny_checkpoint, "--served-model-name", *SERVED, "--max-model-len", str(MAX_MODEL_LEN)) as srv:
        yield srv


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def png(width: int, height: int, seed: int, channels: int = 3) -> bytes:
    """A random-pixel PNG (RGB, or RGBA with 4 channels)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def user_turn(*parts: str | bytes) -> tuple[list[dict], list[dict], list[bytes]]:
    """One user message of text (str) and PNG image (bytes) parts in the order given: as an OpenAI
    request sends it, and as glmrt.Request takes it (messages, images)."""
    sent = [{"type": "text", "text": p} if isinstance(p, str) else
            {"type": "image_url", "image_url": {"url": data_uri(p)}} for p in parts]
    local = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
    return ([{"role": "user", "content": sent}], [{"role": "user", "content": local}],
            [p for p in parts if isinstance(p, bytes)])


def reference(llm: glmrt.LLM, messages: list[dict], images: list[bytes] = (), **params) -> glmrt.RequestOutput:
    """glmrt.LLM's output for the request, with the server's defaults under `params`."""
    out = llm.generate(glmrt.Request(messages=messages, images=list(images)),
                       glmrt.SamplingParams(**{**SERVER_DEFAULTS, **params}))[0]
    assert out.token_ids, "the reference generated nothing: the comparison would prove nothing"
    return out


def usage_of(out: glmrt.RequestOutput) -> dict:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse_events(response: httpx.Response) -> list[dict]:
    """The JSON events of a server-sent-event stream, which must end with `data: [DONE]`."""
    events, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: ") and not done, line
        if line == "data: [DONE]":
            done = True
        else:
            events.append(json.loads(line[len("data: "):]))
    assert done, "the stream did not end with data: [DONE]"
    return events


# ------------------------------------------------------------------------------- the glmocr SDK

@pytest.mark.filterwarnings("ignore:The `fitz` API is deprecated:FutureWarning")  # glmocr imports PyMuPDF as fitz
def test_glmocr_sdk_client(server, llm):
    from glmocr.config import GlmOcrConfig, OCRApiConfig
    from glmocr.dataloader.page_loader import PageLoader
    from glmocr.ocr_client import OCRClient

    ocr = OCRClient(OCRApiConfig(api_host="127.0.0.1", api_port=server.port, model="glm-ocr",
                                 connect_timeout=30, retry_max_attempts=0))
    # start() sends a text-only "hello" request (max_tokens 10) and returns once it gets a 200; the
    # server is already up, so its first try must succeed (a failed try sleeps 10 s and warns).
    ocr.start()
    try:
        assert ocr.is_alive()
        # The SDK's shipped page-loader settings: its task prompts and its sampling profile.
        loader = PageLoader(GlmOcrConfig.from_yaml().pipeline.page_loader)
        crops = {"text": (64, 40), "table": (300, 200), "formula": (90, 360)}  # mixed sizes and shapes
        for seed, (task, (width, height)) in enumerate(crops.items()):
            request = loader.build_request_from_image(Image.open(io.BytesIO(png(width, height, seed))), task)
            request["max_tokens"] = 12  # the SDK asks for 8192; keep the test fast
            sent = copy.deepcopy(request)
            response, status = ocr.process(request)
            assert status == 200, response

            image_part, text_part = sent["messages"][0]["content"]  # the SDK sends the image first
            assert text_part == {"type": "text", "text": f"{task.capitalize()} Recognition:"}
            prefix = "data:image/jpeg;base64,"
            assert image_part["image_url"]["url"].startswith(prefix)
            jpeg = base64.b64decode(image_part["image_url"]["url"][len(prefix):])
            expected = llm.generate(
                glmrt.Request(messages=[{"role": "user", "content": [{"type": "image"}, text_part]}], images=[jpeg]),
                glmrt.SamplingParams(**{name: sent[name] for name in
                                        ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty")}),
            )[0]
            assert len(expected.token_ids) == 12
            assert response["choices"][0]["message"]["content"] == expected.text.strip(), task
    finally:
        ocr.stop()


# ---------------------------------------------------------------------------- the openai client

def test_openai_chat_plain_and_streamed(client, llm):
    sent, messages, images = user_turn(png(120, 80, 10), "Text Recognition:")
    expected = reference(llm, messages, images, max_tokens=12)

    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=12)
    assert full.object == "chat.completion" and full.model == "glm-ocr" and len(full.choices) == 1
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == expected.text
    assert full.choices[0].finish_reason == expected.finish_reason == "length"
    assert full.usage.model_dump(exclude_none=True) == usage_of(expected)

    chunks = list(client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=12, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]

    chunks = list(client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    *deltas, last = chunks
    assert last.choices == [] and last.usage.model_dump(exclude_none=True) == full.usage.model_dump(exclude_none=True)
    assert all(c.usage is None for c in deltas)
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == expected.text
    assert deltas[-1].choices[0].finish_reason == "length"


def test_openai_stream_of_one_token(client, llm):
    """A request that finishes on its first token still streams one role chunk, then one chunk that
    carries the text and the finish_reason."""
    sent, messages, images = user_turn(png(56, 56, 11), "Text Recognition:")
    expected = reference(llm, messages, images, max_tokens=1)
    chunks = list(client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=1, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_openai_text_only_chat(client, llm):
    messages = [{"role": "system", "content": "You read documents."}, {"role": "user", "content": "hello"}]
    expected = reference(llm, messages, max_tokens=10)
    full = client.chat.completions.create(model="zai-org/GLM-OCR", messages=messages, max_tokens=10)
    assert full.model == "zai-org/GLM-OCR"
    assert full.choices[0].message.content == expected.text
    assert full.usage.model_dump(exclude_none=True) == usage_of(expected)


def test_openai_two_images_in_one_message(client, llm):
    sent, messages, images = user_turn(png(80, 60, 20), png(40, 150, 21), "Table Recognition:")
    expected = reference(llm, messages, images, max_tokens=10)
    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=10)
    assert full.choices[0].message.content == expected.text
    assert full.usage.model_dump(exclude_none=True) == usage_of(expected)
    # The images are in the prompt in the order sent: swapping them changes the prompt.
    swapped = user_turn(images[1], images[0], "Table Recognition:")[0]
    full = client.chat.completions.create(model="glm-ocr", messages=swapped, max_tokens=10)
    assert full.choices[0].message.content == reference(llm, messages, images[::-1], max_tokens=10).text


def test_openai_stop_strings(client, llm):
    sent, messages, images = user_turn(png(100, 100, 30), "Text Recognition:")
    unstopped = reference(llm, messages, images, max_tokens=12)
    # A stop string from the middle of the unstopped output: the 5th token's text.
    tokenizer = llm.processor.tokenizer
    stop = tokenizer.decode(unstopped.token_ids[4:5])
    at = unstopped.text.find(stop)
    assert at > 0
    cut = unstopped.text[:at]

    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=12, stop=[stop, "never there"])
    choice = full.choices[0]
    assert choice.message.content == cut and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop  # vLLM's field: the stop string that ended it

    chunks = list(client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=12, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_seed_reproduces_sampling(client, llm):
    sent, messages, images = user_turn(png(70, 90, 40), "Text Recognition:")
    params = dict(model="glm-ocr", messages=sent, max_tokens=8, temperature=0.8)
    first = client.chat.completions.create(seed=1234, **params).choices[0].message.content
    again = client.chat.completions.create(seed=1234, **params).choices[0].message.content
    other = client.chat.completions.create(seed=4321, **params).choices[0].message.content
    assert first == again == reference(llm, messages, images, max_tokens=8, temperature=0.8, seed=1234).text
    assert other != first  # the seed is used: 8 draws at temperature 0.8 over the whole vocabulary


def test_openai_max_completion_tokens_and_n(client, llm):
    sent, messages, images = user_turn(png(60, 60, 50), "Formula Recognition:")
    expected = reference(llm, messages, images, max_tokens=5)
    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_completion_tokens=5, n=1)
    assert len(full.choices) == 1
    assert full.choices[0].message.content == expected.text and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 5


def test_openai_completions(client, llm, tiny_checkpoint):
    prompt = "Text Recognition: hello world"
    # The server tokenizes a completion prompt with the checkpoint's tokenizer, special tokens added.
    ids = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).encode(prompt, add_special_tokens=True).ids
    expected = llm.generate(glmrt.Request(prompt_token_ids=ids),
                            glmrt.SamplingParams(max_tokens=9, **SERVER_DEFAULTS))[0]
    full = client.completions.create(model="glm-ocr", prompt=prompt, max_tokens=9)
    assert full.object == "text_completion" and len(full.choices) == 1
    assert full.choices[0].text == expected.text and full.choices[0].finish_reason == "length"
    assert full.usage.model_dump(exclude_none=True) == usage_of(expected)


# ---------------------------------------------------------------------------- log-probabilities

def test_openai_chat_logprobs_plain_and_streamed(client, llm):
    """logprobs + top_logprobs: one content entry per token of the text (the stop token that ends
    it, left out of the text, is left out here too), its values the engine's; the token strings and
    bytes join up to the text; a stream's chunks carry the entries of their own tokens."""
    sent, messages, images = user_turn(png(90, 70, 60), "Text Recognition:")
    unstopped = reference(llm, messages, images, max_tokens=10)
    stop = unstopped.token_ids[6]
    expected = reference(llm, messages, images, max_tokens=10, logprobs=3, stop_token_ids=[stop])
    assert expected.finish_reason == "stop" and expected.token_ids[-1] == stop
    request = dict(model="glm-ocr", messages=sent, max_tokens=10, logprobs=True, top_logprobs=3,
                   extra_body={"stop_token_ids": [stop]})
    full = client.chat.completions.create(**request)
    content = full.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) - 1
    assert "".join(c.token for c in content) == full.choices[0].message.content == expected.text
    assert bytes(b for c in content for b in c.bytes).decode() == expected.text
    for c, token, entry in zip(content, expected.token_ids, expected.logprobs):
        assert c.logprob == entry[token] and len(c.top_logprobs) == 3
        assert [t.logprob for t in c.top_logprobs] == list(entry.values())[:3]
        assert [t.token for t in c.top_logprobs] == [llm.processor.tokenizer.decode([i], skip_special_tokens=False)
                                                     for i in list(entry)[:3]]

    chunks = list(client.chat.completions.create(stream=True, **request))
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    for chunk in chunks[1:]:
        entries = chunk.choices[0].logprobs.content
        assert "".join(c.token for c in entries) == (chunk.choices[0].delta.content or "")
    assert [c for chunk in chunks[1:] for c in chunk.choices[0].logprobs.content] == content

    plain = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=4, logprobs=True)
    assert all(c.top_logprobs == [] for c in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=4).choices[0].logprobs is None


def test_openai_completions_logprobs(client, llm, tiny_checkpoint):
    """The legacy shape: tokens, token_logprobs, top_logprobs (the top N and the token) and text offsets."""
    prompt = "Text Recognition: hello world"
    ids = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).encode(prompt, add_special_tokens=True).ids
    expected = llm.generate(glmrt.Request(prompt_token_ids=ids),
                            glmrt.SamplingParams(max_tokens=7, logprobs=2, **SERVER_DEFAULTS))[0]
    full = client.completions.create(model="glm-ocr", prompt=prompt, max_tokens=7, logprobs=2)
    lp = full.choices[0].logprobs
    assert "".join(lp.tokens) == full.choices[0].text == expected.text
    assert lp.token_logprobs == [e[t] for t, e in zip(expected.token_ids, expected.logprobs)]
    assert [list(top.values()) for top in lp.top_logprobs] == [list(e.values()) for e in expected.logprobs]
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(model="glm-ocr", prompt=prompt, max_tokens=7, logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


# ---------------------------------------------------------------------- structured outputs

INVOICE = {"type": "object", "additionalProperties": False, "required": ["number", "lines"], "properties": {
    "number": {"type": "string", "maxLength": 8},
    "lines": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "additionalProperties": False, "required": ["qty"],
        "properties": {"qty": {"type": "integer", "minimum": 0, "maximum": 99}}}}}}
EXTRACT = "请按下列JSON格式输出图中信息:"


def test_openai_response_format_json_schema_plain_and_streamed(client, llm):
    sent, messages, images = user_turn(png(96, 64, 30), EXTRACT)
    expected = reference(llm, messages, images, max_tokens=200, json_schema=INVOICE)
    assert expected.finish_reason == "stop"
    response_format = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": INVOICE, "strict": True}}
    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=200,
                                          response_format=response_format)
    assert full.choices[0].message.content == expected.text and full.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(full.choices[0].message.content), INVOICE)
    chunks = list(client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=200, stream=True,
                                                 response_format=response_format))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text


def test_response_format_takes_a_model_card_template_and_json_object(client, llm):
    sent, messages, images = user_turn(png(64, 64, 31), EXTRACT)
    template = {"编号": "", "lines": [{"qty": ""}]}
    response_format = {"type": "json_schema", "json_schema": {"name": "t", "schema": template}}
    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=40, response_format=response_format)
    expected = reference(llm, messages, images, max_tokens=40, json_schema=glmrt.extraction.template_to_schema(template))
    assert full.choices[0].message.content == expected.text and expected.text.startswith("{")
    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=40,
                                          response_format={"type": "json_object"})
    assert full.choices[0].message.content == reference(llm, messages, images, max_tokens=40, json_object=True).text


def test_vllm_structured_outputs_and_guided_fields(server, client, llm, tiny_checkpoint):
    sent, messages, images = user_turn(png(64, 48, 32), "Which document is this?")
    choices = ["invoice", "receipt", "身份证"]
    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=20,
                                          extra_body={"structured_outputs": {"choice": choices}})
    assert full.choices[0].message.content in choices and full.choices[0].finish_reason == "stop"
    pattern = r"[A-Z]{2}-[0-9]{2,4}"
    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=20,
                                          extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, full.choices[0].message.content)
    # completions, with guided_json as JSON text
    done = client.completions.create(model="glm-ocr", prompt="Invoice:", max_tokens=200,
                                     extra_body={"guided_json": json.dumps(INVOICE)})
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].text), INVOICE)


def test_vllm_grammar_and_whitespace_pattern_fields(client, llm):
    """A Lark grammar (structured_outputs.grammar), a GBNF one (guided_grammar) and flexible JSON
    whitespace (structured_outputs.whitespace_pattern), each as glmrt.LLM answers it."""
    sent, messages, images = user_turn(png(64, 48, 34), "Which document is this?")
    language = r"(yes|no)-[0-9]{1,2}"
    lark = 'start: answer "-" NUMBER\nanswer: "yes" | "no"\nNUMBER: /[0-9]{1,2}/'
    gbnf = 'root ::= answer "-" [0-9] [0-9]?\nanswer ::= "yes" | "no"'
    sampled = {"max_tokens": 20, "temperature": 1.0, "seed": 5}
    for grammar, extra in ((lark, {"structured_outputs": {"grammar": lark}}), (gbnf, {"guided_grammar": gbnf})):
        full = client.chat.completions.create(model="glm-ocr", messages=sent, extra_body=extra, **sampled)
        expected = reference(llm, messages, images, grammar=grammar, **sampled)
        assert full.choices[0].message.content == expected.text and full.choices[0].finish_reason == "stop"
        assert re.fullmatch(language, expected.text)
    spaced = {"structured_outputs": {"json": INVOICE, "whitespace_pattern": "[ ]{1,2}"}}
    full = client.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=200, extra_body=spaced)
    expected = reference(llm, messages, images, max_tokens=200, json_schema=INVOICE, whitespace_pattern="[ ]{1,2}")
    assert full.choices[0].message.content == expected.text and "  " in expected.text


def test_constrained_and_unconstrained_requests_at_once(client, llm):
    from concurrent.futures import ThreadPoolExecutor

    sent, messages, images = user_turn(png(80, 56, 33), EXTRACT)
    free = reference(llm, messages, images, max_tokens=16)
    constrained = reference(llm, messages, images, max_tokens=200, json_schema=INVOICE)
    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": INVOICE}}
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(client.chat.completions.create, model="glm-ocr", messages=sent, max_tokens=16),
                pool.submit(client.chat.completions.create, model="glm-ocr", messages=sent, max_tokens=200,
                            response_format=fmt)] * 2
        texts = [job.result().choices[0].message.content for job in jobs]
    assert texts == [free.text, constrained.text] * 2


def test_openai_models_list(client):
    assert [model.id for model in client.models.list()] == list(SERVED)


def test_openai_unknown_model(client):
    sent = user_turn("hello")[0]
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=sent, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.completions.create(model="gpt-4o", prompt="hello", max_tokens=2)


def test_openai_api_key(tiny_checkpoint):
    with ServerProcess(tiny_checkpoint, "--api-key", "right-key") as keyed:
        def connect(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=key, max_retries=0, timeout=60)

        wrong, right = connect("wrong-key"), connect("right-key")
        sent = user_turn("hello")[0]
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        # No --served-model-name: the default names are glm-ocr and the model argument.
        assert [model.id for model in right.models.list()] == ["glm-ocr", str(tiny_checkpoint)]
        full = right.chat.completions.create(model="glm-ocr", messages=sent, max_tokens=2)
        assert full.usage.completion_tokens == 2


# ----------------------------------------------------------------------------- docling, raw HTTP

def test_docling_glm_ocr_request(server, llm):
    """docling-glm-ocr: text first, then a PNG data URI; max_tokens 16384 and no sampling fields.
    16384 is more than the context allows: the answer ends with "length" at the context limit."""
    image = png(150, 60, 60)
    payload = {
        "model": "zai-org/GLM-OCR",
        "max_tokens": 16384,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": DOCLING_GLM_OCR_PROMPT},
            {"type": "image_url", "image_url": {"url": data_uri(image)}},
        ]}],
    }
    response = httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference(llm, [{"role": "user", "content": [{"type": "text", "text": DOCLING_GLM_OCR_PROMPT},
                                                             {"type": "image"}]}], [image], max_tokens=16384)
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason == "length"
    assert body["usage"] == usage_of(expected)
    assert body["usage"]["total_tokens"] == MAX_MODEL_LEN


@pytest.mark.parametrize("stream", [False, True])
def test_docling_preset_request(server, llm, stream):
    """docling's glm_ocr API preset: an RGBA PNG first, then the prompt; greedy; stop strings."""
    rgba = png(90, 70, 70, channels=4)  # random alpha: the transparency matters
    stop = ["<|user|>", "<|endoftext|>"]
    payload = {
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(rgba)}},
            {"type": "text", "text": "Text Recognition:"},
        ]}],
        "model": "zai-org/GLM-OCR", "max_tokens": 16, "temperature": 0.0, "stop": stop,
    }
    # The reference input: the RGBA image composited onto white and saved as RGB, as transformers'
    # processor converts images with an alpha band.
    image = Image.open(io.BytesIO(rgba))
    flat = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    buf = io.BytesIO()
    flat.save(buf, format="PNG")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Text Recognition:"}]}]
    expected = reference(llm, messages, [buf.getvalue()], max_tokens=16, stop=stop)
    url = f"{server.url}/v1/chat/completions"
    if not stream:
        response = httpx.post(url, json=payload, timeout=120)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        text, finish_reason = choice["message"]["content"], choice["finish_reason"]
    else:
        with httpx.stream("POST", url, json={**payload, "stream": True}, timeout=120) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        finish_reason = events[-1]["choices"][0]["finish_reason"]
    assert text == expected.text
    assert finish_reason == expected.finish_reason
