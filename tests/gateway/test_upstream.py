"""The upstream client against real servers on loopback: raw asyncio servers scripted byte by byte
for the edge cases, uvicorn serving a Starlette app for the real thing."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

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


@pytest.fixture
async def serve() -> AsyncIterator[ServeRaw]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(UpstreamSettings(
        connect_timeout_s=WAIT, first_byte_timeout_s=WAIT, read_timeout_s=WAIT))
    yield pool
    await pool.aclose()


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


# --- bodies and streaming -------------------------------------------------------------------


async def test_content_length_body_and_request_bytes(serve: ServeRaw, pool: UpstreamPool) -> None:
    server = await keep_alive_server(serve, b"hello")
    response = await pool.request(
        "POST", server.url("/flows/f/stream?x=1"), [(b"X-Token", b"t1")], b"{}")
    assert response.status == 200
    assert (b"content-length", b"5") in response.headers
    assert await response.read() == b"hello"
    assert server.requests == [
        b"POST /flows/f/stream?x=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nX-Token: t1\r\n"
        b"content-length: 2\r\n\r\n{}" % server.port
    ]
    get = await pool.request("GET", ("127.0.0.1", server.port, "/h"))
    assert await get.read() == b"hello"
    assert server.requests[1] == b"GET /h HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n\r\n" % server.port


async def test_chunked_body_is_decoded(serve: ServeRaw, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunk(b"abc") + chunk(b"x" * 5000) + b"0\r\n\r\n")
    server = await serve(handler)
    response = await pool.request("GET", server.url())
    assert (b"transfer-encoding", b"chunked") in response.headers
    assert await response.read() == b"abc" + b"x" * 5000


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_body_arrives_as_sent_not_when_complete(
    serve: ServeRaw, pool: UpstreamPool, framing: str
) -> None:
    client_got_first = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"one"))
            await client_got_first.wait()  # the rest only once the client has the first part
            writer.write(chunk(b"two") + b"0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\none")
            await client_got_first.wait()
            writer.write(b"two")
    server = await serve(handler)
    response = await pool.request("GET", server.url())
    body = response.iter_raw()
    assert await anext(body) == b"one"  # a buffering client times out here instead
    client_got_first.set()
    assert await anext(body) == b"two"
    with pytest.raises(StopAsyncIteration):
        await anext(body)


async def test_slow_consumer_pauses_reading_and_bounds_the_buffer(serve: ServeRaw) -> None:
    total = 48 * 1024 * 1024  # well past the kernel's socket buffers on loopback

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        piece = b"x" * 65536
        for _ in range(total // len(piece)):
            writer.write(piece)
            await writer.drain()
    server = await serve(handler)
    limit = 32 * 1024
    pool = UpstreamPool(UpstreamSettings(buffer_limit_bytes=limit, read_timeout_s=WAIT))
    response = await pool.request("GET", server.url())
    conn = response._conn
    assert conn is not None
    bound = limit + 256 * 1024  # one socket read past the limit at most (uvloop reads 256 kB)
    async with asyncio.timeout(WAIT):
        while not conn.paused:  # the consumer takes nothing: the client must stop reading
            await asyncio.sleep(0.01)
    assert conn.transport is not None and not conn.transport.is_reading()
    for _ in range(20):  # the upstream keeps sending meanwhile; none of it may pile up here
        await asyncio.sleep(0.01)
        assert conn.buffered <= bound
    received, largest = 0, 0
    async for part in response.iter_raw():
        received += len(part)
        largest = max(largest, len(part))
        await asyncio.sleep(0)  # still slower than the upstream
    assert received == total
    assert largest <= bound
    await pool.aclose()


async def test_body_until_close_and_head_and_no_content(
    serve: ServeRaw, pool: UpstreamPool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await server.read_request(reader)
        assert request is not None
        if request.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n")
            await server.wait_eof(reader)
        elif request.startswith(b"DELETE"):
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
    server = await serve(handler)
    assert await (await pool.request("GET", server.url())).read() == b"until the end"
    head = await pool.request("HEAD", server.url())
    assert (head.status, await head.read()) == (200, b"")
    async with asyncio.timeout(WAIT):
        await server.eof_seen.wait()  # a HEAD answer's connection is not kept
    deleted = await pool.request("DELETE", server.url())
    assert (deleted.status, await deleted.read()) == (204, b"")


async def test_informational_answer_is_skipped(serve: ServeRaw, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + answer(b"final"))
    server = await serve(handler)
    response = await pool.request("GET", server.url())
    assert response.status == 200
    assert all(name != b"link" for name, _ in response.headers)
    assert await response.read() == b"final"


# --- connection reuse and closing ----------------------------------------------------------


async def test_keep_alive_reuses_one_connection(serve: ServeRaw, pool: UpstreamPool) -> None:
    server = await keep_alive_server(serve)
    for _ in range(5):
        response = await pool.request("GET", server.url())
        assert await response.read() == b"ok"
        await response.aclose()
    assert (server.connections, len(server.requests)) == (1, 5)


async def test_concurrent_requests_each_get_a_connection_then_reuse_them(
    serve: ServeRaw, pool: UpstreamPool
) -> None:
    server = await keep_alive_server(serve)

    async def one() -> bytes:
        async with await pool.request("GET", server.url()) as response:
            return await response.read()

    assert await asyncio.gather(*[one() for _ in range(20)]) == [b"ok"] * 20
    opened = server.connections
    assert await asyncio.gather(*[one() for _ in range(20)]) == [b"ok"] * 20
    assert server.connections == opened
    assert len(server.requests) == 40


async def test_whole_answer_left_unread_still_frees_the_connection(serve: ServeRaw) -> None:
    server = await keep_alive_server(serve, b"x" * 8192)  # one write, over the buffer limit
    pool = UpstreamPool(UpstreamSettings(buffer_limit_bytes=1024, first_byte_timeout_s=WAIT))
    response = await pool.request("GET", server.url())
    conn = response._conn
    assert conn is not None
    async with asyncio.timeout(WAIT):
        while not conn.complete:
            await asyncio.sleep(0.01)
    await response.aclose()  # without reading: the reading was paused, the pool must undo it
    assert await (await pool.request("GET", server.url())).read() == b"x" * 8192
    assert server.connections == 1
    await pool.aclose()


async def test_connection_close_is_honoured(serve: ServeRaw, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(b"bye", b"connection: close\r\n"))
    server = await serve(handler)
    for _ in range(2):
        assert await (await pool.request("GET", server.url())).read() == b"bye"
    assert server.connections == 2


async def test_aclose_mid_stream_closes_the_connection(serve: ServeRaw, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await server.read_request(reader) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"t1"))
        await server.wait_eof(reader)
    server = await serve(handler)
    response = await pool.request("POST", server.url(), [], b"{}")
    assert await anext(response.iter_raw()) == b"t1"
    await response.aclose()
    async with asyncio.timeout(WAIT):
        await server.eof_seen.wait()
    with pytest.raises(UpstreamClosed):
        await anext(response.iter_raw())
    await (await pool.request("GET", server.url())).aclose()
    assert server.connections == 2  # the closed one was not pooled


async def test_pool_aclose_closes_idle_connections(serve: ServeRaw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer())
        await server.wait_eof(reader)
    server = await serve(handler)
    pool = UpstreamPool()
    assert await (await pool.request("GET", server.url())).read() == b"ok"
    await pool.aclose()
    async with asyncio.timeout(WAIT):
        await server.eof_seen.wait()
    with pytest.raises(RuntimeError):
        await pool.request("GET", server.url())


# --- stale connections and the one retry ---------------------------------------------------


async def test_stale_pooled_connection_is_retried_once(serve: ServeRaw, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(b"first"))
        if server.connections == 1:
            await server.read_request(reader)  # then close without a byte, as an idle timeout
            return
        while await server.read_request(reader) is not None:
            writer.write(answer(b"again"))
    server = await serve(handler)
    assert await (await pool.request("GET", server.url())).read() == b"first"
    assert await (await pool.request("POST", server.url(), [], b"1")).read() == b"first"
    assert server.connections == 2
    assert [r.split(b" ")[0] for r in server.requests] == [b"GET", b"POST", b"POST"]


async def test_fresh_connection_closed_without_answer_is_not_retried(
    serve: ServeRaw, pool: UpstreamPool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
    server = await serve(handler)
    with pytest.raises(UpstreamClosed):
        await pool.request("POST", server.url(), [], b"{}")
    assert server.connections == 1


async def test_reused_connection_that_answered_a_byte_is_not_retried(
    serve: ServeRaw, pool: UpstreamPool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer())
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 O")
    server = await serve(handler)
    assert await (await pool.request("GET", server.url())).read() == b"ok"
    with pytest.raises(UpstreamClosed):
        await pool.request("POST", server.url(), [], b"{}")
    assert server.connections == 1


async def test_connection_closed_while_idle_is_not_used(
    serve: ServeRaw, pool: UpstreamPool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer())
    server = await serve(handler)  # answers, then closes: keep-alive but gone
    assert await (await pool.request("GET", server.url())).read() == b"ok"
    async with asyncio.timeout(WAIT):
        while server.connections < 2:
            assert await (await pool.request("GET", server.url())).read() == b"ok"
    assert len(server.requests) == server.connections  # no request was lost on a dead one


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


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder: Path = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return server, ssl.create_default_context(cafile=str(folder / "cert.pem"))


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
