"""The OpenAI-compatible HTTP app: FastAPI routes over one AsyncEngine.

Endpoints of a GLM-OCR server: POST /v1/chat/completions and /v1/completions (JSON, or SSE with
`stream: true`), POST /glmocr/parse (whole documents, as the glmocr SDK's server;
server/documents.py). Of a GLM-Image server: POST /v1/images/generations and /v1/images/edits
(server/images.py). Each answers the other's endpoints with a 404 naming the model it serves.
Both: GET /v1/models, /health and /metrics. A request is validated (body size, JSON, fields, model
name, images) before anything is queued; every refusal is an OpenAI-style error body naming the field.
Each request owns one engine request: when its client disconnects, the engine request is aborted
(counted as an "abort") and its KV blocks freed; when its engine step fails, that request alone
gets a 500 (or an error event in its stream) and the server goes on. On SIGTERM/SIGINT the server
drains (server/shutdown.py): new requests get a 503, those in flight run on for the drain
timeout, then end with a 503 (or a 503 error event in their stream).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from ..documents.layout import DEFAULT_MODEL as DEFAULT_LAYOUT_MODEL
from ..engine import AsyncEngine, RequestFailed
from ..image_processor import load_image
from ..outputs import Request as EngineRequest
from ..outputs import RequestOutput
from ..sampling_params import MAX_CONSTRAINT_CHARS
from .images import Painter, add_image_routes
from .logprobs import TokenTexts
from .media import MediaLoader, MediaPolicy
from .metrics import RequestTimer, ServerMetrics
from .protocol import (APIError, ImageRef, ParsedRequest, PromptLimit, ResponseShape, compile_constraint,
                       constraint_field, param_of, parse_chat, parse_completion)
from .shutdown import Drain

# Request defaults after the checkpoint's generation_config.json: the glmocr SDK's profile
# (greedy, repetition_penalty 1.1, up to 8192 new tokens).
SDK_PROFILE = {"temperature": 0.0, "repetition_penalty": 1.1, "max_tokens": 8192}
TEXT_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/glmocr/parse")
IMAGE_ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
ENDPOINTS = (*TEXT_ENDPOINTS, *IMAGE_ENDPOINTS, "/v1/models", "/health", "/metrics")


@dataclass
class ServerConfig:
    served_model_names: tuple[str, ...]
    api_key: str | None = None
    max_queue: int = 1024  # requests accepted beyond max_num_seqs before answering 503
    max_request_bytes: int = 64 * 1024 * 1024  # request body
    max_images_per_request: int = 16  # and documents per POST /glmocr/parse
    max_pages_per_request: int = 100  # POST /glmocr/parse: PDF pages and images, all documents together
    retry_after_s: int = 1  # the Retry-After of a 503
    media: MediaPolicy = field(default_factory=MediaPolicy)
    # POST /glmocr/parse's layout model (loaded on its first request); None: no document parsing
    layout_model: str | None = DEFAULT_LAYOUT_MODEL
    shutdown_timeout_s: float = 30.0  # on SIGTERM/SIGINT, how long requests in flight may run on
    grammar_timeout_s: float = 10.0  # compiling a request's structured-output constraint, at most
    # A request's whole body, from its headers on: a body sent a byte at a time would hold its
    # connection (never closed while its request is handled) for ever.
    body_timeout_s: float = 120.0
    # GLM-Image: images admitted and not yet rendered (AR stage, waiting for or in the diffusion
    # stage) before answering 503
    max_queued_images: int = 32

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        for name in ("max_queue", "max_request_bytes", "max_images_per_request", "max_pages_per_request",
                     "retry_after_s", "max_queued_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.shutdown_timeout_s, (int, float)) or not 0 <= self.shutdown_timeout_s < float("inf"):
            raise ValueError(f"shutdown_timeout_s must be a number of seconds >= 0, got {self.shutdown_timeout_s!r}")
        for name in ("grammar_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")


class _StatusCounter:
    """Pure ASGI middleware counting responses by endpoint and status (works for streams, unlike
    BaseHTTPMiddleware, which would also hide client disconnects from the routes)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class _RefuseWhileDraining:
    """Pure ASGI middleware: once the server is shutting down, every new request but GET /metrics
    is answered 503, /health included (a load balancer stops sending requests here)."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.drain.draining or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        error = APIError("the server is shutting down and takes no new requests", status=503)
        await JSONResponse(error.body(), status_code=503)(scope, receive, send)


def build_app(engine: AsyncEngine, config: ServerConfig, diffusion=None) -> FastAPI:
    """The app over `engine`: GLM-OCR's endpoints, or for a GLM-Image engine the images endpoints,
    which need its diffusion stage (a diffusers_stage.DiffusionStage of the same checkpoint). The
    app's shutdown closes the engine."""
    serves_images = engine.engine.generates_images
    if serves_images and diffusion is None:
        raise ValueError(f"{engine.engine.model_path} is GLM-Image: serving it needs its diffusion stage "
                         "(build_app(..., diffusion=DiffusionStage.from_pretrained(...)); glmrt serve --ray serves "
                         "GLM-OCR only)")
    metrics = ServerMetrics(engine)
    media = MediaLoader(config.media)
    generation_config = engine.engine.generation_config
    defaults = {**SDK_PROFILE, **generation_config.sampling_fields()}
    tokenizer = engine.engine.processor.tokenizer
    # One token covers at most as many characters as its vocabulary string has (a byte-level BPE
    # string has one per byte; an added token is its text; GLM's tokenizer has no normalizer), so a
    # longer text than max_model_len times the longest cannot fit: refused before it is tokenized.
    prompt_limit = PromptLimit(engine.engine.max_model_len, max(map(len, tokenizer.get_vocab(with_added_tokens=True))))
    max_logprobs = engine.engine.options.max_logprobs
    token_texts = TokenTexts(tokenizer)
    # json.loads holds the GIL, and so the loop, for ~0.1 us a value: a 64 MB body of small numbers
    # held it for seconds. Every value but the first follows a comma, and no request needs more
    # values than its prompt's text, its token ids and its constraint hold, and a few for the rest.
    max_json_values = prompt_limit.max_chars + engine.engine.max_model_len + MAX_CONSTRAINT_CHARS + 65536
    # Requests with a structured-output constraint are parsed here, with the constraint compiled into
    # the engine's cache (llguidance releases the GIL): never on the loop, and on a pool of their own, so that a burst
    # of compiles neither waits behind nor delays the image decoding on the loop's default executor.
    intake = ThreadPoolExecutor(max_workers=4, thread_name_prefix="glmrt-intake")
    max_in_flight = engine.engine.options.max_num_seqs + config.max_queue
    in_flight = 0
    live: set[str] = set()  # the engine request ids of the chat and completion requests in flight
    drain = Drain(config.shutdown_timeout_s)
    # Past the drain timeout the requests still in flight are aborted: each handler sees its final
    # "abort" output and answers a 503 (a 503 error event in a stream).
    drain.on_expiry(lambda: [engine.abort(request_id) for request_id in live])

    def shutting_down() -> APIError:
        return APIError(f"the server is shutting down and this request did not finish within its "
                        f"{config.shutdown_timeout_s:g} s drain timeout; retry it", status=503)

    painter = (Painter(engine, diffusion, metrics, config.max_queued_images, config.retry_after_s)
               if serves_images else None)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        # llguidance's tokenizer, built before the first request: built for the first constrained
        # one, it would hold the GIL, and so stop every stream, for up to a second
        await asyncio.to_thread(engine.engine.load_constraints)
        yield
        # After the drain: the requests still held (none, unless uvicorn cancelled their handlers)
        # end with an "abort" output, and the engine's thread is joined.
        await asyncio.to_thread(engine.close)
        intake.shutdown(wait=False, cancel_futures=True)
        if painter is not None:
            painter.close()
        await media.aclose()

    app = FastAPI(title="glmrt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.drain = drain  # begun by shutdown.serve_with_drain on SIGTERM/SIGINT
    app.state.metrics = metrics  # the connection guard's refusals are counted here too (endpoint "connection")
    app.add_middleware(_RefuseWhileDraining, drain=drain)
    app.add_middleware(_StatusCounter, metrics=metrics)  # the outermost: it counts the refusals too

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(_: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # the client left while its body was read: nothing to answer

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(f"internal error: {type(exc).__name__}: {exc}", status=500).body(),
                            status_code=500)

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError("missing or wrong API key (send 'Authorization: Bearer <key>')", status=401)

    def served_name(model: str | None) -> str:
        if model is None:
            return config.served_model_names[0]
        if model not in config.served_model_names:
            raise APIError(f"The model `{model}` does not exist (served: {', '.join(config.served_model_names)}).",
                           "model", status=404)
        return model

    def serves(kind: str, path: str) -> None:
        """Refuse `path` unless this server's model is `kind` ("GLM-OCR" or "GLM-Image")."""
        served = "GLM-Image" if serves_images else "GLM-OCR"
        if kind != served:
            own = IMAGE_ENDPOINTS if serves_images else TEXT_ENDPOINTS[:2]
            raise APIError(f"{path} needs a {kind} checkpoint, but this server serves {served} "
                           f"({', '.join(config.served_model_names)}): use POST {' or '.join(own)}", status=404)

    async def read_body(request: Request) -> bytes:
        """The request's body, within the body size limit and timeout."""
        limit = config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(f"the request body is {declared} bytes, more than the limit of {limit} bytes", "body")
        async def receive() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(f"the request body is more than the limit of {limit} bytes", "body")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(receive(), config.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(f"the request body did not arrive within {config.body_timeout_s:g} s", "body", status=408,
                           headers={"connection": "close"}) from None

    async def read_json(request: Request) -> Any:
        body = await read_body(request)
        if len(body) > max_json_values and body.count(b",") >= max_json_values:  # ~1 ms a MB, a third of json.loads
            raise APIError(f"the request body has more than {max_json_values} JSON values, more than any request "
                           "needs", "body")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, too deep, an int too long
            raise APIError(f"the request body is not valid JSON ({type(exc).__name__}: {exc})", "body") from exc

    def parse_and_compile(parse_body, body: Any, *args) -> ParsedRequest:
        parsed = parse_body(body, *args)
        compile_constraint(parsed, engine.engine.compile_constraint)  # kept for the engine's prepare
        return parsed

    async def parse(parse_body, body: Any, *args) -> ParsedRequest:
        """`parse_body(body, *args)`; one with a constraint on an intake thread, with the constraint
        compiled, refused (naming the constraint's field) if it does not compile within the grammar timeout."""
        name = constraint_field(body)
        if name is None:
            return parse_body(body, *args)  # milliseconds at most: the prompt's text is bounded
        job = asyncio.get_running_loop().run_in_executor(intake, parse_and_compile, parse_body, body, *args)
        try:
            return await asyncio.wait_for(job, config.grammar_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(f"'{name}' did not compile within {config.grammar_timeout_s:g} s; send a smaller "
                           "constraint", name) from None

    async def decode_image(data: bytes, param: str):
        """Encoded bytes (policy-checked) -> a PIL image, in a worker thread; errors name the field."""
        try:
            return await asyncio.to_thread(load_image, data)
        except ValueError as exc:
            raise APIError(f"'{param}': {exc}", param) from exc

    async def load_images(refs: list[ImageRef]) -> list:
        encoded = await media.load_all(refs)
        return list(await asyncio.gather(*(decode_image(d, r.param) for d, r in zip(encoded, refs))))

    def admit() -> None:
        if in_flight >= max_in_flight:
            raise APIError(f"the server is at capacity ({in_flight} requests in flight); retry later", status=503,
                           headers={"Retry-After": str(config.retry_after_s)})

    @contextlib.contextmanager
    def in_flight_place():
        """Holds one of the max_in_flight places while the block runs (a document parse's)."""
        nonlocal in_flight
        admit()
        in_flight += 1
        try:
            yield
        finally:
            in_flight -= 1

    async def until_done(request: Request, work) -> Any:
        """`work`'s result; None if the client left; a 503 once a shutdown's drain timeout has
        passed. Either way `work` is cancelled first."""
        result = await _until_disconnected(request, work, drain.expired)
        if result is None and drain.expired.is_set():
            raise shutting_down()
        return result

    def logprobs(kind: str, parsed: ParsedRequest, out: RequestOutput, start: int, end: int,
                 offset: int = 0) -> dict | None:
        """The choice's `logprobs` of out's tokens [start, end), their text from character `offset`
        of the output; None when the request asked for none."""
        top = parsed.params.logprobs
        if top is None:
            return None
        ids, entries = out.token_ids[start:end], out.logprobs[start:end]
        if kind == "chat":
            return token_texts.chat(ids, entries, top)
        return token_texts.completion(ids, entries, top, offset)

    async def respond(request: Request, kind: str, parsed: ParsedRequest, model: str,
                      engine_request: EngineRequest) -> Response:
        nonlocal in_flight
        admit()
        if drain.expired.is_set():  # it came in before a shutdown, and got this far after its drain timeout
            raise shutting_down()
        shape = ResponseShape(kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", model)
        timer = RequestTimer(metrics)
        outputs = engine.generate(engine_request, parsed.params, request_id=shape.id)
        in_flight += 1
        live.add(shape.id)
        released = False

        async def release(ended: str | None = "abort") -> None:
            """Leave the in-flight count; `ended` is the finish reason counted if no final output was
            seen (the client left: "abort"), None for a request the engine refused before queueing it."""
            nonlocal in_flight, released
            if not released:
                released = True
                in_flight -= 1
                live.discard(shape.id)
                await outputs.aclose()  # aborts the engine request if it is still going
                if ended is not None:
                    timer.end(ended)

        try:
            first = await _until_disconnected(request, _next(outputs, timer))
        except (ValueError, TypeError) as exc:  # refused by the engine before anything was queued
            await release(ended=None)
            raise APIError(str(exc), param_of(str(exc), "messages" if kind == "chat" else "prompt")) from exc
        except Exception:
            await release(ended="error")
            raise
        except BaseException:
            await release()
            raise
        if first is None:  # the client left during prefill
            await release()
            return Response(status_code=499)
        # From here on, a request whose client is still there is aborted only by the drain timeout.
        if first.finish_reason == "abort":
            await release()
            raise shutting_down()
        if not parsed.stream:
            try:
                final = first
                if not final.finished:
                    final = await _until_disconnected(request, _last(outputs, timer))
                if final is None:
                    return Response(status_code=499)
                if final.finish_reason == "abort":
                    raise shutting_down()
                # The tokens the text holds (a stop token left out of it is left out here too).
                reported = len(final.delta_token_ids) + (len(first.delta_token_ids) if final is not first else 0)
                return JSONResponse(shape.full(final, logprobs(kind, parsed, final, 0, reported)))
            finally:
                await release()

        async def events() -> AsyncIterator[str]:
            usage = None if not parsed.include_usage else parsed.continuous_usage
            out = first
            reported = taken = 0  # delta tokens whose logprobs were sent, and read
            try:
                yield _sse(shape.chunk(out, "", first=True, with_usage=usage))
                while True:
                    if out.finish_reason == "abort":  # the drain timeout passed
                        yield _sse(shutting_down().body())
                        break
                    taken += len(out.delta_token_ids)
                    if out.delta_text or out.finished:  # the logprobs of tokens with no text yet wait for it
                        entries = logprobs(kind, parsed, out, reported, taken, len(out.text) - len(out.delta_text))
                        reported = taken
                        yield _sse(shape.chunk(out, out.delta_text, with_usage=usage, logprobs=entries))
                    if out.finished:
                        if parsed.include_usage:
                            yield _sse(shape.usage_chunk(out))
                        break
                    out = await _next(outputs, timer)
            except RequestFailed as exc:
                yield _sse(APIError(str(exc), status=500).body())
            finally:
                await release()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        serves("GLM-OCR", "/v1/chat/completions")
        parsed = await parse(parse_chat, await read_json(request), defaults, config.max_images_per_request,
                             prompt_limit, max_logprobs)
        model = served_name(parsed.model)
        admit()
        images = await load_images(parsed.images)
        return await respond(request, "chat", parsed, model, EngineRequest(messages=parsed.messages, images=images))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_auth(request)
        serves("GLM-OCR", "/v1/completions")
        parsed = await parse(parse_completion, await read_json(request), defaults, prompt_limit, max_logprobs)
        model = served_name(parsed.model)
        admit()
        ids = parsed.prompt
        if isinstance(ids, str):
            # encode_batch releases the GIL (encode does not): the loop goes on meanwhile
            ids = (await asyncio.to_thread(tokenizer.encode_batch, [ids], add_special_tokens=True))[0].ids
        return await respond(request, "completion", parsed, model, EngineRequest(prompt_token_ids=ids))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_auth(request)
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "glmrt",
             "root": str(engine.engine.model_path), "max_model_len": engine.engine.max_model_len}
            for name in config.served_model_names]})

    def refuse(kind: str, path: str) -> None:
        """POST `path`, an endpoint of the other model: a 404 naming the model served."""
        async def other_model(request: Request) -> Response:
            check_auth(request)
            serves(kind, path)

        app.add_api_route(path, other_model, methods=["POST"])

    if serves_images:
        add_image_routes(app, painter, limit=prompt_limit, max_images=config.max_images_per_request,
                         check_auth=check_auth, served_name=served_name, read_json=read_json, read_body=read_body,
                         check_image=media.check, decode_image=decode_image, until_done=until_done)
        refuse("GLM-OCR", "/glmocr/parse")
    else:
        for path in IMAGE_ENDPOINTS:
            refuse("GLM-Image", path)
        try:
            from .documents import add_document_routes

            add_document_routes(app, engine, media, metrics, layout_model=config.layout_model,
                                max_units=config.max_images_per_request, max_pages=config.max_pages_per_request,
                                check_auth=check_auth, read_json=read_json, in_flight=in_flight_place,
                                until_done=until_done)
        except ImportError as exc:  # glmrt[documents] is not installed
            missing = f"POST /glmocr/parse needs the documents extra: pip install 'glmrt[documents]' ({exc})"

            @app.post("/glmocr/parse")
            async def glmocr_parse_unavailable(request: Request) -> Response:
                raise APIError(missing, status=501)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _next(outputs: AsyncIterator[RequestOutput], timer: RequestTimer) -> RequestOutput:
    try:
        out = await outputs.__anext__()
    except RequestFailed:
        timer.end("error")
        raise
    timer.observe(out)
    return out


async def _last(outputs: AsyncIterator[RequestOutput], timer: RequestTimer) -> RequestOutput:
    """The final output, with the delta_token_ids of every output read here joined."""
    token_ids: list[int] = []
    while True:
        out = await _next(outputs, timer)
        token_ids += out.delta_token_ids
        if out.finished:
            return dataclasses.replace(out, delta_token_ids=token_ids)


async def _until_disconnected(request: Request, work, stop: asyncio.Event | None = None) -> Any:
    """Run `work` until it finishes (its result), the client disconnects or `stop` is set (None;
    `work` is cancelled, which aborts its engine requests). A server that cancels the handler
    instead of sending the disconnect (Ray Serve's proxy does) cancels `work` with it."""
    task = asyncio.ensure_future(work)
    watchers = {asyncio.ensure_future(_disconnected(request))}
    if stop is not None:
        watchers.add(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        # `work` closes what it holds (the engine request's stream) before the caller goes on to
        # close it too: closing a stream still running in `work` fails ("aclose(): asynchronous
        # generator is already running").
        await asyncio.wait({task})
        raise
    finally:
        for watcher in watchers:
            watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
