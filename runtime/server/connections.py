"""Connection limits of `glmrt serve`: a cap on open connections, a deadline and a size bound for a
request's headers, and the open-file limit raised at start.

uvicorn alone keeps a connection that sends nothing, or sends its headers a byte at a time, open
for ever (its keep-alive timeout starts only after a response), and its httptools parser reads
headers of any size: 1,100 idle sockets used up the server's 1,024 file descriptors, so /health and
every new request failed until they were dropped, and a 64 MB header was read whole.

Here a connection waiting for a request's headers gets `header_timeout_s` from its first byte (from
its connection when it is new) before it is answered 408 and closed; headers past
`max_header_bytes` are answered 431; and a new connection past `max_connections` closes the open
connection that has waited longest for a request (one whose request is being handled is never
closed; when every one is, the new connection is answered 503). The guard is a subclass of the HTTP
protocol uvicorn picks (httptools if installed, else h11), built on what both have: `cycle` (the
request being handled, made when its headers are complete), `connections`, `transport`,
`on_response_complete`.
"""
from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Callable
from dataclasses import dataclass

from .protocol import APIError

DEFAULT_MAX_CONNECTIONS = 8192
# File descriptors kept out of the connection cap: the checkpoint's files, media fetches, logs.
RESERVED_FILES = 256
REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_header_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.header_timeout_s, (int, float)) or not 0 < self.header_timeout_s < float("inf"):
            raise ValueError(f"header_timeout_s must be a number of seconds > 0, got {self.header_timeout_s!r}")


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit, where allowed -> the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # macOS refuses an infinite soft limit
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limits(open_files: int, **given) -> ConnectionLimits:
    """ConnectionLimits from the values given (the others: defaults), the connection cap below the
    open-file limit: by default DEFAULT_MAX_CONNECTIONS or, if lower, `open_files` - RESERVED_FILES."""
    room = open_files - RESERVED_FILES
    limits = ConnectionLimits(**{"max_connections": max(1, min(DEFAULT_MAX_CONNECTIONS, room)), **given})
    if "max_connections" in given and limits.max_connections > room:
        raise ValueError(f"max_connections {limits.max_connections} needs more open files than this process may "
                         f"have ({open_files}, {RESERVED_FILES} of them kept for the server's own files)")
    return limits


def guarded_http_protocol(limits: ConnectionLimits,
                           on_refusal: Callable[[int], None] = lambda status: None) -> type[asyncio.Protocol]:
    """uvicorn's own choice of HTTP protocol class with `limits` applied (uvicorn.run(http=...));
    on_refusal(status) is called for each connection answered 408, 431 or 503 (to count it)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("GuardedHTTPProtocol", (_Guard, AutoHTTPProtocol),
                {"limits": limits, "on_refusal": staticmethod(on_refusal)})


class _Guard:
    """Mixed in before uvicorn's protocol class. `_waiting_since`: when the connection began to wait
    for a request's headers (None while a request is handled); `_header_bytes`: bytes received since."""

    limits: ConnectionLimits
    on_refusal: Callable[[int], None]

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._waiting_since, self._header_bytes = self.loop.time(), 0
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._waiting_since is None:
            return super().data_received(data)
        if self._header_timer is None:  # a kept-alive connection's next request begins
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)
        # The parser sees no more than the header limit until the headers are complete; what follows
        # them in the same read (the body) is passed on after.
        room = self.limits.max_header_bytes - self._header_bytes
        self._header_bytes += len(data)
        cycle = self.cycle
        super().data_received(data[:room])
        if self.cycle is not cycle:  # uvicorn made the request's cycle: its headers are complete
            self._disarm()
            self._waiting_since = None
            if len(data) > room:
                super().data_received(data[room:])
        elif len(data) > room and not self.transport.is_closing():
            self._refuse(431, f"the request's headers are more than {self.limits.max_header_bytes} bytes")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:  # no pipelined request started
            self._waiting_since, self._header_bytes = self.loop.time(), 0

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._waiting_since is not None and not self.transport.is_closing():
            self._refuse(408, f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s")

    def _make_room(self) -> None:
        """Past the cap: close the open connection that has waited longest for a request, else refuse
        this one. O(connections), only while past the cap."""
        others = [c for c in self.connections if c is not self and not c.transport.is_closing()]
        if len(others) < self.limits.max_connections:  # the rest are closing already
            return
        idle = [c for c in others if c._waiting_since is not None]
        if idle:
            min(idle, key=lambda c: c._waiting_since).transport.close()
        else:
            self._refuse(503, f"the server has {len(others)} connections open, its limit; retry later")

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with an OpenAI-style error body and close the connection."""
        self._disarm()
        body = json.dumps(APIError(message, status=status).body()).encode()
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                % (status, REASONS[status], len(body)))
        self.transport.write(head + body)
        self.transport.close()
        self.on_refusal(status)
