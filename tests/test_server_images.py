"""`glmrt serve` with a GLM-Image pipeline: OpenAI's images API over HTTP, on a real server process
and a tiny random pipeline (tiny_glm_image.build_glm_image_pipeline; fp32, CPU).

The `openai` client's images.generate and images.edit, unchanged, get PNGs byte-identical to
diffusers' own GlmImagePipeline's (transformers' AR stage, greedy; the same seed): text-to-image
with n = 2 and an edit; edits whose condition images must be resized first (which diffusers'
pipeline cannot take) against glmrt.ImagePipeline -- also when requests run concurrently; every refusal's status and the field it
names; the other model's endpoints; the bounded queue's 503; /metrics' image counters. In
process: AsyncEngine.generate_image_tokens gives LLM.generate_image_tokens's tokens.
"""
import asyncio
import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image

import glmrt
from glmrt_testing.helpers import make_image
from glmrt_testing.server_process import ServerProcess
from glmrt_testing.tiny_glm_image import reference_pipeline

pytest.importorskip("diffusers")

STEPS, SEED = 2, 7
MAX_MODEL_LEN = 1024  # a 1024x1024 picture's 1,281 AR tokens do not fit: refused naming 'size'
MAX_QUEUED = 8
GREEDY_BODY = {"temperature": 0.0, "seed": SEED, "num_inference_steps": STEPS}
GREEDY = glmrt.SamplingParams(temperature=0.0)
CONDITIONS = [make_image(90, 70, 3), make_image(64, 80, 5)]
# (prompt, condition images, width, height, n): a 3 x 5 and a 4 x 3 AR grid
T2I = ("a cat on a mat", None, 160, 96, 2)
I2I_AS_DIFFUSERS = ("make it blue", [make_image(96, 64, 3)], 96, 128, 1)  # a size diffusers' pipeline takes as is
I2I = ("make it blue", CONDITIONS[:1], 96, 128, 1)
I2I_TWO = ("make them one", CONDITIONS, 96, 128, 1)
CASES = {"generate-n2": T2I, "edit-as-diffusers": I2I_AS_DIFFUSERS, "edit": I2I, "edit-two-images": I2I_TWO}


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def pngs(response) -> list[bytes]:
    return [base64.b64decode(item.b64_json) for item in response.data]


def upload(image: Image.Image, name: str) -> tuple[str, bytes, str]:
    return name, png(image), "image/png"


@pytest.fixture(scope="module")
def server(pipeline_dir):
    with ServerProcess(pipeline_dir, "--dtype", "float32", "--backend", "torch", "--max-model-len",
                       str(MAX_MODEL_LEN), "--max-queued-images", str(MAX_QUEUED), "--max-images-per-request",
                       "2") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return glmrt.ImagePipeline(str(pipeline_dir), device="cpu", dtype="float32", backend="torch")


@pytest.fixture(scope="module")
def expected(pipeline_dir, pipe, torchvision_available):
    """Each case's PNGs: diffusers' own pipeline's for text-to-image and for a condition image it
    takes as is; glmrt.ImagePipeline's (equal to diffusers' where diffusers runs,
    test_image_pipeline.py) for condition images that must be resized first."""
    reference, out = reference_pipeline(pipeline_dir), {}
    for case in ("generate-n2", "edit-as-diffusers"):
        prompt, images, width, height, n = CASES[case]
        with torch.no_grad():
            pictures = reference([prompt] * n, image=images and [images], height=height, width=width,
                                 num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED)).images
        out[case] = [png(p) for p in pictures]
    for case in ("edit", "edit-two-images"):
        prompt, images, width, height, _ = CASES[case]
        out[case] = [png(pipe(prompt, image=images, height=height, width=width, seed=SEED,
                              num_inference_steps=STEPS, sampling_params=GREEDY, progress=False))]
    return out


def request(client: openai.OpenAI, case: str) -> list[bytes]:
    """The case through the openai client: images.generate, or images.edit with its conditions."""
    prompt, images, width, height, n = CASES[case]
    common = dict(prompt=prompt, n=n, size=f"{width}x{height}", extra_body=GREEDY_BODY)
    if images is None:
        return pngs(client.images.generate(response_format="b64_json", **common))
    files = [upload(image, f"condition{i}.png") for i, image in enumerate(images)]
    return pngs(client.images.edit(image=files[0] if len(files) == 1 else files, **common))


# ------------------------------------------------------------------------- pictures, as diffusers'


