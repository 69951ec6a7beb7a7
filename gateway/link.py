"""Many runs over few connections to the runtime: the gateway's side of the runtime link
(`sitekit-link.1`; the frames are described in runtime/link.py).

Over HTTP/1.1 every open chat holds a second socket, to the runtime, so a worker's open chats
are capped at half its open-files limit. Over the link a worker holds a few connections per
runtime origin and numbers its runs on them. The pool answers like `UpstreamPool`, with the same
errors, so the relay does not know which one it calls:

    pool = LinkPool(authorization=b"Bearer <runtime token>")
    response = await pool.request("POST", ("runtime", 8000, "/flows/f/stream"), headers, body)
    try:
        async for chunk in response.iter_raw():
            ...
    finally:
        await response.aclose()  # before the body's end this cancels the run
    await pool.aclose()

A run goes on the first open link of its origin that carries fewer than `streams_per_link` runs;
when every link is that busy a new one is opened (up to `max_links`, after which the least busy
link takes it). Small links spread the runs over the runtime's workers, which each accept
connections of their own, as HTTP/1.1 connections did. A link that goes unused for
`idle_expiry_s` is closed, down to one per origin.

WebSocket framing and the handshake come from `websockets`' sans-I/O protocol, about 6 µs of CPU
for a run's frames; HTTP/2 through `h2` would cost about 109 µs per request, most of a worker's
budget.
"""

from __future__ import annotations

import asyncio
import errno
import struct
import time
from dataclasses import dataclass, fields
from typing import cast

