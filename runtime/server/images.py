"""POST /v1/images/generations and /v1/images/edits: GLM-Image pictures, as OpenAI's images API.

Requests: generations take a JSON body; edits take multipart/form-data as the `openai` client
sends it, the condition images as files under `image` (or `image[]`, a list's spelling) and the
other fields as text. Fields: `prompt` (required), `n` (1 to 10), `size` "WxH" (width x height,
multiples of 32 pixels up to 2048; default 1024x1024), `response_format`
"b64_json" (the default; "url" is refused: this server keeps no files), `model`; glmrt's extras:
`seed`, `num_inference_steps`, `guidance_scale` (None: the diffusion pipeline's defaults) and the
AR stage's `temperature`, `top_p`, `top_k` (over the checkpoint's generation_config.json). Answer:
{"created": unix time, "data": [{"b64_json": base64 PNG}, ...]}, one entry per image.

A request's n images are n AR requests in the server's AsyncEngine, decoded in its continuous
batch beside every other request's; their grids become the diffusion stage's prior tokens, and
one DiffusionStage.render call per request makes its n pictures on the single diffusion worker
thread (DiffusionStage is not thread-safe; one render fills the device), in the order the
requests' AR stages end. Seeds as glmrt.ImagePipeline([prompt] * n, seed=s): image i's AR
tokens are sampled from s + i (mod 2**64), the render is seeded with s; so a request gives the
same PNGs as the Python API.

Bounded: a request holds n of --max-queued-images places from its admission until its pictures
are rendered; a request that finds too few free is answered 503 with Retry-After. A client that
leaves aborts its AR requests and its render if it has not started (a render that has started
runs to its end: diffusers has no way to stop it, and its pictures are dropped); a shutdown's
drain timeout does the same and answers 503.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Gauge
from starlette.datastructures import UploadFile

from ..diffusers_stage import SEED_LIMIT, seeded, to_prior_tokens
from ..engine import AsyncEngine, gather_or_cancel
from ..glm_image import ImageRequest, check_image_size
from ..sampling_params import SamplingParams
from .metrics import ServerMetrics
from .protocol import APIError, PromptLimit, PromptText, param_of, type_name

MAX_N = 10  # images per request, as OpenAI's API
DEFAULT_SIZE = "1024x1024"
SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
# Form fields read from an edit's body: a text field may be at most this many bytes (starlette's
# default of 1 MB would cap the prompt below what the JSON endpoint takes).
MAX_FORM_FIELD_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass
class ImageJob:
    """What a validated images request asks for."""

    model: str | None
    prompt: str
    n: int
    width: int
    height: int
    seed: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    params: SamplingParams  # the AR stage's, each image's seed set from `seed`

    def image_params(self) -> list[SamplingParams]:
        """One SamplingParams per image: seed + i (mod 2**64), as prior_tokens' generator seeds them."""
        if self.seed is None:
            return [self.params] * self.n
        return seeded([self.params] * self.n, self.seed)


class _Fields:
    """A request's fields: JSON values, or a form's text (converted here); null or absent: not set."""

    def __init__(self, values: Mapping[str, Any], form: bool):
        self.values, self.form = values, form

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def text(self, name: str) -> str | None:
        value = self.get(name)
        if value is not None and not isinstance(value, str):
            raise APIError(f"'{name}' must be a string, got {type_name(value)}", name)
        return value

    def number(self, name: str, kind: type, low: float | None = None, high: float | None = None) -> Any:
        """An int (kind int) or a number (kind float), within [low, high] when they are given
        (SamplingParams checks its own fields' ranges), or None."""
        value = self.get(name)
        if value is None:
            return None
        what = "an integer" if kind is int else "a number"
        if self.form:
            try:
                value = int(value, 10) if kind is int else float(value)
            except ValueError:
                raise APIError(f"'{name}' must be {what}, got {value!r:.40}", name) from None
        elif isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise APIError(f"'{name}' must be {what}, got {type_name(value)}", name)
        if low is not None and not low <= value <= high:  # NaN is in no range
            raise APIError(f"'{name}' must be in [{low}, {high}], got {value!r:.40}", name)
        return value


def parse_size(size: str | None) -> tuple[int, int]:
    """OpenAI's size "WxH" (or "auto": 1024x1024) -> (width, height), within GLM-Image's sizes
    (glm_image.check_image_size: multiples of 32 pixels, up to 2048)."""
    if size is None or size == "auto":
        size = DEFAULT_SIZE
    match = SIZE.fullmatch(size)
    if match is None:
        raise APIError(f"'size' must be 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024'), got {size!r:.40}", "size")
    width, height = int(match[1]), int(match[2])
    try:
        check_image_size(height, width)
    except ValueError as exc:
        raise APIError(f"'size' {size}: {exc}", "size") from None
    return width, height