@pytest.mark.parametrize("case", CASES)
def test_the_openai_client_gets_the_pipelines_pictures(client, expected, case):
    got = request(client, case)
    assert got == expected[case]
    _, _, width, height, n = CASES[case]
    assert len(got) == n
    for data in got:
        assert data.startswith(b"\x89PNG") and Image.open(io.BytesIO(data)).size == (width, height)
    if n > 1:
        assert got[0] != got[1]  # one generator for the batch: each picture its own noise


def test_concurrent_requests_get_the_same_pictures(client, expected):
    cases = [*CASES, "generate-n2"]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: request(client, case), cases))
    assert results == [expected[case] for case in cases]


def test_sampled_requests_follow_their_seed(client):
    """Sampled AR tokens (the checkpoint's defaults): the same seed gives the same pictures, another
    seed others."""
    def generate(seed: int) -> list[bytes]:
        return pngs(client.images.generate(prompt="a dog", n=2, size="64x64",
                                           extra_body={"seed": seed, "num_inference_steps": 1}))

    first = generate(5)  # (seeds of the tiny model whose first sampled token is no image end)
    assert generate(5) == first != generate(0)


# ------------------------------------------------------------------------------------- refusals


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=120, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == status
    for word in words:
        assert word in error["message"], error["message"]


GENERATION_ERRORS = {
    "size-not-WxH": ({"size": "1024"}, "size", "'WIDTHxHEIGHT'"),
    "size-not-multiple-of-32": ({"size": "100x96"}, "size", "multiple of 32"),
    "size-too-large": ({"size": "4096x1024"}, "size", "from 32 to 2048"),
    "size-past-max-model-len": ({"size": "1024x1024"}, "size", "max_model_len"),
    "prompt-missing": ({"prompt": None}, "prompt", "'prompt' is required"),
    "prompt-empty": ({"prompt": " "}, "prompt", "must not be empty"),
    "prompt-not-text": ({"prompt": 3}, "prompt", "must be a string"),
    "n-zero": ({"n": 0}, "n", "[1, 10]"),
    "n-eleven": ({"n": 11}, "n", "[1, 10]"),
    "n-more-than-the-queue": ({"n": MAX_QUEUED + 1}, "n", "--max-queued-images"),
    "n-not-int": ({"n": 1.5}, "n", "an integer"),
    "response-format-url": ({"response_format": "url"}, "response_format", "no files", "b64_json"),
    "temperature": ({"temperature": -1}, "temperature", "temperature"),
    "top-p": ({"top_p": 0}, "top_p", "top_p"),
    "seed-negative": ({"seed": -1}, "seed", "[0, "),
    "steps": ({"num_inference_steps": 0}, "num_inference_steps", "[1, 1000]"),
    "output-format": ({"output_format": "jpeg"}, "output_format", "png"),
}


@pytest.mark.parametrize("case", GENERATION_ERRORS)
def test_generation_refusals_name_the_field(server, case):
    fields, param, *words = GENERATION_ERRORS[case]
    body = {k: v for k, v in {"prompt": "a cat", "size": "64x64", **fields}.items() if v is not None}
    assert_error(post(server, "/v1/images/generations", json=body), 400, param, *words)


