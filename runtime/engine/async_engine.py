"""AsyncEngine: the asyncio front of LLMEngine, for services and the server.

The engine runs on a thread of its own (core.py's EngineCore), which steps it back to back while
it has work: a busy event loop delays the delivery of outputs, never the next step. This side
never touches the engine: request preprocessing (tokenization, image decoding, grammar compiles)
runs in worker threads, the prepared sequence and any abort go to the core's inbox, and each
step's outputs come back to the loop in one callback (`loop.call_soon_threadsafe`), to be handed
to each request's consumer. An AsyncEngine serves the event loop of its first request; `close()`
ends the core thread.

Every request ends with a final output whatever state it was in when it was aborted or its
consumer went away: still being preprocessed, prepared but not yet taken by the core, queued,
running, or the engine shutting down.

A consumer that stops reading (a stalled HTTP client) holds one output per request, not one per
step: outputs it has not read are folded into one (_Unread), so its memory is O(output), not
O(output^2) (each output carries the whole output so far), and its deltas join up to the same text.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import AsyncIterator, Callable

from ..glm_image import ImageRequest, ImageTokensOutput
from ..outputs import Request, RequestOutput
from ..sampling_params import SamplingParams
from .core import EngineCore, aborted_output
from .engine import LLMEngine
from .sequence import Sequence
from .stats import EngineStats


async def gather_or_cancel(coroutines) -> list:
    """The results of the coroutines (engine calls), in order; when one fails, or the caller is
    cancelled, the others are cancelled, which aborts their engine requests, and waited for."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


class RequestFailed(RuntimeError):
    """The engine step that carried this request failed; other requests are unaffected."""


class _Unread:
    """A request's outputs that its consumer has not read yet, folded: a new output takes the place
    of an unread one and carries both deltas (the rest of an output, token_ids and text included,
    is the whole output so far, so the newer one is complete). An error output is kept apart, so the
    text before a failure is still read before RequestFailed is raised. At most two are held."""

    def __init__(self) -> None:
        # [(latest output, its delta texts, delta token ids joined so far)]: joined when read,
        # so folding a long stall costs O(output), not O(output^2)
        self._outputs: list[tuple[RequestOutput, list[str], list[int]]] = []
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        if self._outputs and out.finish_reason != "error":
            _, texts, token_ids = self._outputs[-1]
            texts.append(out.delta_text)
            token_ids += out.delta_token_ids
            self._outputs[-1] = (out, texts, token_ids)
        else:
            self._outputs.append((out, [out.delta_text], list(out.delta_token_ids)))
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        (out, texts, token_ids), *self._outputs = self._outputs
        if not self._outputs:
            self._ready.clear()
        if len(texts) == 1:
            return out
        return dataclasses.replace(out, delta_text="".join(texts), delta_token_ids=token_ids)


class AsyncEngine:
    def __init__(self, model: str, **kwargs):
        self.engine = LLMEngine(model, **kwargs)  # the core thread's: read only its fixed settings here
        self._core = EngineCore(self.engine, self._post)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop outputs are delivered on
        # On the loop only: the requests with a consumer (from generate until their final output),
        # those being prepared in a worker thread, and those of them aborted meanwhile.
        self._streams: dict[str, _Unread] = {}
        self._preparing: set[str] = set()
        self._cancelled: set[str] = set()

    def generate(self, request: Request | dict, sampling_params: SamplingParams | None = None,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs with the new text/token delta (one per step; a consumer that reads slower
        gets the steps it missed folded into one); the last one has finish_reason set
        ("stop", "length" or "abort"). Invalid requests raise ValueError/TypeError before anything is
        queued; a failed step raises RequestFailed. Closing the iterator early (a client disconnect)
        aborts the request and frees everything it holds."""
        request_id = self.engine.new_request_id() if request_id is None else request_id
        return self._stream(request_id, lambda: self.engine.prepare(request, sampling_params, request_id))

    async def generate_image_tokens(self, request: ImageRequest, sampling_params: SamplingParams | None = None,
                                    request_id: str | None = None) -> ImageTokensOutput:
        """GLM-Image's autoregressive stage for one image, in the running batch (as
        LLM.generate_image_tokens, one request of it): its final output as an ImageTokensOutput
        (image_tokens None unless the grid was filled). Invalid requests raise ValueError/TypeError
        before anything is queued; a failed step raises RequestFailed; cancelling the call aborts
        the request."""
        request_id = self.engine.new_request_id() if request_id is None else request_id
        prepared: list[Sequence] = []

        def prepare() -> Sequence:
            prepared.append(self.engine.prepare(request, sampling_params, request_id))
            return prepared[0]

        last = None
        async with contextlib.aclosing(self._stream(request_id, prepare)) as outputs:
            async for last in outputs:
                pass
        c = self.engine.config
        return ImageTokensOutput.from_output(last, request, prepared[0].image_grid_thw, c.image_start_token_id,
                                             c.image_end_token_id)

    async def _stream(self, request_id: str, prepare: Callable[[], Sequence]) -> AsyncIterator[RequestOutput]:
        """generate's outputs for the sequence `prepare()` makes (in a worker thread)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this AsyncEngine delivers its outputs on the event loop of its first request; "
                               "use it from that loop only")
        self._core.check_open()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Unread()
        self._streams[request_id] = stream
        queued = finished = False
        try:
            self._preparing.add(request_id)
            try:
                seq = await asyncio.to_thread(prepare)
            finally:
                self._preparing.discard(request_id)
            queued = request_id not in self._cancelled and self._core.add(seq)
            if not queued:  # aborted while being prepared, or the engine was closed meanwhile
                finished = True
                yield aborted_output(request_id, seq.prompt_token_ids)
                return
            while not finished:
                out = await stream.get()
                finished = out.finished
                if out.finish_reason == "error":
                    raise RequestFailed(f"request {request_id} failed: {out.error}")
                yield out
        finally:
            self._cancelled.discard(request_id)
            if self._streams.get(request_id) is stream:  # not ended by a final output yet
                if queued:
                    self._core.abort(request_id)  # its final output, when the core applies it, ends it
                else:
                    del self._streams[request_id]

    def abort(self, request_id: str) -> None:
        """Stop a request; its consumer gets a final "abort" output and everything it holds is
        freed before the next step."""
        if request_id in self._preparing:
            self._cancelled.add(request_id)
        elif request_id in self._streams:
            self._core.abort(request_id)

    def stats(self) -> EngineStats:
        """The engine's load after its last step (LLMEngine.stats), requests accepted but not yet
        in the scheduler (being prepared, or in the core's inbox) counted as waiting."""
        stats = self._core.stats()
        return dataclasses.replace(stats, num_waiting=stats.num_waiting + len(self._preparing))

    def close(self) -> None:
        """Stop the engine thread once the step under way returns and wait for it (blocks: from a
        coroutine, run it in a thread). Requests still running end with an "abort" output; new
        requests raise RuntimeError."""
        self._core.close()

    def _post(self, outputs: list[RequestOutput]) -> None:
        """On the core thread: one step's outputs, to be delivered on the loop."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, outputs)
        except RuntimeError:  # the loop is closed: its consumers are gone, nobody is left to read them
            pass

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]
