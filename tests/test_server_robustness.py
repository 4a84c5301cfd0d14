"""`glmrt serve` as a real process on the tiny checkpoint, under bad input, load, cancellation,
overload, injected faults and bare TCP probes.

Expected texts come from glmrt.LLM on the same inputs, each request alone, so a server that mixes
up, truncates or perturbs concurrent requests fails. Servers are module-scoped (start-up ~5 s):
`main_server` (media allowed from a directory and from 127.0.0.1, small limits), `strict_server`
(nothing but data URIs, one sequence, no queue) and `fault_server` (tests/fault_server.py).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from PIL import Image

import glmrt
from glmrt_testing.fault_server import FAIL_DECODE, FAIL_PREFILL, FAIL_PREPARE
from glmrt_testing.helpers import IMAGES, make_image
from glmrt_testing.server_process import ServerProcess

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
GREEDY = {"temperature": 0, "repetition_penalty": 1.1}
MAX_MODEL_LEN = 2048
MAX_REQUEST_BYTES = 256 * 1024
MAX_IMAGES = 2
MAX_IMAGE_PIXELS = 1_000_000
IMAGE_TOKEN_ID = 59280  # <|image|> in the tiny checkpoint's vocabulary (GLM-OCR's id)
VOCAB_SIZE = 59392


# ------------------------------------------------------------------------------------ inputs

def encode(image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed): a decompression bomb header."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    struct.pack_into(">II", data, 16, width, height)  # after the 8-byte signature, length and "IHDR"
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # CRC of "IHDR" + its 13 data bytes
    return bytes(data)


SMALL_PNG, WIDE_PNG, PAGE_PNG = (encode(IMAGES[n]) for n in ("small", "wide", "page"))
SMALL_JPEG = encode(IMAGES["small"], "JPEG")
NOISE_PNG, NOISE_JPEG = encode(make_image(96, 96, 7)), encode(make_image(96, 96, 7), "JPEG")


def txt(text: str) -> dict:
    return {"type": "text", "text": text}


def img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict, **fields: Any) -> dict:
    """A chat body with one user turn, greedy with the SDK's repetition penalty, 4 tokens unless given."""
    return {"model": "glm-ocr", "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4,
            **GREEDY, **fields}


GOOD = user(txt("hello"), max_tokens=1)


# --------------------------------------------------------------------------- expected outputs

@dataclass(frozen=True)
class Expected:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@pytest.fixture(scope="module")
def expect(tiny_checkpoint) -> Callable[..., Expected]:
    """expect(parts, max_tokens, ignore_eos) -> what glmrt.LLM gives for this chat content alone."""
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32")
    cache: dict[str, Expected] = {}

    def run(parts: list[dict], max_tokens: int, ignore_eos: bool = False) -> Expected:
        key = json.dumps([parts, max_tokens, ignore_eos])
        if key not in cache:
            content = [{"type": "image"} if p["type"] == "image_url" else p for p in parts]
            images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
            params = glmrt.SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **GREEDY)
            (out,) = llm.generate(glmrt.Request(messages=[{"role": "user", "content": content}], images=images), params)
            cache[key] = Expected(out.text, out.finish_reason, len(out.prompt_token_ids), len(out.token_ids))
        return cache[key]

    return run


# ---------------------------------------------------------------------------- servers, media

