"""AsyncEngine: the asyncio front of LLMEngine, for services and the server.

One background task drives the engine. Model steps run in a worker thread so the event loop
stays responsive; request preprocessing also runs in worker threads, and new requests and aborts
are applied to the scheduler only between steps, on the loop, so the engine is never touched by
two threads at once.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ..outputs import Request, RequestOutput
from ..sampling_params import SamplingParams
from .engine import LLMEngine


class AsyncEngine:
    def __init__(self, model: str, **kwargs):
        self.engine = LLMEngine(model, **kwargs)
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending_aborts: set[str] = set()
        self._pending: list = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    async def generate(self, request: Request | dict, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield an output per step with the new text/token delta; the last one has finish_reason set.

        Invalid requests raise here (ValueError/TypeError) before anything is queued. Closing the
        iterator early (e.g. a client disconnect) aborts the request and frees its blocks.
        """
        seq = await asyncio.to_thread(self.engine.prepare, request, sampling_params, request_id)
        if seq.request_id in self._streams or self.engine.has_request(seq.request_id):
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[seq.request_id] = stream
        self._pending.append(seq)
        self._ensure_loop()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(seq.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        self._pending_aborts.add(request_id)
        self._ensure_loop()

    def _ensure_loop(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for seq in pending:
            if seq.request_id in self._pending_aborts:
                self._pending_aborts.discard(seq.request_id)
                self._streams.pop(seq.request_id, None)
                continue
            self.engine.enqueue(seq)
        aborts, self._pending_aborts = self._pending_aborts, set()
        for request_id in aborts:
            out = self.engine.abort(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None and out is not None:
                stream.put_nowait(out)

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
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as exc:  # an internal failure ends the requests of that step, not the engine
                for request_id in self.engine.request_ids:
                    self.engine.abort(request_id)
                    stream = self._streams.pop(request_id, None)
                    if stream is not None:
                        stream.put_nowait(RuntimeError(f"engine step failed: {exc!r}"))
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                stream.put_nowait(out)
                if out.finished:
                    del self._streams[out.request_id]
