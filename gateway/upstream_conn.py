"""HTTP/1.1 on one upstream connection: the request as one buffer (`encode_request`), and an
asyncio protocol that feeds httptools' response parser and holds at most about `buffer_limit`
bytes of body the consumer has not taken.

It knows nothing of pools or of the public errors: it records what happened (`error`, `lost`,
`lost_exc`) and `gateway.upstream` turns that into an `UpstreamError` where it reaches the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import NamedTuple, Protocol, cast
from urllib.parse import urlsplit

import httptools

Headers = Sequence[tuple[bytes, bytes]]
Target = str | tuple[str, int, str]
"""An `http://` or `https://` URL, or (host, port, path) of a plain-HTTP upstream."""


class Origin(NamedTuple):
    tls: bool
    host: str
    port: int

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


class Route(NamedTuple):
    origin: Origin
    line: bytes  # b" <path> HTTP/1.1\r\nhost: <authority>\r\n", between method and headers
    path: bytes
    authority: bytes  # the Host header's value


_MANAGED_HEADERS = frozenset((b"host", b"content-length", b"transfer-encoding"))
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class HeadersTooLarge(Exception):
    """The response head grew past the configured limit."""


class Waits(Protocol):
    """Something one consumer waits on for news: an upstream connection, a run on a link."""

    waiter: asyncio.Future[bool] | None


async def wait_until(loop: asyncio.AbstractEventLoop, holder: Waits, deadline: float) -> bool:
    """Wait for `wake(holder)`; False if `deadline` (loop time) came first."""
    waiter: asyncio.Future[bool] = loop.create_future()
    holder.waiter = waiter
    timer = loop.call_at(deadline, _expire, waiter)
    try:
        return await waiter
    finally:
        timer.cancel()
        holder.waiter = None


def joined(chunks: list[bytes]) -> bytes:
    """Every chunk received and not yet taken, as one (b"" if none); `chunks` is emptied."""
    if not chunks:
        return b""
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    chunks.clear()
    return data


def wake(holder: Waits) -> None:
    waiter = holder.waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(True)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class UpstreamConnection(asyncio.Protocol):
    # Slots keep an idle stream small: 10,000 open streams means 10,000 of these.
    __slots__ = (
        "loop", "transport", "parser", "max_header_bytes", "buffer_limit",
        "busy", "head", "received", "head_seen", "head_size", "informational", "framed",
        "status", "headers", "headers_done", "complete", "keep_alive",
        "chunks", "buffered", "paused", "waiter", "error", "lost", "lost_exc", "idle_since",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, max_header_bytes: int, buffer_limit: int
    ) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.max_header_bytes = max_header_bytes
        self.buffer_limit = buffer_limit
        self.busy = False
        self.head = False
        self.received = False
        self.head_seen = 0
        self.head_size = 0
        self.informational = False
        self.framed = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[bool] | None = None
        self.error: Exception | None = None
        self.lost = False
        self.lost_exc: Exception | None = None
        self.idle_since = 0.0

    # --- used by the pool and the response -------------------------------------------------

    def begin(self, *, head: bool) -> None:
        """Reset the per-response state before a request is written."""
        self.busy = True
        self.head = head
        self.received = False
        self.head_seen = 0
        self.head_size = 0
        self.informational = False
        self.framed = False
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False

    def settle(self, now: float) -> None:
        """The response was consumed; the connection waits in the pool from `now`."""
        self.busy = False
        self.idle_since = now

    def take(self) -> bytes:
        """All body bytes received and not yet taken (b"" if none); resumes a paused read."""
        data = joined(self.chunks)
        self.buffered = 0
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.lost:
                self.transport.resume_reading()
        return data

    async def wait(self, deadline: float) -> bool:
        """Wait until something arrives or the connection ends; False if `deadline` came first."""
        return await wait_until(self.loop, self, deadline)

    def close(self) -> None:
        self.busy = False
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, though they implement it. Both
        # loops already set TCP_NODELAY, so small writes are not held back by Nagle.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            # Bytes on an idle connection (a 408 before closing, or junk) leave the parser in
            # an unknown state: the connection cannot carry another request.
            self.lost = True
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(exc)
            return
        if not self.headers_done:
            # A head that never ends would otherwise grow inside the parser without bound.
            self.head_seen += len(data)
            if self.head_seen > self.max_header_bytes:
                self._fail(HeadersTooLarge(f"response head exceeds {self.max_header_bytes} bytes"))
                return
        if self.buffered > self.buffer_limit and not self.paused and self.transport is not None:
            # The consumer is slower than the upstream: let the kernel buffers and TCP's window
            # push back instead of growing this one.
            self.paused = True
            self.transport.pause_reading()
        wake(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        if self.busy and self.headers_done and not self.complete and not self.framed:
            # No Content-Length and not chunked: the body ends when the connection does
            # (RFC 9112 section 6.3, last rule).
            self.complete = True
            self.keep_alive = False
        wake(self)

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise httptools.HttpParserError("bytes after the end of the response")
        self.headers = []

    def on_status(self, status: bytes) -> None:
        self.head_size += len(status) + 15

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_header_bytes:
            raise HeadersTooLarge(f"response head exceeds {self.max_header_bytes} bytes")
        name = name.lower()
        if name == b"content-length" or (
            name == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            # 1xx (e.g. 103 Early Hints) come before the real answer; 101 ends in an upgrade
            # error from the parser, since we never ask to switch protocols.
            self.informational = True
            return
        self.status = status
        self.headers_done = True
        if self.head:
            # httptools cannot be told a response has no body, so a HEAD answer ends here and
            # its connection is not reused.
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            self.head_size = 0
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive() and not self.head

    # --- internals --------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.complete:
            # The answer was whole; whatever followed only rules out reusing the connection.
            self.keep_alive = False
        else:
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            self.error = cause if isinstance(cause, Exception) else ValueError(str(exc))
        self.close()
        wake(self)


def parse_target(target: Target) -> Route:
    if isinstance(target, str):
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"upstream URL must be http:// or https://, got {target!r}")
        if not parts.hostname:
            raise ValueError(f"upstream URL has no host: {target!r}")
        tls = parts.scheme == "https"
        host = parts.hostname
        port = parts.port or (443 if tls else 80)
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
    else:
        host, port, path = target
        tls = False
    if not 0 < port < 65536:
        raise ValueError(f"upstream port out of range: {port!r}")
    authority = f"[{host}]" if ":" in host else host
    if port != (443 if tls else 80):
        authority = f"{authority}:{port}"
    try:
        raw_path, raw_authority = path.encode("ascii"), authority.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"upstream host and path must be ASCII: {target!r}") from None
    if not raw_path.startswith(b"/") or any(c <= 0x20 or c == 0x7F for c in raw_path):
        raise ValueError(f"upstream path must start with / and hold no spaces: {target!r}")
    line = b" %s HTTP/1.1\r\nhost: %s\r\n" % (raw_path, raw_authority)
    return Route(Origin(tls, host, port), line, raw_path, raw_authority)


def encode_request(
    method: str, route: Route, headers: Headers, body: bytes
) -> tuple[bytes, bool]:
    """The whole request as one buffer, and whether its connection may be reused after."""
    parts = [method.encode("ascii"), route.line]
    reusable = True
    for name, value in headers:
        lowered = name.lower()
        if lowered in _MANAGED_HEADERS:
            raise ValueError(f"the pool sets {name!r} itself")
        if lowered == b"connection" and value.lower() == b"close":
            reusable = False
        parts += (name, b": ", value, b"\r\n")
    lines = len(headers) + 3  # request line, host, headers, blank line
    if body or method in _BODY_METHODS:
        parts.append(b"content-length: %d\r\n" % len(body))
        lines += 1
    parts.append(b"\r\n")
    parts.append(body)
    payload = b"".join(parts)
    head_end = len(payload) - len(body)
    # Every line of the head ends in one CRLF; any other CR or LF came from a name or value and
    # would let it smuggle in a header or a second request.
    if payload.count(b"\n", 0, head_end) != lines or payload.count(b"\r", 0, head_end) != lines:
        raise ValueError("request method, header names and values must not contain CR or LF")
    return payload, reusable
