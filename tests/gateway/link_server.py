"""A runtime-link server scripted by the test, on `websockets`' own server: each OPEN reaches
the test as an `Opened` it answers frame by frame."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gateway.link_conn import CANCEL, DATA, END, GOAWAY, HEAD, OPEN

TOKEN = b"Bearer link-test-token"
WAIT = 5.0  # upper bound on waiting for a server-side event, so a broken client fails, not hangs
_FRAME = struct.Struct(">IB")


def frame(stream_id: int, kind: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(stream_id, kind) + payload


@dataclass
class Opened:
    ws: ServerConnection
    stream_id: int
    head: dict[str, Any]
    body: bytes

    async def send_head(self, status: int = 200) -> None:
        headers = orjson.dumps([["content-type", "text/event-stream; charset=utf-8"]])
        await self.ws.send(frame(self.stream_id, HEAD, struct.pack(">H", status) + headers))

    async def send_data(self, data: bytes) -> None:
        await self.ws.send(frame(self.stream_id, DATA, data))

    async def send_end(self) -> None:
        await self.ws.send(frame(self.stream_id, END))

    async def answer(self, *chunks: bytes, status: int = 200) -> None:
        await self.send_head(status)
        for chunk in chunks:
            await self.send_data(chunk)
        await self.send_end()


class LinkServer:
    def __init__(
        self, *, subprotocol: str | None = "sitekit-link.1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._ssl_context = ssl_context
        self.opens: asyncio.Queue[Opened] = asyncio.Queue()
        self.cancels: asyncio.Queue[tuple[int, int]] = asyncio.Queue()  # (connection, stream)
        self.connections: list[ServerConnection] = []
        self.refuse = False
        self.hold: asyncio.Event | None = None  # when set, upgrades wait for it
        self.upgrading = asyncio.Event()  # an upgrade request came in
        self._subprotocol = subprotocol
        self._server: Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await serve(
            self._serve, "127.0.0.1", 0, process_request=self._check, ssl=self._ssl_context,
            subprotocols=[self._subprotocol] if self._subprotocol else None,  # type: ignore[list-item]
            select_subprotocol=None if self._subprotocol else (lambda *_: None),
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def target(self, flow: str = "f1") -> tuple[str, int, str]:
        return ("127.0.0.1", self.port, f"/flows/{flow}/stream")

    async def next_open(self) -> Opened:
        return await asyncio.wait_for(self.opens.get(), WAIT)

    async def next_cancel(self) -> tuple[int, int]:
        return await asyncio.wait_for(self.cancels.get(), WAIT)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        self.upgrading.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.refuse or request.headers.get("authorization") != TOKEN.decode():
            return connection.respond(HTTPStatus.FORBIDDEN, "a valid service token is required\n")
        return None

    async def _serve(self, ws: ServerConnection) -> None:
        index = len(self.connections)
        self.connections.append(ws)
        with contextlib.suppress(ConnectionClosed):
            await self._read(ws, index)

    async def _read(self, ws: ServerConnection, index: int) -> None:
        async for message in ws:
            assert isinstance(message, bytes)
            stream_id, kind = _FRAME.unpack_from(message)
            if kind == OPEN:
                (size,) = struct.unpack_from(">H", message, _FRAME.size)
                start = _FRAME.size + 2
                head = orjson.loads(message[start:start + size])
                await self.opens.put(Opened(ws, stream_id, head, message[start + size:]))
            elif kind == CANCEL:
                await self.cancels.put((index, stream_id))


async def goaway(ws: ServerConnection) -> None:
    await ws.send(frame(0, GOAWAY))
