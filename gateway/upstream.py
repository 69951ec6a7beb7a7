"""A small streaming HTTP/1.1 client for the runtime: keep-alive connections pooled per origin,
httptools' parser, bounded read buffers and one exception tree.

    UpstreamError
    ├── UpstreamConnectError    no connection: refused, unreachable, unknown name, TLS failed
    │   └── UpstreamNoDescriptors   this process (or the system) has no file descriptor left
    ├── UpstreamTimeout         connecting, the response head, or a gap in the body took too long
    ├── UpstreamClosed          the upstream closed the connection before the response ended
    └── UpstreamProtocolError   the upstream's bytes are not HTTP/1.1, or its head is too large

The pool is made in the app's lifespan and closed there:

    pool = UpstreamPool(UpstreamSettings(read_timeout_s=30))
    response = await pool.request("POST", ("runtime", 8000, "/flows/f/stream"), headers, body)
    try:
        async for chunk in response.iter_raw():
            ...
    finally:
        await response.aclose()  # before the body's end this closes the connection
    await pool.aclose()
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Protocol, Self

from gateway.upstream_conn import (
    Headers,
    Origin,
    Route,
    Target,
    UpstreamConnection,
    encode_request,
    parse_target,
)

_ROUTE_CACHE_SIZE = 4096


class RuntimeAnswer(Protocol):
    """What the relay reads: an `UpstreamResponse` or a `gateway.link.LinkResponse`."""

    status: int

    def iter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class RuntimeCaller(Protocol):
    """How the relay calls the runtime: `UpstreamPool` (HTTP/1.1) or `gateway.link.LinkPool`."""

    async def request(
        self, method: str, target: Target, headers: Headers = (), body: bytes = b""
    ) -> RuntimeAnswer: ...

    async def aclose(self) -> None: ...


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer with a whole HTTP response."""


class UpstreamConnectError(UpstreamError):
    """No connection could be opened; nothing was sent."""


class UpstreamNoDescriptors(UpstreamConnectError):
    """No socket could be made: this process is at its open-files limit (EMFILE) or the
    system at its own (ENFILE). Nothing is wrong with the upstream."""


class UpstreamTimeout(UpstreamError):
    """Connecting, the response head, or a gap between body bytes outlasted its setting."""


