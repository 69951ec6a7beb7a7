"""The gateway's side of the runtime link: runs numbered on shared WebSockets, their answers,
cancellation, the link's failures and GOAWAY, and how runs spread over links."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable

import pytest

from devstack.procs import free_port
from gateway.link import LinkPool, LinkSettings
from gateway.link_conn import DATA
from gateway.upstream import (
    RuntimeAnswer,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamNoDescriptors,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from tests.gateway.link_server import TOKEN, WAIT, LinkServer, Opened, frame, goaway
from tests.gateway.raw_server import RawServer, chunk, keepalive_timers
from tests.gateway.test_descriptors import no_free_descriptors

HEADERS = [(b"authorization", TOKEN), (b"content-type", b"application/json"),
           (b"x-request-id", b"req-1")]
TOKENS = b'event: token\ndata: {"text":"Hel"}\n\n'
END_EVENT = b'event: end\ndata: {"text":"Hello"}\n\n'


@pytest.fixture
async def server() -> AsyncIterator[LinkServer]:
    server = LinkServer()
    await server.start()
    yield server
    await server.stop()


MakePool = Callable[..., LinkPool]


@pytest.fixture
async def make_pool() -> AsyncIterator[MakePool]:
    """Pools with waits of `WAIT` unless told otherwise; all closed after the test."""
    pools: list[LinkPool] = []

    def make(ssl_context: ssl.SSLContext | None = None, fallback: UpstreamPool | None = None,
             **settings: float) -> LinkPool:
        options: dict[str, float] = {"connect_timeout_s": WAIT, "first_byte_timeout_s": WAIT,
                                     "read_timeout_s": WAIT, **settings}
        pool = LinkPool(LinkSettings(**options),  # type: ignore[arg-type]
                        authorization=TOKEN, ssl_context=ssl_context, fallback=fallback)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.aclose()


@pytest.fixture
def pool(make_pool: MakePool) -> LinkPool:
    return make_pool()


async def start_run(
    pool: LinkPool, server: LinkServer, body: bytes = b"{}"
) -> tuple[asyncio.Task[RuntimeAnswer], Opened]:
    """A run started on `pool`, and its OPEN as the server saw it."""
    pending = asyncio.create_task(pool.request("POST", server.target(), HEADERS, body))
    return pending, await server.next_open()


async def test_a_run_carries_its_request_and_streams_its_answer(
    server: LinkServer, pool: LinkPool
) -> None:
    pending, opened = await start_run(pool, server, b'{"q":1}')
    assert opened.head == {"method": "POST", "path": "/flows/f1/stream", "headers": [
        ["authorization", TOKEN.decode()], ["content-type", "application/json"],
        ["x-request-id", "req-1"]]}
    assert opened.body == b'{"q":1}'
    await opened.send_head()
    response = await asyncio.wait_for(pending, WAIT)
    assert response.status == 200
    assert response.headers == [(b"content-type", b"text/event-stream; charset=utf-8")]
    chunks = response.iter_raw()
    await opened.send_data(TOKENS)
    assert await anext(chunks) == TOKENS  # each part as it arrives, before the end
    await opened.send_data(END_EVENT)
    await opened.send_end()
    assert await response.read() == END_EVENT
    await response.aclose()

    # The next run goes on the same link, with the next number.
    pending, second = await start_run(pool, server)
    assert second.stream_id == opened.stream_id + 1
    await second.answer(b"ok")
    assert await (await asyncio.wait_for(pending, WAIT)).read() == b"ok"
    assert len(server.connections) == 1
    assert server.cancels.empty()  # runs read to their end are not cancelled


async def test_runs_interleave_on_one_link(server: LinkServer, make_pool: MakePool) -> None:
    pool = make_pool(streams_per_link=16)
    first = asyncio.create_task(pool.request("POST", server.target("a"), HEADERS, b"{}"))
    a = await server.next_open()
    second = asyncio.create_task(pool.request("POST", server.target("b"), HEADERS, b"{}"))
    b = await server.next_open()
    assert (a.head["path"], b.head["path"]) == ("/flows/a/stream", "/flows/b/stream")
    await b.send_head(404)
    await a.send_head()
    await b.send_data(b"b-body")
    await a.send_data(b"a-1 ")
    await b.send_end()
    await a.send_data(b"a-2")
    await a.send_end()
    answer_a, answer_b = await asyncio.wait_for(asyncio.gather(first, second), WAIT)
    assert (answer_a.status, await answer_a.read()) == (200, b"a-1 a-2")
    assert (answer_b.status, await answer_b.read()) == (404, b"b-body")
    assert len(server.connections) == 1


async def test_closing_before_the_end_cancels_the_run(server: LinkServer, pool: LinkPool) -> None:
    pending, opened = await start_run(pool, server)
    await opened.send_head()
    await opened.send_data(TOKENS)
    response = await asyncio.wait_for(pending, WAIT)
    assert await anext(response.iter_raw()) == TOKENS
    await response.aclose()
    assert await server.next_cancel() == (0, opened.stream_id)
    # Frames the runtime sent before it saw the cancel are dropped; the link carries on.
    await opened.send_data(b"late")
    await opened.send_end()
    pending, opened = await start_run(pool, server)
    await opened.answer(b"next")
    assert await (await asyncio.wait_for(pending, WAIT)).read() == b"next"


async def test_no_head_in_time_is_a_timeout_and_cancels(
    server: LinkServer, make_pool: MakePool
) -> None:
    pool = make_pool(first_byte_timeout_s=0.2)
    pending, opened = await start_run(pool, server)
    with pytest.raises(UpstreamTimeout, match="no response head within 0.2 s"):
        await asyncio.wait_for(pending, WAIT)
    assert await server.next_cancel() == (0, opened.stream_id)


async def test_a_silent_body_is_a_timeout_and_cancels(
    server: LinkServer, make_pool: MakePool
) -> None:
    pool = make_pool(read_timeout_s=0.2)
    pending, opened = await start_run(pool, server)
    await opened.send_head()
    response = await asyncio.wait_for(pending, WAIT)
    with pytest.raises(UpstreamTimeout, match="sent nothing for 0.2 s"):
        await response.read()
    assert await server.next_cancel() == (0, opened.stream_id)


async def test_the_link_closing_mid_body_ends_every_run_on_it(
    server: LinkServer, make_pool: MakePool
) -> None:
    pool = make_pool(streams_per_link=16)
    pendings = [asyncio.create_task(pool.request("POST", server.target(), HEADERS, b"{}"))
                for _ in range(2)]
    opened = [await server.next_open() for _ in pendings]
    for run in opened:
        await run.send_head()
        await run.send_data(b"part")
    responses = await asyncio.wait_for(asyncio.gather(*pendings), WAIT)
    await server.connections[0].close()
    for response in responses:
        with pytest.raises(UpstreamClosed, match="closed the runtime link mid-body"):
            await asyncio.wait_for(response.read(), WAIT)
    # The next run opens a new link.
    pending, opened = await start_run(pool, server)
    await opened.answer(b"again")
    assert await (await asyncio.wait_for(pending, WAIT)).read() == b"again"
    assert len(server.connections) == 2


async def test_a_run_on_a_link_that_dies_before_its_head_goes_once_more_on_a_new_one(
    server: LinkServer, pool: LinkPool
) -> None:
    pending, opened = await start_run(pool, server)
    await opened.answer(b"first")
    assert await (await asyncio.wait_for(pending, WAIT)).read() == b"first"
    # The runtime restarts between runs, as the gateway sends the next one.
    pending, opened = await start_run(pool, server)
    await opened.ws.close()
    retried = await server.next_open()
    assert retried.ws is server.connections[1]
    await retried.answer(b"second")
    assert await (await asyncio.wait_for(pending, WAIT)).read() == b"second"

    # On a link opened for it, the run is not sent again.
    await server.connections[1].close()
    pending, opened = await start_run(pool, server)
    await opened.ws.close()
    with pytest.raises(UpstreamClosed, match="without answering"):
        await asyncio.wait_for(pending, WAIT)
    assert server.opens.empty()


async def test_goaway_sends_new_runs_to_a_new_link_and_lets_open_ones_finish(
    server: LinkServer, pool: LinkPool
) -> None:
    pending, old = await start_run(pool, server)
    await old.send_head()
    response = await asyncio.wait_for(pending, WAIT)
    await goaway(old.ws)
    await asyncio.sleep(0.05)
    pending, new = await start_run(pool, server)
    assert new.ws is server.connections[1]
    await new.answer(b"new")
    assert await (await asyncio.wait_for(pending, WAIT)).read() == b"new"
    await old.send_data(b"old")
    await old.send_end()
    assert await asyncio.wait_for(response.read(), WAIT) == b"old"
    # With its last run over, the gateway closes the drained link itself.
    await asyncio.wait_for(old.ws.wait_closed(), WAIT)


async def test_runs_spread_over_links_up_to_the_limit(
    server: LinkServer, make_pool: MakePool
) -> None:
    pool = make_pool(streams_per_link=2, max_links=2)
    pendings = [asyncio.create_task(pool.request("POST", server.target(), HEADERS, b"{}"))
                for _ in range(5)]
    opened = [await server.next_open() for _ in pendings]
    per_link = [sum(1 for run in opened if run.ws is ws) for ws in server.connections]
    # Two per link until the second link; past the limit the links take runs in turn.
    assert sorted(per_link) == [2, 3]
    assert pool.links == 2
    for run in opened:
        await run.answer(b"x")
    for pending in pendings:
        assert await (await asyncio.wait_for(pending, WAIT)).read() == b"x"


async def runs_at_once(pool: LinkPool, server: LinkServer, count: int) -> None:
    """`count` runs started together, each answered as the server sees it, all read whole."""
    pendings = [asyncio.create_task(pool.request("POST", server.target(), HEADERS, b"{}"))
                for _ in range(count)]
    for index in range(count):
        await (await server.next_open()).answer(b"answer %d" % index)
    answers = [await (await asyncio.wait_for(p, WAIT)).read() for p in pendings]
    assert sorted(answers) == sorted(b"answer %d" % index for index in range(count))


async def test_by_default_each_run_has_a_link_of_its_own_up_to_max_links(
    server: LinkServer, make_pool: MakePool
) -> None:
    """As HTTP/1.1 connections would, so that a runtime's workers each get their share."""
    pool = make_pool(max_links=3)
    pendings = [asyncio.create_task(pool.request("POST", server.target(), HEADERS, b"{}"))
                for _ in range(5)]
    opened = [await server.next_open() for _ in pendings]
    assert sorted(sum(1 for run in opened if run.ws is ws) for ws in server.connections) == [
        1, 2, 2]
    for run in opened:
        await run.answer(b"z")
    await asyncio.wait_for(asyncio.gather(*pendings), WAIT)
    # Done runs free their links for the next ones: no new link while one is idle.
    await runs_at_once(pool, server, 3)
    assert len(server.connections) == 3


