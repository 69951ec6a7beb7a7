"""The relay over the gateway's own HTTP protocol, against a runtime scripted byte by byte: a
client that goes away before the first token cancels the run, and an unreadable answer becomes
the contract's error."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import orjson
import pytest

from gateway.http import ChatCycle
from gateway.metrics import GatewayMetrics
from gateway.relay import CLIENT_CLOSED, ChatRequest, Relay
from gateway.reply import AsgiReply
from gateway.upstream import UpstreamPool
from tests.e2e.conftest import sse_events
from tests.gateway.raw_server import WAIT, RawServer, ServeRaw, chunk
from tests.gateway.test_descriptors import Usage, chat
from tests.gateway.test_http_cycle import Protocol

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
TOKEN = b'event: token\ndata: {"text": "Hello"}\n\n'


def request(port: int, *, streamed: bool) -> ChatRequest:
    found = chat(port)
    found.streamed = streamed
    return found


def cycle_for(protocol: Protocol) -> Any:
    cycle: Any = ChatCycle(
        protocol, None, GatewayMetrics(), "a1", [], keep_alive=True,  # type: ignore[arg-type]
        expect_continue=False,
    )
    cycle.body_complete()
    return cycle


def runtime(serve: ServeRaw, *parts: bytes, hold: bool = False) -> Any:
    """A runtime that reads the run, writes `parts` and, with `hold`, then waits for the
    gateway to hang up instead of ending its answer."""
    box: list[RawServer] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await box[0].read_request(reader) is None:
            return
        writer.write(b"".join(parts))
        if hold:
            await box[0].wait_eof(reader)

    async def start() -> RawServer:
        server = await serve(handler)
        box.append(server)
        return server
    return start()


async def wait_for(condition: Any, what: str) -> None:
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"waited {WAIT} s for {what}")


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
async def test_a_client_gone_before_the_first_token_cancels_the_run(
    serve: ServeRaw, streamed: bool
) -> None:
    server = await runtime(serve, hold=True)  # the runtime is still thinking: no head yet
    usage = Usage()
    relay = Relay(UpstreamPool(), usage, GatewayMetrics(), runtime_token="t")  # type: ignore[arg-type]
    protocol = Protocol()
    cycle = cycle_for(protocol)
    running = asyncio.create_task(relay.run(request(server.port, streamed=streamed), cycle))
    await wait_for(lambda: server.requests, "the run to reach the runtime")
    cycle.lost()
    assert await asyncio.wait_for(running, WAIT) == CLIENT_CLOSED
    await asyncio.wait_for(server.eof_seen.wait(), WAIT)  # the runtime saw the run end
    assert [r.status for r in usage.records] == ["cancelled"]
    assert protocol.transport.written == []


async def test_over_asgi_a_client_gone_before_the_first_token_cancels_the_run(
    serve: ServeRaw,
) -> None:
    server = await runtime(serve, hold=True)
    usage = Usage()
    relay = Relay(UpstreamPool(), usage, GatewayMetrics(), runtime_token="t")  # type: ignore[arg-type]
    left, sent = asyncio.Event(), []

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    running = asyncio.create_task(relay.run(request(server.port, streamed=True),
                                            AsgiReply(receive, send)))
    await wait_for(lambda: server.requests, "the run to reach the runtime")
    left.set()
    assert await asyncio.wait_for(running, WAIT) == CLIENT_CLOSED
    await asyncio.wait_for(server.eof_seen.wait(), WAIT)
    assert [r.status for r in usage.records] == ["cancelled"] and sent == []


async def test_a_client_gone_before_its_run_is_sent_costs_no_run(serve: ServeRaw) -> None:
    server = await runtime(serve, hold=True)
    usage = Usage()
    relay = Relay(UpstreamPool(), usage, GatewayMetrics(), runtime_token="t")  # type: ignore[arg-type]
    cycle = cycle_for(Protocol())
    cycle.lost()  # say, while its rate limit was checked
    assert await relay.run(request(server.port, streamed=True), cycle) == CLIENT_CLOSED
    assert server.connections == 0
    assert [r.status for r in usage.records] == ["cancelled"]


async def test_a_stream_left_mid_answer_reports_the_tokens_sent(serve: ServeRaw) -> None:
    """The runtime counts tokens only in its end: a chat cut short reports those relayed."""
    server = await runtime(serve, SSE_HEAD, chunk(TOKEN * 2), chunk(TOKEN), hold=True)
    usage = Usage()
    relay = Relay(UpstreamPool(), usage, GatewayMetrics(), runtime_token="t")  # type: ignore[arg-type]
    protocol = Protocol()
    cycle = cycle_for(protocol)
    running = asyncio.create_task(relay.run(request(server.port, streamed=True), cycle))
    await wait_for(lambda: b"".join(protocol.transport.written).count(b"event: token") == 3,
                   "three tokens relayed")
    cycle.lost()
    assert await asyncio.wait_for(running, WAIT) == CLIENT_CLOSED
    assert [(r.status, r.input_tokens, r.output_tokens) for r in usage.records] == [
        ("cancelled", 0, 3)]


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
async def test_a_run_failing_mid_answer_reports_the_tokens_sent(
    serve: ServeRaw, streamed: bool
) -> None:
    failure = b'event: error\ndata: {"code": "runtime_error", "message": "model gone"}\n\n'
    server = await runtime(serve, SSE_HEAD, chunk(TOKEN * 4), chunk(failure), b"0\r\n\r\n")
    status, _, usage = await relayed(server, streamed=streamed)
    assert status == (200 if streamed else 502)
    assert [(r.status, r.output_tokens) for r in usage.records] == [("failed", 4)]


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
async def test_the_runtime_end_gives_the_token_counts(serve: ServeRaw, streamed: bool) -> None:
    end = b'event: end\ndata: {"text": "Hi", "usage": {"input_tokens": 9, "output_tokens": 2}}\n\n'
    server = await runtime(serve, SSE_HEAD, chunk(TOKEN * 4), chunk(end), b"0\r\n\r\n")
    status, _, usage = await relayed(server, streamed=streamed)
    assert status == 200
    assert [(r.status, r.input_tokens, r.output_tokens) for r in usage.records] == [
        ("completed", 9, 2)]


UNREADABLE = {
    "end-not-json": chunk(TOKEN) + chunk(b"event: end\ndata: {not json\n\n") + b"0\r\n\r\n",
    "end-usage-not-a-number": chunk(TOKEN) + chunk(
        b'event: end\ndata: {"text": "Hello", "usage": {"input_tokens": "many"}}\n\n')
        + b"0\r\n\r\n",
    "end-text-not-a-string": chunk(TOKEN) + chunk(b'event: end\ndata: {"text": 7}\n\n')
        + b"0\r\n\r\n",
    "event-over-the-limit": chunk(TOKEN) + chunk(b"data: " + b"x" * (1 << 20) + b"\n"),
}


async def relayed(server: RawServer, *, streamed: bool) -> tuple[int, bytes, Usage]:
    """A chat relayed to `server`: its status, what its client was sent, its usage."""
    usage = Usage()
    relay = Relay(UpstreamPool(), usage, GatewayMetrics(), runtime_token="t")  # type: ignore[arg-type]
    protocol = Protocol()
    status = await asyncio.wait_for(
        relay.run(request(server.port, streamed=streamed), cycle_for(protocol)), WAIT)
    return status, b"".join(protocol.transport.written), usage


@pytest.mark.parametrize("body", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_an_unreadable_answer_is_an_error_event(serve: ServeRaw, body: bytes) -> None:
    server = await runtime(serve, SSE_HEAD, body, hold=True)
    status, written, usage = await relayed(server, streamed=True)
    assert status == 200 and written.startswith(b"HTTP/1.1 200")
    events = sse_events(written.partition(b"\r\n\r\n")[2].decode(errors="replace"))
    assert [name for name, _ in events][-1] == "error"
    assert events[-1][1] == {"code": "runtime_error", "request_id": "r1",
                             "message": "the agent runtime sent an unreadable answer"}
    assert [r.status for r in usage.records] == ["failed"]


@pytest.mark.parametrize("body", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_an_unreadable_answer_to_a_whole_chat_is_502(serve: ServeRaw, body: bytes) -> None:
    server = await runtime(serve, SSE_HEAD, body, hold=True)
    status, written, usage = await relayed(server, streamed=False)
    head, _, payload = written.partition(b"\r\n\r\n")
    assert status == 502 and head.startswith(b"HTTP/1.1 502")
    assert orjson.loads(payload)["error"] == {
        "code": "runtime_error", "request_id": "r1",
        "message": "the agent runtime sent an unreadable answer"}
    assert [r.status for r in usage.records] == ["failed"]
