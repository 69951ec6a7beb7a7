"""The gateway's HTTP/1.1 protocol under uvicorn: uvicorn's httptools protocol, with chats, the
hot path, answered without ASGI in between.

A chat request gets a `ChatCycle` instead of uvicorn's request-response cycle. It is the chat's
`Reply` (`gateway.reply`): the body is collected as the parser delivers it, and each response is
written with as few writes as its shape allows: a whole response (an answer, a refusal) is one
write; a stream's head goes out with its first chunk, and its last chunk with the terminator,
so a short answer costs one write instead of three and no ASGI message dicts. Everything
else (the other routes, keep-alive, pipelining, the keep-alive timeout, malformed requests,
graceful shutdown) stays uvicorn's: the cycle offers the attributes uvicorn's protocol and
server use (`response_complete`, `disconnected`, `keep_alive`, `message_event`).

    uvicorn.run(..., http=GatewayHttpProtocol)   # `python -m gateway` does this
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.chat import ChatEndpoint
from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge
from gateway.ids import uuid7
from gateway.metrics import GatewayMetrics
from gateway.observe import Front, chat_agent_id
from gateway.reply import ClientGone
from gateway.responses import JSON, Headers

log = logging.getLogger("sitekit.gateway")

_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's protocol; a POST to /v1/agents/{agent_id}/chat goes to a ChatCycle."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        app = self.app
        # Without the gateway's own app (wrapped by a middleware, say) every route stays ASGI.
        self._front = app if isinstance(app, Front) else None

    def on_headers_complete(self) -> None:
        front = self._front
        endpoint = front.chat_endpoint if front is not None else None
        agent_id = None
        if endpoint is not None and self.parser.get_method() == b"POST":
            path = self.url.split(b"?", 1)[0]
            if b"%" not in path:  # an escaped path is rare here; ASGI unquotes it
                agent_id = chat_agent_id(path.decode("latin-1"))
        if agent_id is None or endpoint is None or front is None or self.parser.should_upgrade():
            super().on_headers_complete()
            return
        cycle = ChatCycle(
            self, endpoint, front.metrics, agent_id, self.headers,
            keep_alive=self.parser.get_http_version() != "1.0"
            and self.parser.should_keep_alive(),
            expect_continue=self.expect_100_continue,
        )
        previous = self.cycle
        self.cycle = cycle  # type: ignore[assignment]
        if previous is None or previous.response_complete:
            self._start_asgi_task(cycle, None)
        else:
            # Pipelined behind an unfinished response: uvicorn starts it when that one ends.
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, None))  # type: ignore[arg-type]

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if not isinstance(cycle, ChatCycle):
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(cycle.run())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if isinstance(cycle, ChatCycle):
            cycle.feed(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if isinstance(cycle, ChatCycle):
            cycle.body_complete()
        else:
            super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if isinstance(cycle, ChatCycle):
            cycle.lost()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Bytes that are not HTTP/1.1 get the contract's error, with a request id, and the
        connection closes (what follows cannot be told apart from the next request)."""
        request_id = uuid7()
        body = InvalidRequest(f"malformed HTTP request: {msg}").body(request_id)
        parts = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (b"content-type: application/json\r\n", b"x-request-id: ",
                  request_id.encode(), b"\r\ncontent-length: %d\r\n" % len(body),
                  b"connection: close\r\n\r\n", body)
        self.transport.write(b"".join(parts))
        self.transport.close()