import orjson
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from gateway.upstream import (
    StreamedBody,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamNoDescriptors,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from gateway.upstream_conn import Headers, Origin, Target, parse_target, wait_until, wake

SUBPROTOCOL = Subprotocol("sitekit-link.1")
LINK_PATH = "/link"

OPEN, CANCEL = 1, 2  # gateway -> runtime
HEAD, DATA, END, GOAWAY = 1, 2, 3, 4  # runtime -> gateway
_FRAME = struct.Struct(">IB")
_OPEN_HEAD = struct.Struct(">IBH")
_STATUS = struct.Struct(">H")
_MAX_STREAM_ID = 2**32 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSettings:
    """How the pool connects, waits, spreads runs and buffers. Every wait is bounded."""

    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 30.0
    read_timeout_s: float = 60.0
    streams_per_link: int = 16
    max_links: int = 256
    idle_expiry_s: float = 30.0
    buffer_limit_bytes: int = 1024 * 1024
    max_message_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value <= 0:
                raise ValueError(f"LinkSettings.{spec.name} must be positive, got {value!r}")


class LinkStream:
    """One run's answer as it arrives on its link."""

    __slots__ = ("link", "stream_id", "status", "headers", "headers_done", "complete", "chunks",
                 "buffered", "waiter", "error")

    def __init__(self, link: LinkConnection, stream_id: int) -> None:
        self.link = link
        self.stream_id = stream_id
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.waiter: asyncio.Future[bool] | None = None
        self.error: Exception | None = None

    def take(self) -> bytes:
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        return data

    async def wait(self, deadline: float) -> bool:
        """Wait until something arrives or the stream ends; False if `deadline` came first."""
        return await wait_until(self.link.loop, self, deadline)

    def wake(self) -> None:
        wake(self)


class LinkConnection(asyncio.Protocol):
    """One WebSocket to the runtime carrying numbered runs."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, origin: Origin, authorization: bytes,
        settings: LinkSettings,
    ) -> None:
        self.loop = loop
        self.origin = origin
        self.settings = settings
        uri = parse_uri(f"ws://{_authority(origin)}{LINK_PATH}")
        self.ws = ClientProtocol(uri, subprotocols=[SUBPROTOCOL],
                                 max_size=settings.max_message_bytes)
        self._request = self.ws.connect()
        self._request.headers["Authorization"] = authorization.decode("latin-1")
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.streams: dict[int, LinkStream] = {}
        self.next_id = 1
        self.draining = False
        self.lost = False
        self.lost_exc: Exception | None = None
        self.idle_since = time.monotonic()
        self._partial: list[bytes] = []

    # --- used by the pool ---------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.ready.done() and not self.lost and not self.draining \
            and self.next_id < _MAX_STREAM_ID

    def open(self, method: str, path: str, headers: Headers, body: bytes) -> LinkStream:
        stream_id = self.next_id
        self.next_id += 1
        head = orjson.dumps({
            "method": method, "path": path,
            "headers": [[name.decode("latin-1"), value.decode("latin-1")]
                        for name, value in headers],
        })
        stream = LinkStream(self, stream_id)
        self.streams[stream_id] = stream
        self._send(_OPEN_HEAD.pack(stream_id, OPEN, len(head)) + head + body)
        return stream

    def cancel(self, stream: LinkStream) -> None:
        """The caller no longer wants the answer; the runtime cancels the run."""
        if self.streams.pop(stream.stream_id, None) is not None:
            self._send(_FRAME.pack(stream.stream_id, CANCEL))
            self._settled()

    def finished(self, stream: LinkStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self._settled()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            if self.ws.state is State.OPEN:
                self.ws.send_close(1000)
            self._flush()
            self.transport.close()

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.ws.send_request(self._request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        events = ws.events_received()
        self._flush()  # pongs and the answer to a close
        for event in events:
            if isinstance(event, Frame):
                self._frame(event)
            else:
                self._handshake(cast(Response, event))
        if self.lost or (self.ready.done() and ws.state is not State.OPEN):
            self._lose(None)  # the runtime closed the link: its runs end here

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc)

    # --- internals ----------------------------------------------------------------------

    def _handshake(self, response: Response) -> None:
        if self.ready.done():
            return
        failure = self.ws.handshake_exc
        if failure is None and self.ws.subprotocol != SUBPROTOCOL:
            failure = InvalidHandshake(f"the runtime did not accept {SUBPROTOCOL}")
        if failure is not None:
            status = f"HTTP {response.status_code}: " if response.status_code != 101 else ""
            self.ready.set_exception(UpstreamConnectError(
                f"{self.origin} refused the runtime link ({status}{failure})"))
            self.lost = True
            if self.transport is not None:
                self.transport.close()
            return
        self.ready.set_result(None)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.CONT or (opcode is Opcode.BINARY and not frame.fin):
            self._partial.append(bytes(frame.data))
            if not frame.fin:
                return
            data = b"".join(self._partial)
            self._partial.clear()
        elif opcode is Opcode.BINARY:
            data = bytes(frame.data)
        elif opcode is Opcode.TEXT:
            self._violation("the runtime sent a text message")
            return
        else:
            return  # ping, pong, close: the protocol object answers them
        if len(data) < _FRAME.size:
            self._violation(f"a frame of {len(data)} bytes")
            return
        stream_id, kind = _FRAME.unpack_from(data)
        if stream_id == 0:
            if kind == GOAWAY:
                self.draining = True
                if not self.streams:
                    self.close()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # cancelled here while the runtime was still answering
        if kind == DATA:
            stream.chunks.append(data[_FRAME.size:])
            stream.buffered += len(data) - _FRAME.size
            if stream.buffered > self.settings.buffer_limit_bytes:
                stream.error = UpstreamProtocolError(
                    f"{self.origin}: the answer outgrew {self.settings.buffer_limit_bytes} "
                    f"bytes unread")
                self.cancel(stream)
        elif kind == HEAD and not stream.headers_done:
            try:
                stream.status = _STATUS.unpack_from(data, _FRAME.size)[0]
                raw = orjson.loads(data[_FRAME.size + _STATUS.size:] or b"[]")
                stream.headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                                  for name, value in raw]
            except (struct.error, orjson.JSONDecodeError, TypeError, ValueError,
                    AttributeError) as exc:
                stream.error = UpstreamProtocolError(f"{self.origin} sent an invalid head: {exc}")
                self.cancel(stream)
            else:
                stream.headers_done = True
        elif kind == END and stream.headers_done:
            stream.complete = True
            self.finished(stream)
        else:
            stream.error = UpstreamProtocolError(
                f"{self.origin} sent frame kind {kind} out of order")
            self.cancel(stream)
        stream.wake()

    def _violation(self, what: str) -> None:
        self.ws.fail(1002, f"{what}, which sitekit-link.1 does not allow")
        self._flush()
        error = UpstreamProtocolError(f"{self.origin} broke the runtime link: {what}")
        for stream in self.streams.values():
            stream.error = error
        self._lose(error)
        if self.transport is not None:
            self.transport.close()

    def _send(self, payload: bytes) -> None:
        if self.lost or self.ws.state is not State.OPEN:
            return  # closing: the run's wait ends when the connection does
        self.ws.send_binary(payload)
        self._flush()

    def _flush(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            data = self.ws.data_to_send()
            if data:
                transport.write(b"".join(data))

    def _settled(self) -> None:
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.draining:
                self.close()

    def _lose(self, exc: Exception | None) -> None:
        if self.lost and not self.streams and self.ready.done():
            return
        self.lost = True
        if self.lost_exc is None:
            self.lost_exc = exc
        if not self.ready.done():
            self.ready.set_exception(UpstreamConnectError(
                f"{self.origin} closed the runtime link before its handshake ended"))
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.wake()
        if self.transport is not None:
            self.transport.close()


@dataclass(slots=True)
class _Opening:
    """A link being opened, and how many runs wait to go on it."""

    link: asyncio.Future[LinkConnection]
    claims: int = 0


class LinkPool:
    """Runtime links per origin; runs spread over them (see the module's docstring)."""

    def __init__(self, settings: LinkSettings | None = None, *, authorization: bytes) -> None:
        self.settings = settings or LinkSettings()
        self._authorization = authorization
        self._links: dict[Origin, list[LinkConnection]] = {}
        self._opening: dict[Origin, list[_Opening]] = {}
        self._paths: dict[Target, tuple[Origin, str]] = {}
        self._reaped_at = 0.0
        self._closed = False

    async def request(
        self, method: str, target: Target, headers: Headers = (), body: bytes = b""
    ) -> LinkResponse:
        """Start one run; return once its status and headers are in."""
        if self._closed:
            raise RuntimeError("the link pool is closed")
        found = self._paths.get(target)
        if found is None:
            found = self._remember(target)
        origin, path = found
        for attempt in (1, 2):
            link, fresh = await self._link_for(origin)
            stream = link.open(method, path, headers, body)
            response = await self._head(link, stream)
            if response is not None:
                return response
            if fresh or attempt == 2:
                raise UpstreamClosed(f"{origin} closed the runtime link without answering") \
                    from link.lost_exc
            # The link ended before this run's head: the runtime went away as we sent, which
            # cancelled the run there. Once more on a fresh link; never after a byte.
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close every link; runs still open on them end as closed mid-answer."""
        self._closed = True
        for links in self._links.values():
            for link in links:
                link.close()
        self._links.clear()

    @property
    def links(self) -> int:
        return sum(len(links) for links in self._links.values())

    async def _head(self, link: LinkConnection, stream: LinkStream) -> LinkResponse | None:
        deadline = link.loop.time() + self.settings.first_byte_timeout_s
        try:
            while not stream.headers_done:
                if stream.error is not None:
                    raise stream.error
                if link.lost:
                    return None
                if not await stream.wait(deadline):
                    raise UpstreamTimeout(f"{link.origin} sent no response head within "
                                          f"{self.settings.first_byte_timeout_s} s")
        except BaseException:
            link.cancel(stream)
            raise
        return LinkResponse(self, stream)

    async def _link_for(self, origin: Origin) -> tuple[LinkConnection, bool]:
        """A link with room for one more run, and whether it was opened for this one."""
        links = self._links.get(origin)
        if links is None:
            links = self._links[origin] = []
        now = time.monotonic()
        if now - self._reaped_at > 1.0:
            self._reaped_at = now
            self._reap(links, now)
        limit = self.settings.streams_per_link
        least: LinkConnection | None = None
        for link in links:
            if link.usable:
                if len(link.streams) < limit:
                    return link, False
                if least is None or len(link.streams) < len(least.streams):
                    least = link
        openings = self._opening.setdefault(origin, [])
        if least is not None and len(links) + len(openings) >= self.settings.max_links:
            return least, False
        # Runs that arrive while links are being opened share them, as many to one as a link
        # takes, rather than each opening its own.
        opening = min(openings, key=lambda o: o.claims, default=None)
        if opening is None or (opening.claims >= limit
                               and len(links) + len(openings) < self.settings.max_links):
            opening = _Opening(asyncio.ensure_future(self._connect(origin)))
            openings.append(opening)
            opening.link.add_done_callback(lambda _: self._opened(origin, opening))
        opening.claims += 1
        return await asyncio.shield(opening.link), True

    def _opened(self, origin: Origin, opening: _Opening) -> None:
        self._opening[origin].remove(opening)
        if not opening.link.cancelled():
            opening.link.exception()  # its waiters raise it; this only marks it retrieved

    async def _connect(self, origin: Origin) -> LinkConnection:
        loop = asyncio.get_running_loop()
        settings = self.settings
        link = LinkConnection(loop, origin, self._authorization, settings)
        try:
            async with asyncio.timeout(settings.connect_timeout_s):
                await loop.create_connection(lambda: link, origin.host, origin.port)
                await link.ready
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            link._lose(None)
            raise UpstreamTimeout(f"opening the runtime link to {origin} took longer than "
                                  f"{settings.connect_timeout_s} s") from exc
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise UpstreamNoDescriptors(f"cannot connect to {origin}: {exc}") from exc
            raise UpstreamConnectError(f"cannot connect to {origin}: {exc}") from exc
        if self._closed:
            link.close()
            raise RuntimeError("the link pool is closed")
        links = self._links.setdefault(origin, [])
        links[:] = [other for other in links if not other.lost]
        links.append(link)
        return link

    def _reap(self, links: list[LinkConnection], now: float) -> None:
        """Forget lost links; close links idle for `idle_expiry_s`, keeping one."""
        keep: list[LinkConnection] = []
        idle_before = now - self.settings.idle_expiry_s
        for link in links:
            if link.lost:
                continue
            if keep and not link.streams and link.idle_since < idle_before:
                link.close()
                continue
            keep.append(link)
        links[:] = keep

    def _remember(self, target: Target) -> tuple[Origin, str]:
        route = parse_target(target)
        if route.origin.tls:
            raise ValueError(f"the runtime link does not speak TLS: {target!r}")
        # parse_target's line is b" <path> HTTP/1.1\r\nhost: ...": the path is its second word.
        path = route.line.split(b" ", 2)[1].decode("ascii")
        if len(self._paths) >= 4096:
            self._paths.clear()
        self._paths[target] = found = (route.origin, path)
        return found


class LinkResponse(StreamedBody):
    """Status and headers of a run whose body is still arriving; read it like an
    `UpstreamResponse`. Closing it before the end cancels the run."""

    __slots__ = ("status", "headers", "_pool", "_stream", "_ended")

    def __init__(self, pool: LinkPool, stream: LinkStream) -> None:
        self.status = stream.status
        self.headers = stream.headers
        self._pool = pool
        self._stream: LinkStream | None = stream
        self._ended = False

    async def __anext__(self) -> bytes:
        stream = self._stream
        if stream is None:
            if self._ended:
                raise StopAsyncIteration
            raise UpstreamClosed("the response was closed before its body was read")
        link = stream.link
        while True:
            chunk = stream.take()
            if chunk:
                return chunk
            if stream.complete:
                self._stream = None
                self._ended = True
                raise StopAsyncIteration
            if stream.error is not None:
                self._stream = None
                raise stream.error
            if link.lost:
                self._stream = None
                raise UpstreamClosed(f"{link.origin} closed the runtime link mid-body") \
                    from link.lost_exc
            read_timeout = self._pool.settings.read_timeout_s
            if not await stream.wait(link.loop.time() + read_timeout):
                self._stream = None
                link.cancel(stream)
                raise UpstreamTimeout(f"{link.origin} sent nothing for {read_timeout} s")

    async def aclose(self) -> None:
        stream = self._stream
        if stream is None:
            return
        self._stream = None
        if not stream.complete:
            stream.link.cancel(stream)


def _authority(origin: Origin) -> str:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    return f"{host}:{origin.port}"

