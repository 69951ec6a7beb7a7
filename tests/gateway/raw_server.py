"""A raw asyncio HTTP server scripted byte by byte, for the upstream client's edge cases."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

WAIT = 5.0  # upper bound on waiting for a server-side event, so a broken client fails, not hangs


class RawServer:
    """A loopback server that runs `handler` on each connection; the test scripts every byte."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.eofs = 0  # connections the client closed
        self.eof_seen = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.partition(b":")[2])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def wait_eof(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        self.eofs += 1
        self.eof_seen.set()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            await self.handler(reader, writer)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self._writers.discard(writer)


ServeRaw = Callable[[Handler], Awaitable[RawServer]]


def answer(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def keep_answering(server_box: list[RawServer], body: bytes = b"ok") -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server_box[0].read_request(reader) is not None:
            writer.write(answer(body))
    return handler


async def keep_alive_server(serve: ServeRaw, body: bytes = b"ok") -> RawServer:
    box: list[RawServer] = []
    server = await serve(keep_answering(box, body))
    box.append(server)
    return server


def keepalive_timers(server_port: int) -> list[float | None]:
    """For each established TCP connection to `server_port` on this machine (read from
    /proc/net/tcp, as the kernel keeps it): seconds until its keepalive probe, None if the
    kernel has no keepalive timer on it."""
    found: list[float | None] = []
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rpartition(":")[2], 16)
            if remote_port != server_port or fields[3] != "01":  # 01: ESTABLISHED
                continue
            timer, _, when = fields[5].partition(":")
            found.append(int(when, 16) / os.sysconf("SC_CLK_TCK") if timer == "02" else None)
    return found