class ChatCycle:
    """One chat request on a connection, and the Reply its answer is written to."""

    __slots__ = (
        "protocol", "endpoint", "metrics", "agent_id", "headers", "keep_alive",
        "expect_continue", "parts", "size", "more_body", "response_complete", "disconnected",
        "gone", "_waiter", "_head", "_watched",
    )

    def __init__(
        self, protocol: GatewayHttpProtocol, endpoint: ChatEndpoint, metrics: GatewayMetrics,
        agent_id: str, headers: list[tuple[bytes, bytes]], *, keep_alive: bool,
        expect_continue: bool,
    ) -> None:
        self.protocol = protocol
        self.endpoint = endpoint
        self.metrics = metrics
        self.agent_id = agent_id
        self.headers = headers
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.parts: list[bytes] = []
        self.size = 0
        self.more_body = True
        self.response_complete = False
        self.disconnected = False
        self.gone = False
        self._waiter: asyncio.Future[None] | None = None
        self._head: bytes | None = None  # a stream's head, written with its first chunk
        self._watched: asyncio.Task[Any] | None = None

    @property
    def message_event(self) -> ChatCycle:
        """What uvicorn's protocol calls `.set()` on. A property, not an attribute holding
        `self`: that reference cycle would leave every chat's cycle, its headers and body for
        the garbage collector instead of freeing them when the request ends."""
        return self

    # --- fed by the protocol --------------------------------------------------------------

    def feed(self, body: bytes) -> None:
        if self.response_complete:
            return
        self.parts.append(body)
        self.size += len(body)
        if self.size > HIGH_WATER_LIMIT:
            self.protocol.flow.pause_reading()
        self.set()

    def body_complete(self) -> None:
        self.more_body = False
        self.set()

    def lost(self) -> None:
        if self.response_complete:
            return
        self.disconnected = True
        task = self._watched
        if task is not None:
            self.gone = True
            task.cancel()
        self.set()

    def set(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the request's task ---------------------------------------------------------------

    async def run(self) -> None:
        request_id = uuid7()
        started = time.perf_counter()
        status = 500
        try:
            status = await self.endpoint.handle(self.headers, self.agent_id, request_id, self)
        except Exception:
            log.exception("the chat %s failed", request_id)
            if self._head is None and not self.response_complete and not self.disconnected:
                self.keep_alive = False
                error = GatewayError("the gateway failed to answer")
                await self.whole(500, error.body(request_id), [
                    (b"x-request-id", request_id.encode())])
            else:
                self.protocol.transport.close()
        finally:
            self.metrics.record_request("chat", status, time.perf_counter() - started)

    # --- Reply ----------------------------------------------------------------------------

    async def body(self, max_bytes: int) -> bytes:
        while True:
            if self.size > max_bytes:
                self.keep_alive = False  # the rest of the body is not worth reading
                raise PayloadTooLarge(f"the body is larger than {max_bytes} bytes")
            if not self.more_body:
                parts = self.parts
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self.disconnected:
                raise InvalidRequest("the client went away before sending the body")
            protocol = self.protocol
            if self.expect_continue:
                self.expect_continue = False
                protocol.transport.write(_CONTINUE)
            protocol.flow.resume_reading()
            waiter = self._waiter = protocol.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def start(self, status: int, headers: Headers) -> None:
        self._head = self._encode_head(status, headers, None)

    async def more(self, body: bytes) -> None:
        flow = self.protocol.flow
        if flow.write_paused and not self.disconnected:
            await flow.drain()
        if self.disconnected:
            raise ClientGone()
        head, self._head = self._head, None
        if body or head is not None:
            self.protocol.transport.write(_chunked(head, body, last=False))

    async def last(self, body: bytes) -> None:
        if self.disconnected:
            raise ClientGone()
        head, self._head = self._head, None
        self._finish(_chunked(head, body, last=True))

    async def whole(
        self, status: int, body: bytes, headers: Headers, content_type: bytes = JSON
    ) -> None:
        if self.disconnected or self.response_complete:
            return
        self._finish(self._encode_head(
            status, [(b"content-type", content_type), *headers], len(body)) + body)

    def watch(self) -> None:
        if self.disconnected:  # it went away before anything was watching
            self.gone = True
            raise ClientGone()
        self._watched = asyncio.current_task()

    def unwatch(self) -> None:
        self._watched = None

    # --- internals ------------------------------------------------------------------------

    def _encode_head(self, status: int, headers: Headers, length: int | None) -> bytes:
        if self.expect_continue or self.more_body:
            # Answered before the body arrived (a refusal): the rest of it cannot be told apart
            # from the next request without reading it, so the connection ends with this answer.
            self.keep_alive = False
        parts = [STATUS_LINE[status]]
        lines = 3
        for name, value in (*self.protocol.server_state.default_headers, *headers):
            parts += (name, b": ", value, b"\r\n")
            lines += 1
        parts.append(b"transfer-encoding: chunked\r\n" if length is None
                     else b"content-length: %d\r\n" % length)
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
            lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        # Every line ends in one CRLF; any other CR or LF came from a header and would split it.
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("a response header name or value holds CR or LF")
        return head

    def _finish(self, data: bytes) -> None:
        protocol = self.protocol
        self.response_complete = True
        protocol.transport.write(data)
        if not self.keep_alive:
            protocol.transport.close()
        protocol.on_response_complete()


def _chunked(head: bytes | None, body: bytes, *, last: bool) -> bytes:
    """One write: the response head if still unsent, `body` as a chunk (none if empty: an empty
    chunk would end the body), and the terminator if `last`."""
    parts = [head] if head is not None else []
    if body:
        parts += (b"%x\r\n" % len(body), body, b"\r\n")
    if last:
        parts.append(_LAST_CHUNK)
    return b"".join(parts)