def test_an_unknown_model_is_a_404(server):
    response = post(server, "/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "model": "dall-e-3"})
    assert_error(response, 404, "model", "dall-e-3", "glm-image")


PNG = png(CONDITIONS[0])
EDIT_ERRORS = {
    "no-image": (dict(data={"prompt": "x"}, files={"unused": ("a.txt", b"text", "text/plain")}), "image",
                 "'image' is required"),
    "undecodable": (dict(data={"prompt": "x"}, files={"image": ("a.png", b"not an image", "image/png")}), "image",
                    "not a decodable image"),
    "second-undecodable": (dict(data={"prompt": "x"}, files=[("image[]", ("a.png", PNG, "image/png")),
                                                              ("image[]", ("b.png", b"\x89PNG junk", "image/png"))]),
                           "image[1]", "'image[1]'"),
    "too-many": (dict(data={"prompt": "x"}, files=[("image[]", (f"{i}.png", PNG, "image/png")) for i in range(3)]),
                 "image", "--max-images-per-request"),
    "mask": (dict(data={"prompt": "x"}, files={"image": ("a.png", PNG, "image/png"),
                                                "mask": ("m.png", PNG, "image/png")}), "mask", "mask"),
    "n-not-int": (dict(data={"prompt": "x", "n": "two"}, files={"image": ("a.png", PNG, "image/png")}), "n",
                  "an integer"),
    "prompt-missing": (dict(files={"image": ("a.png", PNG, "image/png")}), "prompt", "'prompt' is required"),
    "json-body": (dict(json={"prompt": "x", "image": "data:image/png;base64,"}), "body", "multipart/form-data"),
}


@pytest.mark.parametrize("case", EDIT_ERRORS)
def test_edit_refusals_name_the_field(server, case):
    kwargs, param, *words = EDIT_ERRORS[case]
    assert_error(post(server, "/v1/images/edits", **kwargs), 400, param, *words)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/glmocr/parse"])
def test_glm_ocr_endpoints_name_the_model_served(server, path):
    response = post(server, path, json={"model": "glm-image", "messages": [{"role": "user", "content": "hi"}]})
    assert_error(response, 404, None, path, "GLM-OCR checkpoint", "serves GLM-Image", "/v1/images/generations")


def test_a_glm_ocr_server_names_its_model_for_the_images_endpoints(tiny_checkpoint):
    from glmrt.engine.async_engine import AsyncEngine
    from glmrt.server.app import ServerConfig, build_app

    app = build_app(AsyncEngine(str(tiny_checkpoint), device="cpu", dtype="float32"), ServerConfig(("glm-ocr",)))

    async def call(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as http:
            return await http.post(path, json={"prompt": "a cat"})

    for path in ("/v1/images/generations", "/v1/images/edits"):
        assert_error(asyncio.run(call(path)), 404, None, path, "needs a GLM-Image checkpoint", "serves GLM-OCR",
                     "/v1/chat/completions")


def test_a_full_queue_is_a_503_with_retry_after(server):
    """A request holding every place (n = --max-queued-images) makes the next one wait for none."""
    body = {"prompt": "a cat", "n": MAX_QUEUED, "size": "64x64", "num_inference_steps": 1, "temperature": 0}
    holder = threading.Thread(target=post, args=(server, "/v1/images/generations"), kwargs={"json": body})
    holder.start()
    try:
        deadline = time.monotonic() + 60
        while server.metrics()["glmrt:num_images_pending"] < MAX_QUEUED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response = post(server, "/v1/images/generations", json={"prompt": "a dog", "size": "64x64"})
        assert_error(response, 503, None, "at capacity", f"{MAX_QUEUED} images pending")
        assert response.headers["retry-after"] == "1"
    finally:
        holder.join()
    assert server.metrics()["glmrt:num_images_pending"] == 0


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_count_pictures_and_stage_times(server, client):
    before = server.metrics()
    client.images.generate(prompt="a cat", n=2, size="64x64", extra_body={"num_inference_steps": 1, "temperature": 0})
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('glmrt:images_generated_total{endpoint="generations"}') == 2
    for stage in ("ar_stage", "diffusion_queue", "diffusion_stage"):
        assert delta(f"glmrt:image_{stage}_seconds_count") == 1
        assert delta(f"glmrt:image_{stage}_seconds_sum") >= 0
    assert delta("glmrt:image_diffusion_stage_seconds_sum") > 0
    assert delta("glmrt:generation_tokens_total") == 2 * (2 * 2 + 16 * 16 + 1)  # 2 x 2 grid, 16 x 16 preview, end
    assert delta('glmrt:http_requests_total{endpoint="/v1/images/generations",status="200"}') == 1
    assert after["glmrt:num_images_pending"] == 0
    server.wait_idle()


# ------------------------------------------------------------------------------------ in process


def test_async_engine_generates_image_tokens_as_llm_does(pipeline_dir, pipe):
    """Two images in the running batch (text-to-image and image-to-image) -> LLM's outputs for them;
    a cancelled call aborts its request."""
    from glmrt.engine.async_engine import AsyncEngine
    from glmrt.glm_image import ImageRequest

    engine = AsyncEngine(str(pipeline_dir), device="cpu", dtype="float32", backend="torch")
    cases = [("a cat on a mat", [], 96, 160), ("make it blue", CONDITIONS[:1], 128, 96)]

    async def run():
        both = await asyncio.gather(*(engine.generate_image_tokens(ImageRequest(p, h, w, imgs), GREEDY)
                                      for p, imgs, h, w in cases))
        cancelled = asyncio.ensure_future(engine.generate_image_tokens(ImageRequest("a dog", 64, 64), GREEDY))
        while not engine.engine.request_ids:
            await asyncio.sleep(0.001)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        while engine.engine.has_unfinished() or engine.engine.request_ids:
            await asyncio.sleep(0.01)
        return both

    outputs = asyncio.run(run())
    for out, (prompt, images, height, width) in zip(outputs, cases):
        [ref] = pipe.llm.generate_image_tokens(prompt, height, width, images=images, sampling_params=GREEDY)
        assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason
        assert torch.equal(out.image_tokens, ref.image_tokens)
        assert [c.tolist() for c in out.condition_image_tokens] == [c.tolist() for c in ref.condition_image_tokens]
