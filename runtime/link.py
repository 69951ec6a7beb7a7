"""The runtime link: many requests over one WebSocket, `GET /link`; gateway.link is its client.

The upgrade carries `Authorization: Bearer <service token>` and offers the subprotocol
`sitekit-link.1`; otherwise it is refused before accept (uvicorn answers HTTP 403). Binary
messages only, one message = one frame:

    stream_id: u32 big-endian | kind: u8 | payload

Client -> runtime
    1 OPEN    head_len: u16 big-endian | head JSON | request body. The head is
              {"method": "POST", "path": "/flows/f1/stream", "headers": [["authorization",
              "Bearer …"], …]} (names lower-case, values latin-1); the request is served as
              that HTTP request would be: same app, auth, validation, errors, SSE, timeout.
    2 CANCEL  empty. The client left: the run is cancelled as on an HTTP disconnect and
              nothing more is sent for the id. Ignored for an id that is not open.
Runtime -> client
    1 HEAD    status: u16 big-endian | headers JSON [[name, value], …]. Once, first.
    2 DATA    response body bytes, never empty, in order (a run's SSE token/end/error).
    3 END     empty. The response is complete; the id is finished.
    4 GOAWAY  stream id 0, empty. The runtime is shutting down: a later OPEN is answered
              HEAD 503 + {"error": {"code": "unavailable", …}} + END, the open streams
              finish, then the link closes with 1001.

Stream ids are the client's: non-zero, increasing, never reused. A text message, a message
shorter than 5 bytes, an unknown kind, an OPEN for id 0 or for an open id, or an OPEN whose
head cannot be read is a protocol error: the link closes with 1002 and a reason naming it.
A link that closes for any reason cancels every run still open on it. There is no flow
control per stream: a client that cannot hold a stream's data CANCELs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from urllib.parse import unquote

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("runtime.link")

SUBPROTOCOL = "sitekit-link.1"
# What runtime.server's WebSocket protocol hands the app on a graceful shutdown.
DRAIN = "sitekit.link.drain"

OPEN, CANCEL = 1, 2
HEAD, DATA, END, GOAWAY = 1, 2, 3, 4

_FRAME = struct.Struct("!IB")
_U16 = struct.Struct("!H")
_OPEN_HEAD = _FRAME.size + _U16.size  # where an OPEN's head JSON starts
_JSON_HEADERS = orjson.dumps([["content-type", "application/json"]])
_UNAVAILABLE = orjson.dumps(
    {"error": {"code": "unavailable", "message": "the runtime is shutting down"}}
)
_INTERNAL_ERROR = orjson.dumps(
    {"error": {"code": "internal_error", "message": "the runtime failed to handle the request"}}
)
# A cancelled RunStream gives its run 5 s to end; past this the link stops waiting.
_CANCEL_WAIT_S = 10.0


class ProtocolError(Exception):
    """A frame the link cannot serve; the message is the close reason (at most 123 bytes)."""


class LinkEndpoint:
    """The raw ASGI endpoint of `/link`; each connection is served by its own Link."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if SUBPROTOCOL not in scope.get("subprotocols", ()):
            await send({"type": "websocket.close", "code": 1002,
                        "reason": f"the subprotocol {SUBPROTOCOL} is required"})
            return
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
        await Link(scope, send).serve(receive)


