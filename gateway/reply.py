"""How a chat's answer reaches its client, whichever server carries it.

The chat path writes to a `Reply`: `start` a response, send `more` of its body, end it with
`last`, or send it `whole`. `watch()` arms disconnect detection: from then on a client that goes
away cancels the task answering it, and `gone` says so. Two implementations:

- `AsgiReply`, over ASGI's receive and send, for any ASGI server;
- the gateway's own HTTP protocol (`gateway.http`), which writes each response with as few
  writes as its shape allows (head and body together, the last chunk with its terminator).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge
from gateway.responses import JSON, Headers, Receive, Send, send_body


class ClientGone(Exception):
    """The client disconnected; whatever it was still to receive is abandoned."""


class Reply(Protocol):
    @property
    def gone(self) -> bool:
        """The client went away while watched (its task was cancelled for it)."""

    async def body(self, max_bytes: int) -> bytes:
        """The whole request body; PayloadTooLarge beyond `max_bytes`."""

    async def start(self, status: int, headers: Headers) -> None:
        """Begin a response whose body follows in `more` and `last` (chunked)."""

    async def more(self, body: bytes) -> None:
        """Part of the body, sent now; ClientGone if the client went away."""

    async def last(self, body: bytes) -> None:
        """The end of the body; ClientGone if the client went away."""

    async def whole(
        self, status: int, body: bytes, headers: Headers, content_type: bytes = JSON
    ) -> None:
        """A response of known length, in one go."""

    def watch(self) -> None:
        """From now on, a disconnect cancels the current task; ClientGone if the client is
        known to have gone already."""

    def unwatch(self) -> None:
        """Stop watching (before the last write: servers report a finished response as a
        disconnect too)."""


async def reply_error(reply: Reply, exc: GatewayError, request_id: str, headers: Headers) -> None:
    await reply.whole(exc.status, exc.body(request_id), [*exc.headers, *headers])


# A task per chat that waits on `receive()` costs an ASGI chat about a quarter of its CPU, so the
# watcher starts only for an answer still running after this long: quick answers never pay it,
# and a client that leaves a slow run cancels it this much later at most.
WATCH_AFTER_S = 0.05


class AsgiReply:
    """A Reply over ASGI. Watching starts a task that waits for `http.disconnect` (ASGI says
    nothing of a disconnect otherwise), `WATCH_AFTER_S` after `watch()` until `unwatch()`."""

    __slots__ = ("_arming", "_receive", "_send", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._task: asyncio.Task[object] | None = None
        self._arming: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.gone = False

    async def body(self, max_bytes: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                raise InvalidRequest("the client went away before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"the body is larger than {max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def start(self, status: int, headers: Headers) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def more(self, body: bytes) -> None:
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
        except OSError as exc:  # the ASGI server's word for a client that went away
            raise ClientGone() from exc

    async def last(self, body: bytes) -> None:
        try:
            await self._send({"type": "http.response.body", "body": body})
        except OSError as exc:
            raise ClientGone() from exc

    async def whole(
        self, status: int, body: bytes, headers: Headers, content_type: bytes = JSON
    ) -> None:
        await send_body(self._send, status, body, headers, content_type)

    def watch(self) -> None:
        if self._watcher is None and self._arming is None:
            self._task = asyncio.current_task()
            self._arming = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._arm)

    def unwatch(self) -> None:
        if self._arming is not None:
            self._arming.cancel()
            self._arming = None
        if self._watcher is not None:
            self._watcher.cancel()

    def _arm(self) -> None:
        self._arming = None
        self._watcher = asyncio.create_task(self._wait())

    async def _wait(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                assert self._task is not None
                self._task.cancel()
                return
