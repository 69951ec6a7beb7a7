"""The upstream client against real servers on loopback: raw asyncio servers scripted byte by byte
for the edge cases, uvicorn serving a Starlette app for the real thing."""

from __future__ import annotations

import asyncio

import pytest

from gateway.upstream import (
    UpstreamClosed,
    UpstreamPool,
    UpstreamSettings,
)
from tests.gateway.raw_server import (
    WAIT,
    ServeRaw,
    answer,
    chunk,
    keep_alive_server,
    keepalive_timers,
)

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


async def test_idle_connections_are_probed_by_tcp_keepalive(
    serve: ServeRaw, pool: UpstreamPool
) -> None:
    """So that a runtime host gone without a reset is found before a run waits on it."""
    server = await keep_alive_server(serve)
    response = await pool.request("GET", server.url("/"))
    assert await response.read() == b"ok"
    timers = keepalive_timers(server.port)
    assert len(timers) == 1
    assert timers[0] is not None and 5 < timers[0] <= 10