class Link:
    """One connection: reads frames, runs each OPEN through the app as its own task."""

    def __init__(self, scope: Scope, send: Send) -> None:
        self._app: ASGIApp = scope["app"]
        self._send = send
        self._scope = scope
        self._asgi = {"version": scope["asgi"]["version"], "spec_version": "2.3"}
        self._scheme = "https" if scope["scheme"] == "wss" else "http"
        self._writing = asyncio.Lock()
        self._open = True
        self._draining = False
        self._streams: dict[int, Stream] = {}
        self._closer: asyncio.Task[None] | None = None

    async def serve(self, receive: Receive) -> None:
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    await self._on_frame(message.get("bytes"))
                elif message["type"] == "websocket.disconnect":
                    return
                elif message["type"] == DRAIN and not self._draining:
                    self._draining = True
                    await self.write(0, GOAWAY)
                    self._closer = asyncio.create_task(self._close_when_done())
        except ProtocolError as exc:
            await self._close(1002, str(exc))
        finally:
            await self._end_streams()

    async def write(self, stream_id: int, kind: int, payload: bytes = b"") -> None:
        # Run tasks write concurrently; the lock keeps frames in the order they were sent.
        async with self._writing:
            if not self._open:
                return
            try:
                await self._send({"type": "websocket.send",
                                  "bytes": _FRAME.pack(stream_id, kind) + payload})
            except OSError:  # uvicorn's ClientDisconnected: the receive loop sees it next
                self._open = False

    async def respond_json(self, stream_id: int, status: int, body: bytes) -> None:
        await self.write(stream_id, HEAD, _U16.pack(status) + _JSON_HEADERS)
        await self.write(stream_id, DATA, body)
        await self.write(stream_id, END)

    async def _on_frame(self, data: bytes | None) -> None:
        if data is None:
            raise ProtocolError("text message; frames are binary")
        if len(data) < _FRAME.size:
            raise ProtocolError(f"a frame of {len(data)} bytes; the header is 5")
        stream_id, kind = _FRAME.unpack_from(data)
        if kind == CANCEL:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.cancel()
        elif kind == OPEN:
            if stream_id == 0:
                raise ProtocolError("OPEN for stream 0")
            if stream_id in self._streams:
                raise ProtocolError(f"OPEN for stream {stream_id}, which is open")
            scope, body = self._request(data)
            if self._draining:
                await self.respond_json(stream_id, 503, _UNAVAILABLE)
                return
            stream = Stream(self, stream_id, self._app, scope, body)
            stream.task.add_done_callback(lambda _: self._streams.pop(stream_id, None))
            self._streams[stream_id] = stream
        else:
            raise ProtocolError(f"unknown frame kind {kind}")

    def _request(self, data: bytes) -> tuple[Scope, bytes]:
        """The HTTP scope and the body an OPEN frame carries."""
        if len(data) < _OPEN_HEAD:
            raise ProtocolError("OPEN without a head length")
        end = _OPEN_HEAD + _U16.unpack_from(data, _FRAME.size)[0]
        if end > len(data):
            raise ProtocolError("OPEN head_len is past the end of the frame")
        method, target, headers = _read_head(data[_OPEN_HEAD:end])
        raw_path, _, query = target.partition("?")
        scope: Scope = {
            "type": "http", "asgi": self._asgi, "http_version": "1.1", "method": method,
            "scheme": self._scheme, "path": unquote(raw_path), "raw_path": raw_path.encode(),
            "query_string": query.encode(), "root_path": self._scope["root_path"],
            "headers": headers, "client": self._scope["client"], "server": self._scope["server"],
        }
        if "state" in self._scope:
            scope["state"] = self._scope["state"].copy()
        return scope, data[end:]

    async def _close_when_done(self) -> None:
        """After GOAWAY no stream starts; close once those in flight have ended."""
        running = [stream.task for stream in self._streams.values()]
        if running:
            await asyncio.wait(running)
        await self._close(1001, "the runtime is shutting down")

    async def _close(self, code: int, reason: str) -> None:
        async with self._writing:
            if not self._open:
                return
            self._open = False
            with contextlib.suppress(OSError):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def _end_streams(self) -> None:
        """The link is closed: every run still open on it is cancelled, as on a disconnect."""
        self._open = False
        if self._closer is not None:
            self._closer.cancel()
        streams = list(self._streams.values())
        for stream in streams:
            stream.cancel()
        if streams:
            _, stuck = await asyncio.wait([s.task for s in streams], timeout=_CANCEL_WAIT_S)
            for task in stuck:
                task.cancel()


class Stream:
    """One request on a link, served by the app as if it had come over HTTP."""

    def __init__(
        self, link: Link, stream_id: int, app: ASGIApp, scope: Scope, body: bytes
    ) -> None:
        self._link = link
        self._id = stream_id
        self._body: bytes | None = body
        self._gone = asyncio.Event()
        self._started = False
        self._ended = False
        self.task = asyncio.create_task(self._run(app, scope))

    def cancel(self) -> None:
        self._gone.set()

    async def _run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self._receive, self._send)
        except Exception:
            log.exception("a request on the link failed: %s %s", scope["method"], scope["path"])
        if self._ended or self._gone.is_set():
            return
        # The app failed or returned without finishing. Over HTTP the client would see a
        # 500, or a connection cut mid-body; here the id must still end.
        if self._started:
            await self._link.write(self._id, END)
        else:
            await self._link.respond_json(self._id, 500, _INTERNAL_ERROR)

    async def _receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        if self._ended or self._gone.is_set():
            return
        if message["type"] == "http.response.start":
            self._started = True
            headers = [[name.decode("latin-1"), value.decode("latin-1")]
                       for name, value in message.get("headers", ())]
            head = _U16.pack(message["status"]) + orjson.dumps(headers)
            await self._link.write(self._id, HEAD, head)
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if not message.get("more_body", False):
                self._ended = True
            if body:
                await self._link.write(self._id, DATA, body)
            if self._ended:
                await self._link.write(self._id, END)


def _read_head(head: bytes) -> tuple[str, str, list[tuple[bytes, bytes]]]:
    """An OPEN's method, path and headers (as ASGI has them), or a ProtocolError."""
    try:
        fields = orjson.loads(head)
        method, target, headers = fields["method"], fields["path"], fields["headers"]
        if not (isinstance(method, str) and isinstance(target, str) and target[:1] == "/"
                and isinstance(headers, list)
                and all(isinstance(pair, list) and len(pair) == 2 for pair in headers)):
            raise TypeError(fields)
        raw_headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                       for name, value in headers]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ProtocolError("OPEN head is not {method, path, headers: [[name, value]]}") from exc
    return method, target, raw_headers
