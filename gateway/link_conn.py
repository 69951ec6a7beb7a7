"""One runtime link: a WebSocket (RFC 6455) carrying numbered runs (frames: runtime/link.py).

The WebSocket framing is written here rather than taken from `websockets`' sans-I/O protocol,
which cost about 30 µs of CPU and 35 µs of latency per run more than an HTTP/1.1 request
(measured: its generator-based parser reads each frame in several steps). What the gateway
needs is small: the runtime's frames are never masked and no extension is agreed, so a frame
is two bytes, a length and the payload; the gateway's own are masked with keys from a
pre-drawn random pool. The handshake's response head is read by httptools, as the HTTP/1.1
client reads its answers, and its keys come from `websockets.utils`.

It knows nothing of pools or settings beyond its limits: it records what happened (`error`,
`lost`, `lost_exc`) and `gateway.link` turns that into an `UpstreamError` for the caller.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Callable
from typing import cast

import httptools
import orjson
from websockets.utils import accept_key, generate_key

try:
    from websockets.speedups import apply_mask
except ImportError:  # a platform without websockets' C extension
    from websockets.utils import apply_mask

from gateway.upstream import UpstreamConnectError, UpstreamProtocolError
from gateway.upstream_conn import Headers, Origin, joined, wait_until, wake

SUBPROTOCOL = b"sitekit-link.1"
LINK_PATH = b"/link"

OPEN, CANCEL = 1, 2  # gateway -> runtime
HEAD, DATA, END, GOAWAY = 1, 2, 3, 4  # runtime -> gateway
_FRAME = struct.Struct(">IB")
_OPEN_HEAD = struct.Struct(">IBH")
_STATUS = struct.Struct(">H")
MAX_STREAM_ID = 2**32 - 1

_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_HANDSHAKE_BYTES = 16 * 1024
_MASKS_AT_ONCE = 1024


class LinkRefused(UpstreamConnectError):
    """The runtime answered the upgrade to the link with something else than the link."""

    # What a server that does not serve the link at all answers: no such path or method, no
    # upgrades there, or not implemented (an older runtime, or a proxy that does not upgrade).
    NOT_SERVED = frozenset({400, 404, 405, 426, 501})

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def not_served(self) -> bool:
        return self.status in self.NOT_SERVED


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
        """All body bytes received and not yet taken (b"" if none)."""
        self.buffered = 0
        return joined(self.chunks)

    async def wait(self, deadline: float) -> bool:
        """Wait until something arrives or the stream ends; False if `deadline` came first."""
        return await wait_until(self.link.loop, self, deadline)


class _HandshakeHead:
    """httptools' callbacks for the answer to the upgrade request."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.done = True


