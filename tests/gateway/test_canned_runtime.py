"""The benchmark's canned runtime (loadtest/standins.py): over the runtime link
(its frames: runtime/link.py) it gives the answers it gives over HTTP/1.1, which keeps working."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from loadtest.standins import REST_DELAY_S, CannedRuntime, Counters
from tests.gateway.raw_server import WAIT

TTFT_S = 0.1
OPEN, CANCEL = 1, 2
HEAD, DATA, END = 1, 2, 3
SSE_HEADERS = [["content-type", "text/event-stream; charset=utf-8"]]
FRAME = struct.Struct(">IB")

Frame = tuple[int, int, bytes]  # stream id, kind, payload


@dataclass
class Runtime:
    counters: Counters
    port: int

    def link(self) -> connect:
        return connect(f"ws://127.0.0.1:{self.port}/link",
                       subprotocols=[Subprotocol("sitekit-link.1")],
                       additional_headers={"authorization": "Bearer bench"})

    async def http(self, method: str, flow: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            return await client.request(method, f"http://127.0.0.1:{self.port}{flow}",
                                        content=b'{"message": "hi"}')

    async def held_becomes(self, held: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.counters.held != held:
                await asyncio.sleep(0.005)


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    counters = Counters()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: CannedRuntime(counters, TTFT_S), "127.0.0.1", 0)
    yield Runtime(counters, server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


def open_frame(stream_id: int, path: str, method: str = "POST") -> bytes:
    head = orjson.dumps({"method": method, "path": path, "headers": [
        ["authorization", "Bearer agent"], ["content-type", "application/json"],
        ["accept", "text/event-stream"], ["x-request-id", f"r{stream_id}"]]})
    return struct.pack(">IBH", stream_id, OPEN, len(head)) + head + b'{"message": "hi"}'


def cancel_frame(stream_id: int) -> bytes:
    return FRAME.pack(stream_id, CANCEL)


def head(status: int, headers: list[list[str]] = SSE_HEADERS) -> bytes:
    return struct.pack(">H", status) + orjson.dumps(headers)


async def receive(ws: ClientConnection, count: int) -> list[Frame]:
    frames = []
    async with asyncio.timeout(WAIT):
        for _ in range(count):
            message = await ws.recv()
            assert isinstance(message, bytes)
            stream_id, kind = FRAME.unpack_from(message)
            frames.append((stream_id, kind, message[FRAME.size:]))
    return frames


async def test_fast_is_the_http_answer_in_three_frames(runtime: Runtime) -> None:
    over_http = await runtime.http("POST", "/flows/fast/stream")
    async with runtime.link() as ws:
        assert ws.subprotocol == "sitekit-link.1"
        await ws.send(open_frame(1, "/flows/fast/stream"))
        assert await receive(ws, 3) == [
            (1, HEAD, head(200)), (1, DATA, over_http.content), (1, END, b"")]
    assert over_http.content.count(b"event: token") == 5
    assert runtime.counters.requests == 2


async def test_hold_is_counted_until_cancelled_or_the_link_closes(runtime: Runtime) -> None:
    async with runtime.link() as ws:
        await ws.send(open_frame(1, "/flows/hold/stream"))
        assert await receive(ws, 2) == [
            (1, HEAD, head(200)), (1, DATA, b'event: token\ndata: {"text":"Hel"}\n\n')]
        assert runtime.counters.held == 1
        await ws.send(cancel_frame(1))
        await ws.send(cancel_frame(1))  # a second CANCEL for it is ignored
        await runtime.held_becomes(0)
        for stream_id in (3, 5):
            await ws.send(open_frame(stream_id, "/flows/hold/stream"))
        await receive(ws, 4)
        assert runtime.counters.held == 2
    await runtime.held_becomes(0)
    assert runtime.counters.requests == 3


async def test_ttft_sends_the_first_token_after_ttft(runtime: Runtime) -> None:
    over_http = await runtime.http("POST", "/flows/ttft/stream")
    async with runtime.link() as ws:
        start = time.perf_counter()
        await ws.send(open_frame(1, "/flows/ttft/stream"))
        assert await receive(ws, 1) == [(1, HEAD, head(200))]
        assert time.perf_counter() - start < TTFT_S
        first = await receive(ws, 1)
        first_at = time.perf_counter() - start
        rest = await receive(ws, 2)
        rest_at = time.perf_counter() - start
    assert first_at >= TTFT_S
    assert rest_at >= TTFT_S + REST_DELAY_S
    assert [kind for _, kind, _ in first + rest] == [DATA, DATA, END]
    assert first[0][2] + rest[0][2] == over_http.content


async def test_a_cancelled_ttft_stream_sends_nothing_more(runtime: Runtime) -> None:
    async with runtime.link() as ws:
        await ws.send(open_frame(1, "/flows/ttft/stream"))
        await receive(ws, 1)
        await ws.send(cancel_frame(1))
        await asyncio.sleep(TTFT_S + REST_DELAY_S + 0.02)
        await ws.send(open_frame(3, "/flows/fast/stream"))
        assert [stream_id for stream_id, _, _ in await receive(ws, 3)] == [3, 3, 3]


async def test_unknown_path_or_method_is_404(runtime: Runtime) -> None:
    async with runtime.link() as ws:
        await ws.send(open_frame(1, "/flows/nope/stream"))
        await ws.send(open_frame(3, "/flows/fast/stream", method="GET"))
        assert await receive(ws, 4) == [
            (1, HEAD, head(404, [])), (1, END, b""), (3, HEAD, head(404, [])), (3, END, b"")]
    assert runtime.counters.requests == 2


async def test_streams_interleave_on_one_link(runtime: Runtime) -> None:
    async with runtime.link() as ws:
        for stream_id, flow in ((1, "ttft"), (3, "hold"), (5, "fast"), (7, "ttft")):
            await ws.send(open_frame(stream_id, f"/flows/{flow}/stream"))
        frames = await receive(ws, 4 + 2 + 3 + 4)  # until both ttft streams end
        await ws.send(cancel_frame(7))  # already ended: ignored
        await ws.send(cancel_frame(3))
        await runtime.held_becomes(0)
    by_stream: dict[int, list[int]] = {}
    for stream_id, kind, _ in frames:
        by_stream.setdefault(stream_id, []).append(kind)
    assert by_stream == {1: [HEAD, DATA, DATA, END], 3: [HEAD, DATA], 5: [HEAD, DATA, END],
                         7: [HEAD, DATA, DATA, END]}
    fast_end = frames.index((5, END, b""))
    first_ttft_data = min(frames.index(f) for f in frames if f[:2] in ((1, DATA), (7, DATA)))
    assert fast_end < first_ttft_data  # the fast answer did not wait behind the ttft ones
    assert runtime.counters.requests == 4


async def test_pings_are_answered(runtime: Runtime) -> None:
    async with runtime.link() as ws:
        async with asyncio.timeout(WAIT):
            await (await ws.ping(b"are you there"))


async def test_a_text_message_closes_the_link_with_1002(runtime: Runtime) -> None:
    async with runtime.link() as ws:
        await ws.send(open_frame(1, "/flows/hold/stream"))
        await receive(ws, 2)
        await ws.send("not binary")
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws, 1)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
    await runtime.held_becomes(0)


async def test_http_answers_beside_a_link(runtime: Runtime) -> None:
    async with runtime.link() as ws:
        await ws.send(open_frame(1, "/flows/hold/stream"))
        await receive(ws, 2)
        fast = await runtime.http("POST", "/flows/fast/stream")
        assert fast.status_code == 200
        assert fast.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert fast.content.startswith(b'event: token\ndata: {"text":"Hel"}\n\n')
        assert fast.content.endswith(b'"usage":{"input_tokens":3,"output_tokens":5}}\n\n')
        assert (await runtime.http("POST", "/flows/nope/stream")).status_code == 404
        stats = await runtime.http("GET", "/stats")
        assert stats.json() == {"held": 1, "requests": 4}  # /stats counts itself


async def test_a_fragmented_message_closes_the_link_with_1002(runtime: Runtime) -> None:
    async with runtime.link() as ws:
        await ws.send([open_frame(1, "/flows/fast/stream")[:5], b"rest"])
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws, 1)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
    assert "fragmented" in closed.value.rcvd.reason


async def test_long_messages_with_16_and_64_bit_lengths(runtime: Runtime) -> None:
    async with runtime.link() as ws:
        for stream_id, size in ((1, 300), (3, 70_000)):
            await ws.send(open_frame(stream_id, "/flows/fast/stream") + b" " * size)
            assert [kind for _, kind, _ in await receive(ws, 3)] == [HEAD, DATA, END]


async def test_an_upgrade_without_the_subprotocol_is_refused(runtime: Runtime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", runtime.port)
    writer.write(b"GET /link HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
                 b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"sec-websocket-version: 13\r\n\r\n")
    async with asyncio.timeout(WAIT):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.endswith(b"Sec-WebSocket-Protocol does not offer sitekit-link.1")
