"""EngineCore: the thread that owns an LLMEngine and runs its step loop (vLLM's EngineCore, in
process).

Nothing else touches the engine while the core runs. Other threads (the asyncio front,
async_engine.py) put prepared sequences, aborts and the shutdown into its inbox, a thread-safe
FIFO; between two steps the core applies everything there, then steps again if the engine has work,
or blocks on the inbox if it has none (no polling). So the next step is launched as soon as the
last one returns, whatever the event loop is doing (reading a large body, running a slow handler,
holding the GIL): a busy loop delays the delivery of outputs, not the steps.

Each step's outputs go out together through `on_outputs` (called on the core thread, once per
step), after the engine's stats() snapshot has been published for `stats()` to read.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable

from ..outputs import RequestOutput
from .engine import LLMEngine
from .sequence import Sequence
from .stats import EngineStats

_STOP = object()  # the inbox's last item: end the thread


class EngineCore:
    def __init__(self, engine: LLMEngine, on_outputs: Callable[[list[RequestOutput]], None]):
        self.engine = engine
        self._on_outputs = on_outputs
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # Sequence (add) | str (abort) | _STOP
        self._lock = threading.Lock()  # orders every put before _STOP: nothing is left in the inbox
        self._closed = False
        self._error: str | None = None  # why the thread ended, if it failed
        self._num_added = 0  # sequences put in the inbox
        # (the engine's last snapshot, sequences it had been given then): one tuple, so a reader
        # never sees a request in neither count as it moves from the inbox to the engine
        self._published: tuple[EngineStats, int] = (engine.stats(), 0)
        self._thread: threading.Thread | None = None  # started by the first add

    def check_open(self) -> None:
        """Raise RuntimeError if the core takes no more requests (closed, or its thread failed)."""
        if self._closed:
            raise RuntimeError(self._error or "the engine is shut down and takes no new requests")

    def add(self, seq: Sequence) -> bool:
        """Queue a prepared sequence for the engine; its outputs come through on_outputs.
        -> False, the sequence not taken, if the core was closed meanwhile."""
        with self._lock:
            if self._closed:
                return False
            self._num_added += 1
            self._inbox.put(seq)
            if self._thread is None:  # a daemon: an engine nobody closes (a script's) does not hold the exit
                self._thread = threading.Thread(target=self._run, name="glmrt-engine-core", daemon=True)
                self._thread.start()
            return True

    def abort(self, request_id: str) -> None:
        """Stop a request added here: its final "abort" output comes through on_outputs (none if it
        had already finished)."""
        with self._lock:
            if not self._closed and self._thread is not None:
                self._inbox.put(request_id)

    def stats(self) -> EngineStats:
        """The snapshot published after the last step, sequences still in the inbox counted as waiting."""
        stats, given = self._published
        return dataclasses.replace(stats, num_waiting=stats.num_waiting + self._num_added - given)

    def close(self) -> None:
        """End the thread once the step under way returns, and wait for it; the requests the engine
        still holds end with an "abort" output. Later adds raise; later aborts do nothing."""
        with self._lock:
            if not self._closed and self._thread is not None:
                self._inbox.put(_STOP)
            self._closed = True
        if self._thread is not None:
            self._thread.join()

    def _take(self, wait: bool) -> list:
        """Everything in the inbox; waits for the first item if `wait`."""
        items = []
        try:
            items.append(self._inbox.get(block=wait))
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            return items

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a fault outside a step (none is known): no request can go on
            self._error = f"the engine core failed: {exc!r}"
            self._end("error")
            raise
        self._end("abort")

    def _serve(self) -> None:
        """Apply the inbox, step, publish, hand the outputs out; until _STOP."""
        engine, given = self.engine, 0
        while True:
            outputs: list[RequestOutput] = []
            for item in self._take(wait=not engine.has_unfinished()):
                if item is _STOP:
                    return
                if isinstance(item, Sequence):
                    engine.enqueue(item)
                    given += 1
                elif (out := engine.abort(item)) is not None:
                    outputs.append(out)
            if engine.has_unfinished():
                outputs += self._step()
            self._published = (engine.stats(), given)
            if outputs:
                self._on_outputs(outputs)

    def _end(self, finish_reason: str) -> None:
        """Every request still here, in the engine or the inbox, ends with `finish_reason`."""
        with self._lock:
            self._closed = True
        engine = self.engine
        ended = [engine.abort(i) for i in engine.request_ids]
        ended += [aborted_output(seq.request_id, seq.prompt_token_ids) for seq in self._take(wait=False)
                  if isinstance(seq, Sequence)]
        for out in ended:
            out.finish_reason, out.error = finish_reason, self._error
        if ended:
            self._on_outputs(ended)
        if finish_reason == "abort" and engine.has_unfinished():
            self._step()  # read the step still in flight (its tokens are dropped): nothing is left running
        self._published = (engine.stats(), self._num_added)

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # a fault in the engine's own host code: no request can go on
            outputs = [self.engine.abort(i) for i in self.engine.request_ids]
            for out in outputs:
                out.finish_reason, out.error = "error", f"engine step failed: {exc!r}"
            return outputs


def aborted_output(request_id: str, prompt_token_ids: list[int]) -> RequestOutput:
    """The final output of a request aborted before the engine got it."""
    return RequestOutput(request_id=request_id, prompt_token_ids=prompt_token_ids, token_ids=[], text="",
                         finish_reason="abort")
