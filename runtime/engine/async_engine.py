"""AsyncEngine: the asyncio front of LLMEngine, for services and the server.

One background task drives the engine. Model steps run in a worker thread so the event loop
stays responsive; request preprocessing also runs in worker threads. New requests and aborts are
applied to the engine only between steps, on the loop, so the engine is never touched by two
threads at once.

Every request ends with a final output whatever state it was in when it was aborted or its
consumer went away: still being preprocessed, prepared but not yet queued, queued, running.

A consumer that stops reading (a stalled HTTP client) holds one output per request, not one per
step: outputs it has not read are folded into one (_Unread), so its memory is O(output), not
O(output^2) (each output carries the whole output so far), and its deltas join up to the same text.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from ..glm_image import ImageRequest, ImageTokensOutput
from ..outputs import Request, RequestOutput
from ..sampling_params import SamplingParams
from .engine import LLMEngine
from .sequence import Sequence


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
        self.engine = LLMEngine(model, **kwargs)
        self._streams: dict[str, _Unread] = {}
        self._preparing: set[str] = set()  # ids whose images are being decoded in a worker thread
        self._cancelled: set[str] = set()  # ids aborted while preparing
        self._pending_aborts: set[str] = set()
        self._pending: list = []  # prepared sequences, queued at the next step boundary
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        # Steps run on a thread of their own: on the loop's default executor they would wait behind
        # whatever else is there (image decoding, page rendering, tokenization of many requests).
        self._stepper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmrt-step")

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
        if request_id in self._streams or self.engine.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Unread()
        self._streams[request_id] = stream
        finished = False
        try:
            self._preparing.add(request_id)
            try:
                seq = await asyncio.to_thread(prepare)
            finally:
                self._preparing.discard(request_id)
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                finished = True
                yield _aborted(request_id, seq.prompt_token_ids)
                return
            self._pending.append(seq)
            self._ensure_loop()
            while not finished:
                out = await stream.get()
                finished = out.finished
                if out.finish_reason == "error":
                    raise RequestFailed(f"request {request_id} failed: {out.error}")
                yield out
        finally:
            self._cancelled.discard(request_id)
            if not finished:
                self.abort(request_id)
            else:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request; its consumer gets a final "abort" output and everything it holds is
        freed before the next step."""
        if request_id in self._preparing:
            self._cancelled.add(request_id)
            return
        self._pending_aborts.add(request_id)
        self._ensure_loop()

    @property
    def num_preparing(self) -> int:
        """Requests accepted but not yet in the scheduler (images being decoded, or prepared and
        waiting for the next step boundary)."""
        return len(self._preparing) + len(self._pending)

    def _ensure_loop(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        aborts, self._pending_aborts = self._pending_aborts, set()
        for seq in pending:
            if seq.request_id in aborts:  # aborted between preparation and queueing
                aborts.discard(seq.request_id)
                self._deliver(_aborted(seq.request_id, seq.prompt_token_ids))
                continue
            self.engine.enqueue(seq)
        for request_id in aborts:
            out = self.engine.abort(request_id)
            if out is not None:
                self._deliver(out)
            else:  # never queued (its consumer left while it was being prepared) or already done
                self._streams.pop(request_id, None)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        stream.put(out)
        if out.finished:
            del self._streams[out.request_id]

    async def _run(self) -> None:
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._wakeup.clear()
                if self._pending or self._pending_aborts:
                    continue
                await self._wakeup.wait()
                continue
            try:
                outputs = await asyncio.get_running_loop().run_in_executor(self._stepper, self.engine.step)
            except Exception as exc:  # a fault in the engine's own host code: no request can go on
                outputs = [self.engine.abort(i) for i in self.engine.request_ids]
                for out in outputs:
                    out.finish_reason, out.error = "error", f"engine step failed: {exc!r}"
            for out in outputs:
                self._deliver(out)


def _aborted(request_id: str, prompt_token_ids: list[int]) -> RequestOutput:
    return RequestOutput(request_id=request_id, prompt_token_ids=prompt_token_ids, token_ids=[], text="",
                         finish_reason="abort")