def parse_image_request(fields: _Fields, defaults: SamplingParams, limit: PromptLimit) -> ImageJob:
    """Validate an images request's fields (see the module's docstring); errors name the field."""
    prompt = fields.text("prompt")
    if prompt is None:
        raise APIError("'prompt' is required: the text of the picture to make", "prompt")
    if not prompt.strip():
        raise APIError("'prompt' must not be empty", "prompt")
    PromptText(limit).take(prompt, "prompt")
    response_format = fields.text("response_format")
    if response_format == "url":
        raise APIError("'response_format' 'url' is not supported: this server keeps no files; use 'b64_json' "
                       "(the default)", "response_format")
    if response_format not in (None, "b64_json"):
        raise APIError(f"'response_format' must be 'b64_json', got {response_format!r:.40}", "response_format")
    output_format = fields.text("output_format")
    if output_format not in (None, "png"):
        raise APIError(f"'output_format' must be 'png', got {output_format!r:.40}", "output_format")
    if fields.get("stream") not in (None, False, "false"):
        raise APIError("'stream' is not supported: the answer holds the finished pictures", "stream")
    width, height = parse_size(fields.text("size"))
    n = fields.number("n", int, 1, MAX_N)
    sampling = {name: fields.number(name, kind) for name, kind in (("temperature", float), ("top_p", float),
                                                                     ("top_k", int))}
    try:
        params = dataclasses.replace(defaults, **{k: v for k, v in sampling.items() if v is not None})
    except (ValueError, TypeError) as exc:
        raise APIError(str(exc), param_of(str(exc), None)) from None
    return ImageJob(
        model=fields.text("model"), prompt=prompt, n=1 if n is None else n, width=width, height=height,
        seed=fields.number("seed", int, 0, SEED_LIMIT - 1),
        num_inference_steps=fields.number("num_inference_steps", int, 1, 1000),
        guidance_scale=fields.number("guidance_scale", float, 0, 1000), params=params,
    )