@pytest.mark.parametrize(("streams_per_link", "rounds", "runs"), [
    pytest.param(100, 1, 10, id="runs-arriving-while-it-opens-share-it"),
    pytest.param(2, 3, 2, id="filled-as-it-opened-it-takes-runs-again-once-they-end"),
])
async def test_one_link_while_runs_fit_on_it(
    server: LinkServer, make_pool: MakePool, streams_per_link: int, rounds: int, runs: int
) -> None:
    pool = make_pool(streams_per_link=streams_per_link)
    for _ in range(rounds):
        await runs_at_once(pool, server, runs)
    assert len(server.connections) == 1


@pytest.mark.parametrize("streams_per_link", [1, 2])
async def test_a_run_cancelled_while_its_link_opens_leaves_the_link_to_the_next(
    server: LinkServer, make_pool: MakePool, streams_per_link: int
) -> None:
    """Its client went away during the upgrade: the link still opens, and takes the next run
    instead of sitting unused while a new one is opened."""
    pool = make_pool(streams_per_link=streams_per_link)
    server.hold = asyncio.Event()
    pending = asyncio.create_task(pool.request("POST", server.target(), HEADERS, b"{}"))
    await asyncio.wait_for(server.upgrading.wait(), WAIT)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    server.hold.set()
    for _ in range(int(WAIT / 0.01)):
        if pool.links:
            break
        await asyncio.sleep(0.01)
    await runs_at_once(pool, server, 1)
    assert len(server.connections) == 1


