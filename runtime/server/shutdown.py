"""Graceful shutdown of `glmrt serve`: SIGTERM or SIGINT stops new requests, lets those in flight
finish within a drain timeout, then ends the rest with a clean error (an SSE error event in a
stream, a 503 with a message otherwise).

uvicorn alone stops listening at the signal, waits `timeout_graceful_shutdown` for the open
connections, then cancels their handlers mid-flight: streams were cut without an error event and
waiting clients got a 500. Here the app learns of the signal at once (`Drain.begin`, called from
the uvicorn server's signal handler): from then on it answers new requests on connections still
open with a 503, and when the drain timeout is up it aborts what is left (`Drain.expired`, and the
app's hook that aborts its engine requests), so that every handler ends by itself with a clean
error before uvicorn's own timeout, which is set longer, would cancel anything.
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Callable

import uvicorn

# uvicorn's own timeout is the drain timeout plus this: time for the handlers ended at the
# deadline to send their error and close their connections.
ERROR_GRACE_S = 5.0


class Drain:
    """The state of a graceful shutdown, shared by the app's handlers: `draining` from the signal
    on, `expired` once `timeout_s` have passed since; `on_expiry` hooks run then (on the loop)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.draining = False
        self.expired = asyncio.Event()
        self._hooks: list[Callable[[], None]] = []

    def on_expiry(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)

    def begin(self) -> None:
        """Start draining (on the event loop; a second call changes nothing)."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(self.timeout_s, self._expire)

    def _expire(self) -> None:
        self.expired.set()
        for hook in self._hooks:
            hook()


class _Server(uvicorn.Server):
    """uvicorn's server, which also starts the app's drain when a signal stops it."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:  # a signal handler: the loop may be mid-callback
        super().handle_exit(sig, frame)
        self.loop.call_soon_threadsafe(self.drain.begin)


def serve_with_drain(app, **options) -> None:
    """uvicorn.run(app, **options) with the app's graceful shutdown (its `app.state.drain`)."""
    drain: Drain = app.state.drain
    server = _Server(uvicorn.Config(app, timeout_graceful_shutdown=drain.timeout_s + ERROR_GRACE_S, **options), drain)
    with contextlib.suppress(KeyboardInterrupt):  # the SIGINT uvicorn raises again once it has shut down
        server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's exit status for a server that could not start (e.g. the port is taken)