class Painter:
    """The image pipeline behind the routes: the AR stage on the AsyncEngine, the diffusion stage on
    one worker thread, at most `max_queued` images admitted and not yet rendered."""

    def __init__(self, engine: AsyncEngine, stage, metrics: ServerMetrics, max_queued: int, retry_after_s: int):
        self.engine, self.stage, self.metrics = engine, stage, metrics
        self.max_queued, self.retry_after_s = max_queued, retry_after_s  # the Retry-After of a 503
        self.pending = 0  # images admitted and not yet rendered
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmrt-diffusion")
        Gauge("glmrt:num_images_pending", "Images admitted and not yet rendered: in the AR stage, waiting for or in "
              "the diffusion stage.", registry=metrics.registry).set_function(lambda: self.pending)

    def condition(self, image, param: str):
        """A decoded condition image (request field `param`) prepared as glmrt.ImagePipeline prepares
        its own (DiffusionStage.condition), so that an edit gives the Python API's picture.
        ValueError naming `param` (too small, too elongated)."""
        return self.stage.condition(image, self.engine.engine.processor, param)

    def _admit(self, n: int) -> None:
        """Take n places, or refuse the request."""
        if n > self.max_queued:
            raise APIError(f"'n' = {n} is more images than the server takes at once (--max-queued-images "
                           f"{self.max_queued})", "n")
        if self.pending + n > self.max_queued:
            raise APIError(f"the server is at capacity ({self.pending} images pending, at most {self.max_queued}); "
                           "retry later", status=503, headers={"Retry-After": str(self.retry_after_s)})
        self.pending += n

    async def paint(self, job: ImageJob, images: list | None, endpoint: str) -> list[bytes]:
        """The job's n pictures as PNG files (a 503 if the server is at capacity). The job holds n
        places from here until its render ends, or until it fails or is cancelled before reaching
        the worker. images: the condition images (edits), or None."""
        self._admit(job.n)
        loop = asyncio.get_running_loop()
        handed_over = False  # to the worker, which gives the places back when the render ends

        def release() -> None:
            self.pending -= job.n

        try:
            start = time.monotonic()
            requests = [ImageRequest(job.prompt, job.height, job.width, images or []) for _ in range(job.n)]
            try:
                outputs = await gather_or_cancel(self.engine.generate_image_tokens(r, p)
                                     for r, p in zip(requests, job.image_params()))
            except (ValueError, TypeError) as exc:  # refused by the engine before it was queued
                raise APIError(str(exc), "image" if str(exc).startswith("image ") else "size") from exc
            queued = time.monotonic()
            self.metrics.image_ar_seconds.observe(queued - start)
            self.metrics.prompt_tokens.inc(sum(len(out.prompt_token_ids) for out in outputs))
            self.metrics.generation_tokens.inc(sum(len(out.token_ids) for out in outputs))
            prompts = [job.prompt] * job.n

            def render() -> list:
                began = time.monotonic()
                self.metrics.image_queue_seconds.observe(began - queued)
                # RuntimeError naming the prompt if an AR request ended before its grid was full
                prior = to_prior_tokens(outputs, prompts, images is not None, self.stage.device)
                pictures = self.stage.render(prompts, prior, height=job.height, width=job.width,
                                             images=None if images is None else [images] * job.n, seed=job.seed,
                                             num_inference_steps=job.num_inference_steps,
                                             guidance_scale=job.guidance_scale)
                self.metrics.image_diffusion_seconds.observe(time.monotonic() - began)
                return pictures

            future = self._worker.submit(render)
            # (a render that ends after the server's loop has closed gives nothing back to anyone)
            future.add_done_callback(lambda _: loop.is_closed() or loop.call_soon_threadsafe(release))
            handed_over = True
            pictures = await asyncio.wrap_future(future)
        except APIError:
            raise
        except Exception as exc:  # a failed AR step (RequestFailed), a partial grid, the render's own failure
            raise APIError(f"making the picture failed: {type(exc).__name__}: {exc}", status=500) from exc
        finally:
            if not handed_over:
                release()
        files = await asyncio.to_thread(lambda: [_png(p) for p in pictures])
        self.metrics.images.labels(endpoint).inc(len(files))
        return files

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def add_image_routes(app: FastAPI, painter: Painter, *, limit: PromptLimit, max_images: int, check_auth: Callable,
                     served_name: Callable, read_json: Callable, read_body: Callable, check_image: Callable,
                     decode_image: Callable, until_done: Callable) -> None:
    """The two routes on `app`. read_json / read_body(request): the body (parsed, or its bytes)
    within the server's limits; check_image(data, param) and decode_image(data, param) -> PIL: the
    media policy's checks and decoding (APIErrors naming param); until_done(request, work): work's
    result, None if the client left (work cancelled)."""
    defaults = painter.engine.engine.generation_config.sampling_params()

    def parse(fields: _Fields) -> ImageJob:
        job = parse_image_request(fields, defaults, limit)
        served_name(job.model)
        return job

    async def respond(request: Request, job: ImageJob, images: list | None, endpoint: str) -> Response:
        files = await until_done(request, painter.paint(job, images, endpoint))
        if files is None:  # the client left
            return Response(status_code=499)
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": base64.b64encode(f).decode()} for f in files]})

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        check_auth(request)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise APIError(f"the request body must be a JSON object, got {type_name(body)}", "body")
        return await respond(request, parse(_Fields(body, form=False)), None, "generations")

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        check_auth(request)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise APIError("/v1/images/edits takes multipart/form-data, the condition images as files under 'image'",
                           "body")
        body = await read_body(request)

        async def replay() -> dict:  # the body, already read within the limits, for the form parser
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=1000,
                                                             max_part_size=MAX_FORM_FIELD_BYTES)
        except Exception as exc:  # starlette's MultiPartException: a malformed body, a part too large
            raise APIError(f"the multipart/form-data body cannot be read: {exc}", "body") from exc
        try:
            if form.get("mask") is not None:
                raise APIError("'mask' is not supported: GLM-Image edits the whole picture", "mask")
            texts = {key: value for key, value in form.multi_items() if isinstance(value, str)}
            job = parse(_Fields(texts, form=True))
            uploads = form.getlist("image") + form.getlist("image[]")
            if not uploads:
                raise APIError("'image' is required: one or more condition images, as files", "image")
            if len(uploads) > max_images:
                raise APIError(f"{len(uploads)} images, more than the limit of {max_images} per request "
                               "(--max-images-per-request)", "image")
            encoded = []
            for i, upload in enumerate(uploads):
                param = "image" if len(uploads) == 1 else f"image[{i}]"
                if not isinstance(upload, UploadFile):
                    raise APIError(f"'{param}' must be a file, got a text field", param)
                encoded.append((await upload.read(), param))
        finally:
            await form.close()
        for data, param in encoded:
            check_image(data, param)
        images = list(await asyncio.gather(*(condition_image(data, param) for data, param in encoded)))
        return await respond(request, job, images, "edits")

    async def condition_image(data: bytes, param: str):
        image = await decode_image(data, param)
        try:
            return await asyncio.to_thread(painter.condition, image, param)
        except ValueError as exc:
            raise APIError(str(exc), param) from exc
