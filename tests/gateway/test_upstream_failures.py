"""The upstream client's failures (refused, timeouts, drops, bad heads, bad requests), TLS,
and the real thing: uvicorn serving a Starlette app."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from devstack.procs import free_port
from gateway.sse import encode_event
from gateway.upstream import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamSettings,
    UpstreamTimeout,
)
from tests.gateway.raw_server import (
    WAIT,
    RawServer,
    ServeRaw,
    chunk,
    keep_answering,
)

# --- failures --------------------------------------------------------------------------------


async def test_refused_connection(pool: UpstreamPool) -> None:
    with pytest.raises(UpstreamConnectError) as caught:
        await pool.request("GET", f"http://127.0.0.1:{free_port()}/")
    assert isinstance(caught.value.__cause__, OSError)


async def test_connect_timeout() -> None:
    # A listener whose accept queue is full drops further SYNs, so connecting hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    pool = UpstreamPool(UpstreamSettings(connect_timeout_s=0.3))
    try:
        with pytest.raises(UpstreamTimeout):
            await pool.request("GET", f"http://127.0.0.1:{listener.getsockname()[1]}/")
    finally:
        for sock in [listener, *fillers]:
            sock.close()


async def test_server_that_never_answers_times_out(serve: ServeRaw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await server.wait_eof(reader)
    server = await serve(handler)
    pool = UpstreamPool(UpstreamSettings(first_byte_timeout_s=0.2))
    with pytest.raises(UpstreamTimeout):
        await pool.request("POST", server.url(), [], b"{}")
    async with asyncio.timeout(WAIT):
        await server.eof_seen.wait()  # and the connection is closed, not pooled


async def test_server_that_stalls_mid_body_times_out(serve: ServeRaw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await server.wait_eof(reader)
    server = await serve(handler)
    pool = UpstreamPool(UpstreamSettings(read_timeout_s=0.2))
    response = await pool.request("GET", server.url())
    with pytest.raises(UpstreamTimeout):
        await response.read()


@pytest.mark.parametrize("head, sent", [
    (b"content-length: 100\r\n\r\n", b"only part"),
    (b"transfer-encoding: chunked\r\n\r\n", chunk(b"only part")),
])
async def test_server_drops_mid_body(
    serve: ServeRaw, pool: UpstreamPool, head: bytes, sent: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + sent)
    server = await serve(handler)
    response = await pool.request("GET", server.url())
    body = response.iter_raw()
    assert await anext(body) == b"only part"
    with pytest.raises(UpstreamClosed):
        await anext(body)


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n",  # whole, in one piece
    b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000,  # and one that never ends
])
async def test_large_response_head_is_rejected(serve: ServeRaw, reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(reply)
        await server.wait_eof(reader)
    server = await serve(handler)
    pool = UpstreamPool(UpstreamSettings(max_header_bytes=16 * 1024, first_byte_timeout_s=WAIT))
    with pytest.raises(UpstreamProtocolError):
        await pool.request("GET", server.url())


async def test_garbage_is_a_protocol_error(serve: ServeRaw, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
    server = await serve(handler)
    with pytest.raises(UpstreamProtocolError) as caught:
        await pool.request("GET", server.url())
    assert caught.value.__cause__ is not None


def test_errors_form_one_tree() -> None:
    for error in (UpstreamConnectError, UpstreamTimeout, UpstreamClosed, UpstreamProtocolError):
        assert issubclass(error, UpstreamError)


@pytest.mark.parametrize("headers, target", [
    ([(b"x-evil", b"1\r\nx-injected: 2")], "http://127.0.0.1:1/"),
    ([(b"x-evil\n", b"1")], "http://127.0.0.1:1/"),
    ([(b"Host", b"elsewhere")], "http://127.0.0.1:1/"),
    ([(b"Content-Length", b"0")], "http://127.0.0.1:1/"),
    ([], "ftp://127.0.0.1:1/"),
    ([], "http://127.0.0.1:1/a b"),
])
async def test_bad_requests_are_refused_before_sending(
    pool: UpstreamPool, headers: list[tuple[bytes, bytes]], target: str
) -> None:
    with pytest.raises(ValueError):
        await pool.request("GET", target, headers)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="read_timeout_s"):
        UpstreamSettings(read_timeout_s=0)


# --- TLS ---------------------------------------------------------------------------------------


async def test_https(tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls_pair
    box: list[RawServer] = []
    server = RawServer(keep_answering(box, b"secret"))
    box.append(server)
    await server.start(server_context)
    try:
        pool = UpstreamPool(ssl_context=client_context)
        for _ in range(2):
            assert await (await pool.request("GET", server.url(scheme="https"))).read() == b"secret"
        assert server.connections == 1
        await pool.aclose()
        untrusting = UpstreamPool()  # the system's CAs: our self-signed certificate fails
        with pytest.raises(UpstreamConnectError):
            await untrusting.request("GET", server.url(scheme="https"))
    finally:
        await server.stop()


# --- uvicorn and Starlette -------------------------------------------------------------------


class Gate:
    """Hands the streaming endpoint one token at a time and records how its stream ended."""

    def __init__(self) -> None:
        self.tokens: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.ended = asyncio.Event()
        self.completed = False


def runtime_like_app(gate: Gate) -> Starlette:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hello")

    async def echo(request: Request) -> Response:
        return Response(await request.body(), headers={"x-seen": request.headers["x-token"]})

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            try:
                while (token := await gate.tokens.get()) is not None:
                    yield encode_event(b"token", token)
                yield encode_event(b"end", b"{}")
                gate.completed = True
            finally:
                gate.ended.set()
        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[
        Route("/hello", hello), Route("/echo", echo, methods=["POST"]),
        Route("/flows/f/stream", stream, methods=["POST"]),
    ])


class _InProcessServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # leave the test process's signal handlers alone


@pytest.fixture
async def runtime_app() -> AsyncIterator[tuple[str, Gate]]:
    gate = Gate()
    port = free_port()
    server = _InProcessServer(uvicorn.Config(
        runtime_like_app(gate), host="127.0.0.1", port=port, http="httptools",
        lifespan="off", log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(WAIT):
        while not server.started:
            await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}", gate
    server.should_exit = True
    await task


async def test_uvicorn_plain_and_echo(
    runtime_app: tuple[str, Gate], pool: UpstreamPool
) -> None:
    base, _ = runtime_app
    hello = await pool.request("GET", base + "/hello")
    assert (hello.status, await hello.read()) == (200, b"hello")
    echoed = await pool.request("POST", base + "/echo", [(b"x-token", b"abc")], b"payload")
    assert (b"x-seen", b"abc") in echoed.headers
    assert await echoed.read() == b"payload"


async def test_uvicorn_sse_streams_token_by_token(
    runtime_app: tuple[str, Gate], pool: UpstreamPool
) -> None:
    base, gate = runtime_app
    response = await pool.request("POST", base + "/flows/f/stream", [], b"{}")
    assert response.status == 200
    body = response.iter_raw()
    for token in (b"a", b"b", b"c"):
        gate.tokens.put_nowait(token)
        assert await anext(body) == encode_event(b"token", token)
    gate.tokens.put_nowait(None)
    assert b"".join([part async for part in body]) == encode_event(b"end", b"{}")
    assert gate.completed


async def test_uvicorn_sees_the_disconnect_and_cancels_the_stream(
    runtime_app: tuple[str, Gate], pool: UpstreamPool
) -> None:
    base, gate = runtime_app
    response: UpstreamResponse = await pool.request("POST", base + "/flows/f/stream", [], b"{}")
    gate.tokens.put_nowait(b"a")
    assert await anext(response.iter_raw()) == encode_event(b"token", b"a")
    await response.aclose()
    async with asyncio.timeout(WAIT):
        await gate.ended.wait()
    assert not gate.completed