@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """allowed/ (the --allowed-local-media-path) with inside.png and a symlink to ../outside.png;
    served/ (served over http) with remote.png and a sub-directory (its URL without '/' redirects)."""
    root = tmp_path_factory.mktemp("media")
    allowed, served = root / "allowed", root / "served"
    allowed.mkdir()
    (served / "subdir").mkdir(parents=True)
    (allowed / "inside.png").write_bytes(SMALL_PNG)
    (root / "outside.png").write_bytes(SMALL_PNG)
    (allowed / "link.png").symlink_to(root / "outside.png")
    (served / "remote.png").write_bytes(WIDE_PNG)
    return {"allowed": allowed, "served": served}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def media_host(media) -> str:
    """http://127.0.0.1:PORT serving media['served'] from a thread."""
    handler = functools.partial(_QuietHandler, directory=str(media["served"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def main_server(tiny_checkpoint, media, media_host):
    with ServerProcess(tiny_checkpoint, "--served-model-name", "glm-ocr", "zai-org/GLM-OCR",
                       "--max-num-seqs", "32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-tokens", "8192",
                       "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-images-per-request", str(MAX_IMAGES),
                       "--max-image-pixels", str(MAX_IMAGE_PIXELS), "--allowed-local-media-path", str(media["allowed"]),
                       "--allowed-media-domains", "127.0.0.1") as server:
        yield server


@pytest.fixture(scope="module")
def strict_server(tiny_checkpoint):
    with ServerProcess(tiny_checkpoint, "--served-model-name", "glm-ocr", "--max-num-seqs", "1",
                       "--max-queue", "0") as server:
        yield server


@pytest.fixture(scope="module")
def fault_server(tiny_checkpoint):
    with ServerProcess(tiny_checkpoint, "--served-model-name", "glm-ocr", launcher="glmrt_testing.fault_server") as server:
        yield server


def post(server: ServerProcess, body: Any, endpoint: str = CHAT, **kwargs) -> httpx.Response:
    """POST a JSON value, or bytes as they are (an iterator of bytes: chunked, without Content-Length)."""
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + endpoint, json=body, **{"timeout": 60, **kwargs})
    return httpx.post(server.url + endpoint, content=body, headers={"content-type": "application/json"},
                      **{"timeout": 60, **kwargs})


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["code"] == status and error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    return error


def assert_serving(server: ServerProcess) -> None:
    response = post(server, GOOD)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1


def sample(metrics: dict[str, float], name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return metrics.get(key, 0.0)


def samples(metrics: dict[str, float], name: str) -> dict[str, float]:
    """{labels text: value} of one metric name."""
    return {key[len(name):]: value for key, value in metrics.items() if key.split("{")[0] == name}


# ------------------------------------------------------------------------- bad-input corpus

IMG0 = "messages[0].content[0].image_url"


@dataclass
class Case:
    id: str
    body: Callable[[dict], Any]  # media info -> a JSON body, bytes sent as is, or a bytes iterator (chunked)
    param: str | None
    says: str = ""  # the error message contains this
    status: int = 400
    endpoint: str = CHAT
    server: str = "main_server"


def _image_case(id: str, url: Callable[[dict], str], says: str, server: str = "main_server") -> Case:
    return Case(id, lambda m: user(img(url(m)), txt("Text Recognition:")), IMG0, says, server=server)


def _field_case(id: str, says: str = "", **fields: Any) -> Case:
    (name,) = fields
    return Case(id, lambda m: user(txt("hello"), **fields), name, says)


def _completion_case(id: str, prompt: Any, says: str) -> Case:
    return Case(id, lambda m: {"model": "glm-ocr", "prompt": prompt, "max_tokens": 4}, "prompt", says,
                endpoint=COMPLETIONS)


CASES = [
    # images: bytes
    _image_case("garbage-base64", lambda m: "data:image/png;base64,!!!not base64!!!", "base64"),
    _image_case("base64-not-an-image", lambda m: data_uri(b"plain text, not an image"), "not a decodable image"),
    _image_case("data-uri-not-image-type", lambda m: data_uri(SMALL_PNG, "text/plain"), "not an image type"),
    _image_case("truncated-png", lambda m: data_uri(NOISE_PNG[: len(NOISE_PNG) // 2]), "truncated"),
    _image_case("truncated-jpeg", lambda m: data_uri(NOISE_JPEG[: len(NOISE_JPEG) // 2], "image/jpeg"), "truncated"),
    _image_case("decompression-bomb-header", lambda m: data_uri(bomb_png()), "decompression bomb"),
    _image_case("over-max-image-pixels", lambda m: data_uri(encode(Image.new("L", (1100, 1000)))),
                f"limit of {MAX_IMAGE_PIXELS} decoded pixels"),
    # images: URLs and paths
    _image_case("http-host-not-allowed", lambda m: f"http://localhost:{m['port']}/remote.png", "not allowed"),
    _image_case("http-redirect-not-followed", lambda m: f"http://{m['host']}/subdir", "HTTP 301"),
    _image_case("http-missing", lambda m: f"http://{m['host']}/missing.png", "HTTP 404"),
    _image_case("file-url-dotdot-escape", lambda m: f"file://{m['allowed']}/../outside.png", "not a file under"),
    _image_case("file-url-symlink-escape", lambda m: (m["allowed"] / "link.png").as_uri(), "not a file under"),
    _image_case("file-url-missing", lambda m: (m["allowed"] / "missing.png").as_uri(), "no such file"),
    _image_case("bare-local-path", lambda m: str(m["allowed"] / "inside.png"), "must be a data: URI"),
    _image_case("file-url-not-allowed", lambda m: (m["allowed"] / "inside.png").as_uri(),
                "--allowed-local-media-path", server="strict_server"),
    _image_case("http-no-domains-allowed", lambda m: f"http://{m['host']}/remote.png", "not allowed",
                server="strict_server"),
    Case("image-url-without-url", lambda m: user({"type": "image_url", "image_url": {"detail": "high"}}), IMG0, "url"),
    Case("too-many-images", lambda m: user(*[img(data_uri(SMALL_PNG))] * (MAX_IMAGES + 1), txt("x")), "messages",
         f"at most {MAX_IMAGES}"),
    Case("oversize-prompt", lambda m: user(txt("word " * (MAX_MODEL_LEN + 100))), "messages", "max_model_len"),
    # Two ~1300-token images: vLLM's words, which docling-glm-ocr looks for to retry with smaller images.
    Case("images-too-large-for-the-context", lambda m: user(*[img(data_uri(encode(Image.new("L", (1000, 1000)))))] * 2,
                                                            txt("x")), "messages", "encoder cache"),
    # sampling fields
    _field_case("max_tokens-string", max_tokens="10"),
    _field_case("max_tokens-zero", max_tokens=0),
    _field_case("max_completion_tokens-negative", max_completion_tokens=-1),
    _field_case("temperature-negative", temperature=-1),
    _field_case("top_p-zero", top_p=0),
    _field_case("top_k-float", top_k=1.5),
    _field_case("seed-string", seed="x"),
    _field_case("stop-number", stop=5),
    _field_case("repetition_penalty-zero", repetition_penalty=0),
    _field_case("stop_token_ids-outside-vocab", stop_token_ids=[10**9], says="vocabulary"),
    _field_case("stream-string", stream="yes"),
    _field_case("n-2", n=2, says="not supported"),
    _field_case("logprobs-string", logprobs="yes", says="boolean"),
    Case("top_logprobs-without-logprobs", lambda m: user(txt("hello"), top_logprobs=2), "top_logprobs",
         "needs 'logprobs': true"),
    Case("top_logprobs-over-max_logprobs", lambda m: user(txt("hello"), logprobs=True, top_logprobs=21),
         "top_logprobs", "[0, 20]"),
    Case("completion-logprobs-over-max_logprobs", lambda m: {"model": "glm-ocr", "prompt": "x", "logprobs": 21},
         "logprobs", "[0, 20]", endpoint=COMPLETIONS),
    # structured outputs
    _field_case("response_format-string", response_format="json"),
    Case("response_format-unknown-type", lambda m: user(txt("hi"), response_format={"type": "xml"}),
         "response_format.type", "'json_schema'"),
    Case("response_format-json_schema-without-schema", lambda m: user(txt("hi"), response_format={
        "type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema", "required"),
    Case("response_format-schema-llguidance-refuses", lambda m: user(txt("hi"), response_format={
        "type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}),
        "response_format.json_schema.schema", "bogus"),
    _field_case("guided_regex-invalid", guided_regex="a(b", says="unclosed group"),
    _field_case("guided_choice-empty", guided_choice=[]),
    _field_case("guided_json-not-json", guided_json="{bad", says="not valid JSON"),
    _field_case("guided_grammar-unknown-rule", guided_grammar="start: item\n", says='unknown name: "item"'),
    Case("structured_outputs-grammar-not-gbnf", lambda m: user(txt("hi"), structured_outputs={"grammar": "root ::= x"}),
         "structured_outputs.grammar", "read as GBNF"),
    Case("guided_whitespace_pattern-not-a-regex", lambda m: user(txt("hi"), guided_json={"type": "object"},
                                                                 guided_whitespace_pattern="[ "),
         "guided_whitespace_pattern", "not a regex"),
    Case("whitespace_pattern-without-json", lambda m: user(txt("hi"), structured_outputs={
        "regex": "a+", "whitespace_pattern": " "}), "structured_outputs.whitespace_pattern", "applies to JSON output"),
    Case("structured_outputs-structural_tag", lambda m: user(txt("hi"), structured_outputs={"structural_tag": "{}"}),
         "structured_outputs.structural_tag", "not supported"),
    Case("two-constraints", lambda m: user(txt("hi"), response_format={"type": "json_object"}, guided_regex="a+"),
         "guided_regex", "at most one"),
    Case("temperature-nan", lambda m: json.dumps(user(txt("hello"), temperature=float("nan"))).encode(),
         "temperature", "finite"),
    Case("stream_options-without-stream", lambda m: user(txt("hello"), stream_options={"include_usage": True}),
         "stream_options", "stream"),
    # messages
    Case("unknown-role", lambda m: {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    Case("unknown-part-type", lambda m: user({"type": "audio_url", "audio_url": {"url": "x"}}),
         "messages[0].content[0].type"),
    Case("image-in-assistant-message", lambda m: {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [img(data_uri(SMALL_PNG))]}]}, "messages[1].content[0]", "user messages"),
    Case("text-part-not-string", lambda m: user({"type": "text", "text": 5}), "messages[0].content[0].text"),
    Case("empty-messages", lambda m: {"messages": []}, "messages"),
    Case("messages-not-a-list", lambda m: {"messages": "hello"}, "messages"),
    Case("message-not-an-object", lambda m: {"messages": ["hello"]}, "messages[0]"),
    Case("no-messages", lambda m: {"model": "glm-ocr"}, "messages"),
    # bodies
    Case("body-not-json", lambda m: b'{"messages": [', "body", "not valid JSON"),
    Case("body-not-utf8", lambda m: b'{"messages": "\xff\xfe"}', "body", "not valid JSON"),
    Case("body-nested-too-deep", lambda m: b"[" * 100_000 + b"]" * 100_000, "body", "not valid JSON"),
    Case("body-int-too-long", lambda m: b'{"max_tokens": ' + b"9" * 5000 + b"}", "body", "not valid JSON"),
    Case("body-json-array", lambda m: [GOOD], None, "JSON object"),
    Case("body-over-limit", lambda m: user(txt("x" * MAX_REQUEST_BYTES)), "body", f"{MAX_REQUEST_BYTES} bytes"),
    Case("body-over-limit-chunked", lambda m: iter([json.dumps(user(txt("x" * MAX_REQUEST_BYTES))).encode()]),
         "body", f"{MAX_REQUEST_BYTES} bytes"),
    Case("unknown-model", lambda m: {**GOOD, "model": "gpt-4o"}, "model", "gpt-4o", status=404),
    Case("model-not-string", lambda m: {**GOOD, "model": 7}, "model"),
    # completions
    _completion_case("completion-prompt-bools", [True, False], "token ids"),
    _completion_case("completion-prompt-empty-list", [], "token ids"),
    _completion_case("completion-prompt-empty-string", "", "non-empty"),
    _completion_case("completion-token-outside-vocab", [1, VOCAB_SIZE], "vocabulary"),
    _completion_case("completion-image-token-without-pixels", [1, IMAGE_TOKEN_ID], "needs pixels"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, request, media, media_host):
    server = request.getfixturevalue(case.server)
    body = case.body({**media, "host": media_host, "port": media_host.rsplit(":", 1)[1]})
    error = assert_error(post(server, body, case.endpoint), case.status, case.param)
    assert case.says in error["message"], error
    assert_serving(server)


def test_corpus_covers_enough_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


def test_still_serves_exact_text_after_the_corpus(main_server, strict_server, expect):
    parts = [img(data_uri(SMALL_PNG)), txt("Text Recognition:")]
    want = expect(parts, 8)
    for server in (main_server, strict_server):
        body = post(server, user(*parts, max_tokens=8)).json()
        assert body["choices"][0]["message"]["content"] == want.text
        assert body["usage"]["prompt_tokens"] == want.prompt_tokens


def test_unknown_fields_and_inert_openai_fields_are_accepted(main_server, expect):
    """As vLLM: names the server does not know are ignored; OpenAI fields it does not implement are
    accepted at the values that ask for nothing (n 1, logprobs false, penalties 0, ...)."""
    parts = [img(data_uri(SMALL_PNG)), txt("Text Recognition:")]
    body = user(*parts, max_tokens=8, user="someone", metadata={"k": "v"}, frobnicate=[1, {"x": None}],
                n=1, logprobs=False, presence_penalty=0.0, frequency_penalty=0, logit_bias={},
                response_format={"type": "text"}, stream_options=None)
    response = post(main_server, body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expect(parts, 8).text


# --------------------------------------------------------------------------- allowed media

def test_file_url_inside_allowed_dir(main_server, media, expect):
    response = post(main_server, user(img((media["allowed"] / "inside.png").as_uri()), txt("Text Recognition:"),
                                      max_tokens=8))
    assert response.status_code == 200, response.text
    want = expect([img(data_uri(SMALL_PNG)), txt("Text Recognition:")], 8)  # the file's bytes
    assert response.json()["choices"][0]["message"]["content"] == want.text


def test_http_url_from_allowed_host(main_server, media_host, expect):
    response = post(main_server, user(txt("Table Recognition:"), img(f"http://{media_host}/remote.png"),
                                      max_tokens=8))
    assert response.status_code == 200, response.text
    want = expect([txt("Table Recognition:"), img(data_uri(WIDE_PNG))], 8)  # the served file's bytes
    assert response.json()["choices"][0]["message"]["content"] == want.text


# ------------------------------------------------------------------------------- TCP probes

def test_bare_tcp_connects_leave_the_server_serving(main_server):
    """The glmocr SDK's is_alive: connect, close, repeatedly (here every 200 ms, with a request in between)."""
    for i in range(10):
        with socket.create_connection(("127.0.0.1", main_server.port), timeout=5):
            pass
        if i % 3 == 0:
            with socket.create_connection(("127.0.0.1", main_server.port), timeout=5) as sock:
                sock.sendall(b"GET /heal")  # a request cut off half-way
        time.sleep(0.2)
    assert main_server.proc.poll() is None
    assert httpx.get(main_server.url + "/health", timeout=10).status_code == 200
    assert_serving(main_server)


# ------------------------------------------------------------------------ client disconnect

def test_client_disconnect_frees_kv_blocks(main_server):
    before = main_server.wait_idle()
    running_seen = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not running_seen.is_set():
            m = main_server.metrics()
            if m["glmrt:num_requests_running"] == 1 and m["glmrt:kv_cache_usage_perc"] > 0:
                running_seen.set()
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    # ~2000 tokens (several seconds): the client gives up after 1 s, long before the end.
    body = user(txt("hello"), max_tokens=MAX_MODEL_LEN, ignore_eos=True)
    with pytest.raises(httpx.ReadTimeout):
        post(main_server, body, timeout=httpx.Timeout(30.0, read=1.0))
    watcher.join()
    assert running_seen.is_set(), "the request never ran"
    after = main_server.wait_idle(timeout_s=3.0)  # long before the request would have finished by itself
    aborts = (sample(after, "glmrt:request_success_total", finished_reason="abort")
              - sample(before, "glmrt:request_success_total", finished_reason="abort"))
    assert aborts == 1
    assert_serving(main_server)


def test_a_cancelled_handler_cancels_its_engine_work():
    """Ray Serve's proxy cancels the handler of a client that went away rather than sending it
    http.disconnect: the handler's engine work must be cancelled with it (which aborts the
    engine request), not left running to its end."""
    import asyncio

    from glmrt.server.app import _until_disconnected

    class Connected:  # a request whose client never sends http.disconnect
        async def receive(self):
            await asyncio.sleep(3600)

    async def scenario():
        cancelled = asyncio.Event()

        async def work():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        handler = asyncio.ensure_future(_until_disconnected(Connected(), work()))
        await asyncio.sleep(0.05)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        await asyncio.wait_for(cancelled.wait(), timeout=5)

    asyncio.run(scenario())


# ------------------------------------------------------------------------- 256 concurrent

SHAPES = {
    "text": [txt("hello")],
    "text-formula": [txt("Formula Recognition: x^2 + y")],
    "small-png": [img(data_uri(SMALL_PNG)), txt("Text Recognition:")],
    "small-jpeg": [img(data_uri(SMALL_JPEG, "image/jpeg")), txt("Text Recognition:")],
    "text-first-wide": [txt("Table Recognition:"), img(data_uri(WIDE_PNG))],
    "page": [img(data_uri(PAGE_PNG)), txt("Text Recognition:")],
    "two-images": [img(data_uri(SMALL_PNG)), img(data_uri(WIDE_PNG)), txt("Text Recognition:")],
}
MODES = ("plain", "stream", "cancel", "plain", "stream")  # 20% cancelled mid-stream


@dataclass
class Outcome:
    shape: str
    mode: str
    status: int
    text: str
    finish_reason: str | None
    usage: dict | None


async def _one(client: httpx.AsyncClient, url: str, shape: str, mode: str) -> Outcome:
    if mode == "plain":
        response = await client.post(url, json=user(*SHAPES[shape], max_tokens=8))
        body = response.json()
        choice = body["choices"][0]
        return Outcome(shape, mode, response.status_code, choice["message"]["content"], choice["finish_reason"],
                       body["usage"])
    body = user(*SHAPES[shape], max_tokens=8, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[len("data: "):])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
            if mode == "cancel" and text:
                break  # leaving the block closes the connection after the first content chunk
    return Outcome(shape, mode, response.status_code, text, finish, usage)


async def _traffic(url: str, n: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        shapes = list(SHAPES)
        return await asyncio.gather(*(_one(client, url, shapes[i % len(shapes)], MODES[i % len(MODES)])
                                      for i in range(n)))


def test_256_concurrent_requests_with_cancellations(main_server, expect):
    n = 256
    want = {shape: expect(parts, 8) for shape, parts in SHAPES.items()}
    assert all(w.completion_tokens >= 2 for w in want.values())  # a content chunk comes before the end
    before = main_server.wait_idle()
    outcomes = asyncio.run(_traffic(main_server.url + CHAT, n))
    after = main_server.wait_idle()  # no KV block leaked; aborts apply at the next step boundary

    assert all(o.status == 200 for o in outcomes)
    completed = [o for o in outcomes if o.mode != "cancel"]
    cancelled = [o for o in outcomes if o.mode == "cancel"]
    assert len(cancelled) == n // len(MODES) + (n % len(MODES) > 2)
    for o in completed:
        w = want[o.shape]
        assert (o.text, o.finish_reason) == (w.text, w.finish_reason), o
        assert o.usage == {"prompt_tokens": w.prompt_tokens, "completion_tokens": w.completion_tokens,
                           "total_tokens": w.prompt_tokens + w.completion_tokens}, o
    for o in cancelled:
        assert o.text and want[o.shape].text.startswith(o.text), o

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    chat_statuses = {k: v - samples(before, "glmrt:http_requests_total").get(k, 0.0)
                     for k, v in samples(after, "glmrt:http_requests_total").items() if f'endpoint="{CHAT}"' in k}
    assert {k: v for k, v in chat_statuses.items() if v} == {f'{{endpoint="{CHAT}",status="200"}}': n}
    finished = {k: v - samples(before, "glmrt:request_success_total").get(k, 0.0)
                for k, v in samples(after, "glmrt:request_success_total").items()}
    assert sum(finished.values()) == n  # every request reached the engine and ended once
    assert delta("glmrt:request_success_total", finished_reason="abort") <= len(cancelled)
    for reason in {o.finish_reason for o in completed}:
        assert delta("glmrt:request_success_total", finished_reason=reason) >= sum(
            o.finish_reason == reason for o in completed)
    assert delta("glmrt:generation_tokens_total") >= sum(o.usage["completion_tokens"] for o in completed)
    assert delta("glmrt:prompt_tokens_total") == sum(want[o.shape].prompt_tokens for o in outcomes)


# --------------------------------------------------------------------------------- overload

def test_overload_answers_503_with_retry_after(strict_server):
    """--max-num-seqs 1 --max-queue 0: with one request in flight, the next is refused at once."""
    before = strict_server.metrics()
    long = user(txt("hello"), max_tokens=200, ignore_eos=True, stream=True)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", strict_server.url + CHAT, json=long) as stream:
            assert stream.status_code == 200
            lines = (line for line in stream.iter_lines() if line)
            next(line for line in lines if _delta_content(line))  # it is generating
            for endpoint, body in ((CHAT, GOOD), (COMPLETIONS, {"prompt": "hello", "max_tokens": 1})):
                refused = client.post(strict_server.url + endpoint, json=body)
                assert_error(refused, 503, None)
                assert refused.headers["retry-after"].isdigit()
            assert list(lines)[-1] == "data: [DONE]"  # the first request is unaffected
    assert_serving(strict_server)
    after = strict_server.metrics()
    refusals = sum(sample(after, "glmrt:http_requests_total", endpoint=e, status="503")
                   - sample(before, "glmrt:http_requests_total", endpoint=e, status="503") for e in (CHAT, COMPLETIONS))
    assert refusals == 2


def _delta_content(sse_line: str) -> str:
    data = sse_line.removeprefix("data: ")
    if data == "[DONE]":
        return ""
    return "".join(c["delta"].get("content") or "" for c in json.loads(data)["choices"])


# ----------------------------------------------------------------------------- fault isolation

async def _stream_events(client: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event | None = None
                         ) -> tuple[int, list[Any], float]:
    """-> (status, the decoded SSE events ("[DONE]" as is), when the stream ended)."""
    events = []
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, [response.json()], time.monotonic()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                if started is not None and _content(events[-1:]):
                    started.set()
    return response.status_code, events, time.monotonic()


def _content(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


NEWCOMER = [img(data_uri(SMALL_PNG)), txt("Table Recognition:")]


async def _faults(url: str, healthy: dict[str, list[dict]], max_tokens: int):
    async with httpx.AsyncClient(timeout=120) as client:
        started = {name: asyncio.Event() for name in healthy}
        streams = [asyncio.ensure_future(_stream_events(
            client, url, user(*parts, max_tokens=max_tokens, ignore_eos=True, stream=True), started[name]))
            for name, parts in healthy.items()]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 60)
        # The healthy requests are decoding. The marked ones arrive together with a healthy newcomer
        # and may share a prefill with it: a failed shared prefill is retried request by request.
        marked = [user(img(data_uri(SMALL_PNG)), txt(f"{FAIL_PREFILL} Text Recognition:")),
                  user(img(data_uri(SMALL_PNG)), txt(f"{FAIL_PREFILL} Text Recognition:"), stream=True),
                  user(txt(f"{FAIL_PREPARE} hello")),
                  user(*NEWCOMER, max_tokens=8)]
        *failures, newcomer = await asyncio.gather(*(client.post(url, json=body) for body in marked))
        failed_at = time.monotonic()
        return failures, newcomer, failed_at, await asyncio.gather(*streams)


def test_internal_failure_fails_only_that_request(fault_server, expect):
    healthy = {"text": SHAPES["text"], "small-png": SHAPES["small-png"], "two-images": SHAPES["two-images"]}
    max_tokens = 200
    want = {name: expect(parts, max_tokens, ignore_eos=True) for name, parts in healthy.items()}
    failures, newcomer, failed_at, streams = asyncio.run(_faults(fault_server.url + CHAT, healthy, max_tokens))
    for response in failures:
        error = assert_error(response, 500, None)
        assert "injected fault" in error["message"], error
    assert newcomer.status_code == 200, newcomer.text
    assert newcomer.json()["choices"][0]["message"]["content"] == expect(NEWCOMER, 8).text
    for name, (status, events, ended_at) in zip(healthy, streams):
        assert status == 200 and events[-1] == "[DONE]"
        assert ended_at > failed_at, f"{name} was not running while the others failed"
        assert _content(events) == want[name].text
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    fault_server.wait_idle()
    assert_serving(fault_server)


def test_failure_mid_stream_ends_with_an_error_event(fault_server, expect):
    """A step fails after the stream started: an OpenAI error event, then [DONE]; the server goes on."""
    parts = [img(data_uri(SMALL_PNG)), txt(f"{FAIL_DECODE} Text Recognition:")]

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            return await _stream_events(client, fault_server.url + CHAT, user(*parts, max_tokens=50, stream=True))

    status, events, _ = asyncio.run(run())
    assert status == 200
    assert events[-1] == "[DONE]"
    error = events[-2]
    assert set(error) == {"error"} and error["error"]["code"] == 500, error
    assert "injected fault" in error["error"]["message"]
    assert _content(events[:-2])  # content was streamed before the failure
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])
    fault_server.wait_idle()
    good = [img(data_uri(SMALL_PNG)), txt("Text Recognition:")]
    body = post(fault_server, user(*good, max_tokens=8)).json()
    assert body["choices"][0]["message"]["content"] == expect(good, 8).text