class UpstreamClosed(UpstreamError):
    """The connection ended before the response did."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1 or breaks a limit (head size)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamSettings:
    """How the pool connects, waits and buffers. Every wait is bounded."""

    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 30.0
    read_timeout_s: float = 60.0
    # Below uvicorn's default keep-alive timeout (5 s), so we drop an idle connection before the
    # server does and rarely race its close.
    keepalive_expiry_s: float = 4.0
    max_idle_per_origin: int = 256
    max_header_bytes: int = 64 * 1024
    buffer_limit_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value < 0 or (value == 0 and spec.name != "max_idle_per_origin"):
                raise ValueError(f"UpstreamSettings.{spec.name} must be positive, got {value!r}")


class UpstreamPool:
    """Keep-alive connections per origin; one per request in flight, idle ones reused LIFO."""

    def __init__(
        self, settings: UpstreamSettings | None = None, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.settings = settings or UpstreamSettings()
        self._ssl_context = ssl_context
        self._idle: dict[Origin, deque[UpstreamConnection]] = {}
        self._routes: dict[Target, Route] = {}
        self._closed = False

    async def request(
        self, method: str, target: Target, headers: Headers = (), body: bytes = b""
    ) -> UpstreamResponse:
        """Send one request; return once the status line and headers are in."""
        if self._closed:
            raise RuntimeError("the upstream pool is closed")
        route = self._routes.get(target)
        if route is None:
            route = self._remember(target)
        payload, reusable = encode_request(method, route, headers, body)
        head = method == "HEAD"
        origin = route.origin
        conn = self._checkout(origin)
        if conn is not None:
            response = await self._exchange(conn, origin, payload, reusable, head)
            if response is not None:
                return response
            # A reused connection ended before any byte of an answer: almost always the upstream
            # closing it for idleness as we wrote. Once more on a fresh one; never after a byte.
        conn = await self._connect(origin)
        response = await self._exchange(conn, origin, payload, reusable, head)
        if response is None:
            raise UpstreamClosed(f"{origin} closed the connection without answering") \
                from conn.lost_exc
        return response

    async def aclose(self) -> None:
        """Close idle connections; responses still open close theirs on `aclose()`."""
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()

    async def _exchange(
        self, conn: UpstreamConnection, origin: Origin, payload: bytes, reusable: bool,
        head: bool,
    ) -> UpstreamResponse | None:
        """The response head, or None if the connection ended before any byte of it."""
        conn.begin(head=head)
        assert conn.transport is not None
        conn.transport.write(payload)
        deadline = conn.loop.time() + self.settings.first_byte_timeout_s
        try:
            while not conn.headers_done:
                if conn.error is not None:
                    raise UpstreamProtocolError(f"{origin} sent an invalid response head: "
                                                f"{conn.error}") from conn.error
                if conn.lost:
                    if not conn.received:
                        conn.close()
                        return None
                    raise UpstreamClosed(f"{origin} closed the connection mid-head") \
                        from conn.lost_exc
                if not await conn.wait(deadline):
                    raise UpstreamTimeout(f"{origin} sent no response head within "
                                          f"{self.settings.first_byte_timeout_s} s")
        except BaseException:
            # Cancelled or failed with the request in flight: the connection is not reusable.
            conn.close()
            raise
        return UpstreamResponse(self, origin, conn, reusable)

    def _checkout(self, origin: Origin) -> UpstreamConnection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        fresh_after = time.monotonic() - self.settings.keepalive_expiry_s
        while idle:
            conn = idle.pop()
            if not conn.lost and conn.idle_since > fresh_after:
                return conn
            conn.close()
        return None

    def _checkin(self, origin: Origin, conn: UpstreamConnection) -> None:
        if self._closed:
            conn.close()
            return
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        now = time.monotonic()
        # LIFO reuse leaves a burst's surplus at the cold end; drop what died or expired there.
        fresh_after = now - self.settings.keepalive_expiry_s
        while idle and (idle[0].lost or idle[0].idle_since <= fresh_after):
            idle.popleft().close()
        if len(idle) >= self.settings.max_idle_per_origin:
            conn.close()
            return
        conn.settle(now)
        idle.append(conn)

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        settings = self.settings
        conn = UpstreamConnection(
            loop,
            max_header_bytes=settings.max_header_bytes,
            buffer_limit=settings.buffer_limit_bytes,
        )
        try:
            async with asyncio.timeout(settings.connect_timeout_s):
                await connect(loop, conn, origin, self._ssl_context)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"connecting to {origin} took longer than "
                                  f"{settings.connect_timeout_s} s") from exc
        return conn

    def _remember(self, target: Target) -> Route:
        route = parse_target(target)
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[target] = route
        return route


async def connect(
    loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, origin: Origin,
    ssl_context: ssl.SSLContext | None,
) -> None:
    """Connect `protocol` to `origin` (over TLS with `ssl_context`, or the system's CAs), with
    a connection failure as an `UpstreamConnectError`; the caller bounds the wait."""
    context = (ssl_context or _default_tls_context()) if origin.tls else None
    try:
        transport, _ = await loop.create_connection(
            lambda: protocol, origin.host, origin.port,
            ssl=context, server_hostname=origin.host if context is not None else None,
        )
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            raise  # the caller's bound, which it names
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise UpstreamNoDescriptors(f"cannot connect to {origin}: {exc}") from exc
        raise UpstreamConnectError(f"cannot connect to {origin}: {exc}") from exc
    sock = transport.get_extra_info("socket")
    if sock is not None:
        for level, option, value in KEEPALIVE:
            sock.setsockopt(level, option, value)


# Idle connections and links to the runtime are kept for the next runs. A runtime host that
# vanishes without a reset (power, network) would leave them looking open, and the next run on
# one would wait for its first-byte timeout. With TCP keepalive the kernel probes a connection
# after 10 s of silence and closes it after three unanswered probes 5 s apart: within 25 s.
KEEPALIVE = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
)


@functools.cache
def _default_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class StreamedBody:
    """What every answer of the runtime shares: its body as an async iterator of the bytes
    ready each time (`__anext__`), `read()` for all of it, and `aclose()` as a context."""

    __slots__ = ()

    def iter_raw(self) -> Self:
        """Body bytes as they arrive, framing removed; each item is all that was ready."""
        return self

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        raise NotImplementedError

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class UpstreamResponse(StreamedBody):
    """Status and headers of an answer whose body is still arriving.

    Read the body with `iter_raw()` or `read()`, then `aclose()`. The connection goes back to the
    pool once the whole response has arrived and the upstream allows keep-alive; closing before
    that closes the connection, which is how the upstream learns the client went away.
    """

    __slots__ = ("status", "headers", "_pool", "_origin", "_conn", "_reusable", "_ended")

    def __init__(
        self, pool: UpstreamPool, origin: Origin, conn: UpstreamConnection, reusable: bool
    ) -> None:
        self.status = conn.status
        self.headers: list[tuple[bytes, bytes]] = conn.headers  # names lower-cased
        self._pool = pool
        self._origin = origin
        self._conn: UpstreamConnection | None = conn
        self._reusable = reusable
        self._ended = False

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            if self._ended:
                raise StopAsyncIteration
            raise UpstreamClosed("the response was closed before its body was read")
        while True:
            chunk = conn.take()
            if chunk:
                return chunk
            if conn.complete:
                self._release(conn)
                raise StopAsyncIteration
            if conn.error is not None:
                self._discard(conn)
                raise UpstreamProtocolError(f"{self._origin} sent an invalid body: "
                                            f"{conn.error}") from conn.error
            if conn.lost:
                self._discard(conn)
                raise UpstreamClosed(f"{self._origin} closed the connection mid-body") \
                    from conn.lost_exc
            read_timeout = self._pool.settings.read_timeout_s
            if not await conn.wait(conn.loop.time() + read_timeout):
                self._discard(conn)
                raise UpstreamTimeout(f"{self._origin} sent nothing for {read_timeout} s")

    async def aclose(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if conn.complete:
            # Whole response off the wire: the connection is clean even if the caller skipped
            # the rest of the body.
            self._release(conn)
        else:
            self._discard(conn)

    def _release(self, conn: UpstreamConnection) -> None:
        self._conn = None
        self._ended = True
        conn.take()  # drop what the caller skipped, and undo a pause the pool would inherit
        if conn.keep_alive and self._reusable and not conn.lost:
            self._pool._checkin(self._origin, conn)
        else:
            conn.close()

    def _discard(self, conn: UpstreamConnection) -> None:
        self._conn = None
        conn.close()