class LinkConnection(asyncio.Protocol):
    """One WebSocket to the runtime carrying numbered runs."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, origin: Origin, authority: bytes,
        authorization: bytes, *, buffer_limit: int, max_message_bytes: int,
        settled: Callable[[LinkConnection], None] | None = None,
    ) -> None:
        self.loop = loop
        self.origin = origin
        self._authority = authority
        self.buffer_limit = buffer_limit
        self.max_message_bytes = max_message_bytes
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.streams: dict[int, LinkStream] = {}
        self.next_id = 1
        self.draining = False
        self.closing = False
        self.lost = False
        self.lost_exc: Exception | None = None
        self.idle_since = time.monotonic()
        self.listed = False  # in its pool's stack of links with room for a run
        self._on_settled = settled  # called each time one of its runs ends or is cancelled
        self._key = generate_key()
        self._authorization = authorization
        self._handshake: _HandshakeHead | None = _HandshakeHead()
        self._parser = httptools.HttpResponseParser(self._handshake)
        self._head_seen = 0
        self._rest = b""
        self._partial: list[bytes] = []
        self._close_sent = False
        self._masks = b""
        self._mask_at = 0

    # --- used by the pool ---------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.ready.done() and not self.lost and not self.draining \
            and not self.closing and self.next_id < MAX_STREAM_ID

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
        self._send(_BINARY, _OPEN_HEAD.pack(stream_id, OPEN, len(head)) + head + body)
        return stream

    def cancel(self, stream: LinkStream) -> None:
        """The caller no longer wants the answer; the runtime cancels the run."""
        if self.streams.pop(stream.stream_id, None) is not None:
            self._send(_BINARY, _FRAME.pack(stream.stream_id, CANCEL))
            self._settled()

    def close(self, code: int = 1000, reason: bytes = b"") -> None:
        self.closing = True
        if self.transport is not None and not self.lost:
            if self.ready.done() and not self._close_sent:
                self._send(_CLOSE, _STATUS.pack(code) + reason[:123])
                self._close_sent = True
            self.transport.close()

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(
            b"GET %s HTTP/1.1\r\nhost: %s\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: %s\r\nsec-websocket-version: 13\r\n"
            b"sec-websocket-protocol: %s\r\nauthorization: %s\r\n\r\n" % (
                LINK_PATH, self._authority, self._key.encode(), SUBPROTOCOL,
                self._authorization))

    def data_received(self, data: bytes) -> None:
        if self._handshake is not None:
            data = self._answer_to_upgrade(data)
            if not data:
                return
        self._frames(self._rest + data if self._rest else data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc)

    # --- the handshake ------------------------------------------------------------------

    def _answer_to_upgrade(self, data: bytes) -> bytes:
        """Feed the answer to the upgrade; what follows its head (frames), once it is whole."""
        head = self._handshake
        assert head is not None
        self._head_seen += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[cast(int, upgrade.args[0]):]
        except httptools.HttpParserError as exc:
            self._refused(f"its answer is not HTTP: {exc}")
            return b""
        else:
            rest = b""
        if not head.done:
            if self._head_seen > _MAX_HANDSHAKE_BYTES:
                self._refused(f"its answer's head exceeds {_MAX_HANDSHAKE_BYTES} bytes")
            return b""
        status, headers = self._parser.get_status_code(), head.headers
        self._handshake = None
        if status != 101:
            self._refused(f"HTTP {status}", status)
        elif headers.get(b"upgrade", b"").lower() != b"websocket":
            self._refused("no Upgrade: websocket in its answer")
        elif headers.get(b"sec-websocket-accept") != accept_key(self._key).encode():
            self._refused("a wrong Sec-WebSocket-Accept")
        elif headers.get(b"sec-websocket-protocol") != SUBPROTOCOL:
            self._refused(f"the runtime did not accept {SUBPROTOCOL.decode()}")
        else:
            self.ready.set_result(None)
            return rest
        return b""

    def _refused(self, why: str, status: int | None = None) -> None:
        self._handshake = None
        self.ready.set_exception(LinkRefused(f"{self.origin} refused the runtime link ({why})",
                                             status))
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    # --- WebSocket frames (RFC 6455 section 5) ------------------------------------------

    def _frames(self, data: bytes) -> None:
        at, size = 0, len(data)
        while size - at >= 2 and not self.lost:
            first, second = data[at], data[at + 1]
            if second & 0x80 or first & 0x70:
                self._violation("a masked frame or one with reserved bits set")
                return
            length, start = second & 0x7F, at + 2
            if length == 126:
                if size - at < 4:
                    break
                length, start = int.from_bytes(data[at + 2:at + 4]), at + 4
            elif length == 127:
                if size - at < 10:
                    break
                length, start = int.from_bytes(data[at + 2:at + 10]), at + 10
            if length > self.max_message_bytes:
                self._violation(f"a frame of {length} bytes")
                return
            end = start + length
            if end > size:
                break
            self._message(first & 0x80, first & 0x0F, data[start:end])
            at = end
        self._rest = data[at:] if at < size else b""

    def _message(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == _BINARY and fin and not self._partial:
            self._link_frame(payload)
        elif opcode in (_BINARY, _CONT) and (opcode == _CONT) == bool(self._partial):
            self._partial.append(payload)
            if fin:
                payload = b"".join(self._partial)
                self._partial.clear()
                self._link_frame(payload)
        elif opcode == _PING and fin:
            self._send(_PONG, payload)
        elif opcode == _PONG and fin:
            pass
        elif opcode == _CLOSE and fin:
            if not self._close_sent:
                self._send(_CLOSE, payload[:2])  # echo the code, as the RFC asks
                self._close_sent = True
            self._lose(None)  # the runtime closed the link: its runs end here
        elif opcode == _TEXT:
            self._violation("the runtime sent a text message")
        else:
            self._violation(f"a WebSocket frame with opcode {opcode} out of place")

    def _send(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or self.lost or self._close_sent:
            return  # closing: the run's wait ends when the connection does
        size = len(payload)
        if size < 126:
            head = bytes((0x80 | opcode, 0x80 | size))
        elif size < 65536:
            head = bytes((0x80 | opcode, 0xFE)) + size.to_bytes(2)
        else:
            head = bytes((0x80 | opcode, 0xFF)) + size.to_bytes(8)
        mask = self._mask()
        transport.write(head + mask + apply_mask(payload, mask))

    def _mask(self) -> bytes:
        """A masking key (RFC 6455 section 5.3); one random draw serves a thousand frames."""
        at = self._mask_at
        if at >= len(self._masks):
            self._masks, at = os.urandom(4 * _MASKS_AT_ONCE), 0
        self._mask_at = at + 4
        return self._masks[at:at + 4]

    # --- link frames --------------------------------------------------------------------

    def _link_frame(self, data: bytes) -> None:
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
        if kind == DATA and stream.headers_done:
            stream.chunks.append(data[_FRAME.size:])
            stream.buffered += len(data) - _FRAME.size
            if stream.buffered > self.buffer_limit:
                stream.error = UpstreamProtocolError(
                    f"{self.origin}: the answer outgrew {self.buffer_limit} bytes unread")
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
            if self.streams.pop(stream_id, None) is not None:
                self._settled()
        else:
            stream.error = UpstreamProtocolError(
                f"{self.origin} sent frame kind {kind} out of order")
            self.cancel(stream)
        wake(stream)

    # --- internals ----------------------------------------------------------------------

    def _violation(self, what: str) -> None:
        error = UpstreamProtocolError(f"{self.origin} broke the runtime link: {what}")
        for stream in self.streams.values():
            stream.error = error
        self.close(1002, f"{what}, which sitekit-link.1 does not allow".encode()[:123])
        self._lose(error)

    def _settled(self) -> None:
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.draining:
                self.close()
        if self._on_settled is not None:
            self._on_settled(self)

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
            wake(stream)
        if self.transport is not None:
            self.transport.close()