async def test_an_answer_left_unread_past_the_buffer_limit_is_cancelled(
    server: LinkServer, make_pool: MakePool,
) -> None:
    pool = make_pool(buffer_limit_bytes=1000)
    pending, opened = await start_run(pool, server)
    await opened.send_head()
    response = await asyncio.wait_for(pending, WAIT)
    await opened.send_data(b"a" * 600)
    await opened.send_data(b"b" * 600)
    assert await server.next_cancel() == (0, opened.stream_id)
    with pytest.raises(UpstreamProtocolError, match="outgrew 1000 bytes unread"):
        await response.read()


async def test_a_refused_handshake_names_the_refusal(server: LinkServer, pool: LinkPool) -> None:
    server.refuse = True
    with pytest.raises(UpstreamConnectError, match="refused the runtime link.*403"):
        await pool.request("POST", server.target(), HEADERS, b"{}")
    assert server.opens.empty()


@contextlib.asynccontextmanager
async def http_only_runtime(refusal: bytes) -> AsyncIterator[RawServer]:
    """A runtime that answers `GET /link` with `refusal` and each run over HTTP/1.1."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await server.read_request(reader)) is not None:
            if request.startswith(b"GET /link "):
                writer.write(b"HTTP/1.1 %s\r\ncontent-length: 0\r\n\r\n" % refusal)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n" + chunk(TOKENS) + b"0\r\n\r\n")

    server = RawServer(handler)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_runtime_that_does_not_serve_the_link_gets_runs_over_http_for_a_while(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    async with http_only_runtime(b"404 Not Found") as server:
        pool = make_pool(fallback=UpstreamPool(), without_link_s=0.5)
        target = ("127.0.0.1", server.port, "/flows/f1/stream")

        async def run() -> bytes:
            return await (await pool.request("POST", target, HEADERS, b"{}")).read()

        assert await asyncio.gather(run(), run()) == [TOKENS, TOKENS]
        assert await run() == TOKENS
        upgrades = [r for r in server.requests if r.startswith(b"GET /link ")]
        runs = [r for r in server.requests if r.startswith(b"POST /flows/f1/stream ")]
        assert (len(upgrades), len(runs)) == (2, 3)  # the third run did not try the link
        assert [r.message for r in caplog.records if "refused the runtime link" in r.message] \
            == [f"http://127.0.0.1:{server.port} refused the runtime link (HTTP 404); its runs "
                "go over HTTP/1.1 for 0.5 s, then the link is tried again"]
        await asyncio.sleep(0.6)
        assert await run() == TOKENS
        assert len([r for r in server.requests if r.startswith(b"GET /link ")]) == 3


@pytest.mark.parametrize(("refusal", "fallback"), [
    pytest.param(b"401 Unauthorized", True, id="one-that-http-would-get-too"),
    pytest.param(b"404 Not Found", False, id="no-link-and-no-fallback"),
])
async def test_a_refusal_not_to_fall_back_from_fails_the_run(
    make_pool: MakePool, refusal: bytes, fallback: bool
) -> None:
    async with http_only_runtime(refusal) as server:
        pool = make_pool(fallback=UpstreamPool() if fallback else None)
        with pytest.raises(UpstreamConnectError,
                           match=f"refused the runtime link.*HTTP {refusal[:3].decode()}"):
            await pool.request("POST", ("127.0.0.1", server.port, "/f"), HEADERS, b"{}")
        assert [r.split(b" ", 1)[0] for r in server.requests] == [b"GET"]


async def test_a_runtime_without_the_subprotocol_is_refused(pool: LinkPool) -> None:
    server = LinkServer(subprotocol=None)
    await server.start()
    try:
        with pytest.raises(UpstreamConnectError, match="did not accept sitekit-link.1"):
            await pool.request("POST", server.target(), HEADERS, b"{}")
    finally:
        await server.stop()


async def test_nothing_listening_is_a_connect_error(pool: LinkPool) -> None:
    with pytest.raises(UpstreamConnectError) as caught:
        await pool.request("POST", ("127.0.0.1", free_port(), "/flows/f/stream"), HEADERS)
    assert isinstance(caught.value.__cause__, OSError)


async def test_a_text_message_breaks_the_link(server: LinkServer, pool: LinkPool) -> None:
    pending, opened = await start_run(pool, server)
    await opened.send_head()
    response = await asyncio.wait_for(pending, WAIT)
    await opened.ws.send("not a frame")
    with pytest.raises(UpstreamProtocolError, match="text message"):
        await asyncio.wait_for(response.read(), WAIT)
    await asyncio.wait_for(opened.ws.wait_closed(), WAIT)
    assert opened.ws.close_code == 1002


async def test_closing_the_pool_ends_open_runs(server: LinkServer, make_pool: MakePool) -> None:
    pool = make_pool()
    pending, opened = await start_run(pool, server)
    await opened.send_head()
    response = await asyncio.wait_for(pending, WAIT)
    await pool.aclose()
    with pytest.raises(UpstreamClosed):
        await asyncio.wait_for(response.read(), WAIT)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(opened.ws.wait_closed(), WAIT)
    assert opened.ws.close_code == 1000
    with pytest.raises(RuntimeError, match="closed"):
        await pool.request("POST", server.target(), HEADERS, b"{}")


async def test_no_descriptor_left_for_a_link_is_named(server: LinkServer, pool: LinkPool) -> None:
    with no_free_descriptors(), pytest.raises(UpstreamNoDescriptors) as caught:
        await pool.request("POST", server.target(), HEADERS, b"{}")
    assert "Too many open files" in str(caught.value)
    assert server.opens.empty()


async def test_frames_out_of_order_fail_the_run_and_cancel_it(
    server: LinkServer, pool: LinkPool
) -> None:
    pending, opened = await start_run(pool, server)
    await opened.send_data(b"body before its head")
    with pytest.raises(UpstreamProtocolError, match="frame kind 2 out of order"):
        await asyncio.wait_for(pending, WAIT)
    assert await server.next_cancel() == (0, opened.stream_id)


async def test_pings_are_answered_and_big_and_fragmented_messages_arrive_whole(
    server: LinkServer, pool: LinkPool
) -> None:
    body = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length each way
    pending, opened = await start_run(pool, server, body)
    assert opened.body == body
    pong = await opened.ws.ping(b"are you there")
    await asyncio.wait_for(pong, WAIT)
    await opened.send_head()
    response = await asyncio.wait_for(pending, WAIT)
    medium = b"m" * 300  # a 16-bit length
    await opened.send_data(medium)
    # One link frame in three WebSocket fragments.
    await opened.ws.send([frame(opened.stream_id, DATA), body[:1000], body[1000:]])
    await opened.send_end()
    assert await asyncio.wait_for(response.read(), WAIT) == medium + body


async def test_a_link_over_tls(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext], make_pool: MakePool
) -> None:
    server_context, client_context = tls_pair
    server = LinkServer(ssl_context=server_context)
    await server.start()
    try:
        target = f"https://127.0.0.1:{server.port}/flows/f1/stream"
        pending = asyncio.create_task(
            make_pool(ssl_context=client_context).request("POST", target, HEADERS, b"{}"))
        await (await server.next_open()).answer(b"private")
        assert await (await asyncio.wait_for(pending, WAIT)).read() == b"private"
        with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await make_pool().request("POST", target, HEADERS, b"{}")  # the system's CAs
    finally:
        await server.stop()


async def test_idle_links_are_probed_by_tcp_keepalive(server: LinkServer, pool: LinkPool) -> None:
    """So that a runtime host gone without a reset is found before a run waits on its link."""
    await runs_at_once(pool, server, 1)
    timers = keepalive_timers(server.port)
    assert len(timers) == 1
    assert timers[0] is not None and 5 < timers[0] <= 10
