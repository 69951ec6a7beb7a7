"""The gateway's own HTTP/1.1 handling of chats (gateway.http), byte for byte on a raw socket:
keep-alive, pipelining, Expect: 100-continue, bodies too large or never sent, HTTP/1.0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools
import httpx
import orjson
import pytest

from devstack.stack import Stack
from tests.e2e.conftest import Tenant


class Answer:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body


class Connection:
    """One raw connection; `answers()` parses what comes back with httptools."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parsed: list[Answer] = []
        self._parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.parsed.append(Answer())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.parsed[-1].on_header(name, value)

    def on_headers_complete(self) -> None:
        self.parsed[-1].status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.parsed[-1].on_body(body)

    def on_message_complete(self) -> None:
        self.parsed[-1].done = True

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answers(self, count: int) -> list[Answer]:
        async with asyncio.timeout(20):
            while sum(answer.done for answer in self.parsed) < count:
                data = await self.reader.read(65536)
                assert data, f"the connection closed after {len(self.parsed)} answers"
                self._parser.feed_data(data)
        return self.parsed[:count]

    async def closed(self) -> bool:
        """The server closes the connection (nothing else arrives first)."""
        async with asyncio.timeout(10):
            return await self.reader.read(65536) == b""


@pytest.fixture
async def connect(stack: Stack) -> AsyncIterator[type[Connection]]:
    url = urlsplit(stack.gateway_url)
    opened: list[Connection] = []

    async def open_one() -> Connection:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        connection = Connection(reader, writer)
        opened.append(connection)
        return connection

    yield open_one  # type: ignore[misc]
    for connection in opened:
        connection.writer.close()


def chat(tenant: Tenant, message: str, *, streamed: bool = False, version: str = "1.1",
         extra: str = "", body: bytes | None = None) -> bytes:
    payload = orjson.dumps({"message": message}) if body is None else body
    accept = "text/event-stream" if streamed else "application/json"
    return (
        f"POST {tenant.chat_path} HTTP/{version}\r\nhost: gateway\r\n"
        f"authorization: Bearer {tenant.secret_key}\r\ncontent-type: application/json\r\n"
        f"accept: {accept}\r\ncontent-length: {len(payload)}\r\n{extra}\r\n"
    ).encode() + payload


async def test_pipelined_chats_are_answered_in_order(connect, tenant: Tenant) -> None:
    conn = await connect()
    await conn.send(chat(tenant, "first #echo") + chat(tenant, "second #echo", streamed=True)
                    + chat(tenant, "third #echo"))
    first, second, third = await conn.answers(3)
    assert [first.status, second.status, third.status] == [200, 200, 200]
    assert "first" in orjson.loads(first.body)["text"]
    assert second.headers["content-type"].startswith("text/event-stream")
    assert second.headers["transfer-encoding"] == "chunked"
    assert b"event: end" in second.body and b"second" in second.body
    assert "third" in orjson.loads(third.body)["text"]
    ids = {first.headers["x-request-id"], second.headers["x-request-id"],
           third.headers["x-request-id"]}
    assert len(ids) == 3
    assert "date" in first.headers and "connection" not in first.headers


async def test_a_kept_alive_connection_serves_chats_and_other_routes(
    connect, tenant: Tenant
) -> None:
    conn = await connect()
    await conn.send(chat(tenant, "hello", streamed=True))
    await conn.send(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
    await conn.send(chat(tenant, "again"))
    streamed, health, answer = await conn.answers(3)
    assert streamed.status == 200 and streamed.body.endswith(b"\n\n")
    assert health.status == 200 and orjson.loads(health.body) == {"status": "ok"}
    assert answer.status == 200 and orjson.loads(answer.body)["text"]


async def test_expect_100_continue_gets_its_interim_answer(connect, tenant: Tenant) -> None:
    conn = await connect()
    request = chat(tenant, "waited #echo", extra="expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    await conn.send(head + b"\r\n\r\n")
    async with asyncio.timeout(10):
        interim = await conn.reader.readuntil(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    await conn.send(body)
    (answer,) = await conn.answers(1)
    assert answer.status == 200 and "waited" in orjson.loads(answer.body)["text"]


async def test_a_chunked_body_over_the_limit_is_refused_and_the_connection_closed(
    connect, tenant: Tenant
) -> None:
    conn = await connect()
    chunk = b"x" * 8192
    head = (
        f"POST {tenant.chat_path} HTTP/1.1\r\nhost: gateway\r\n"
        f"authorization: Bearer {tenant.secret_key}\r\ncontent-type: application/json\r\n"
        "transfer-encoding: chunked\r\n\r\n"
    ).encode()
    await conn.send(head + b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for _ in range(8)))
    (answer,) = await conn.answers(1)
    assert answer.status == 413
    assert orjson.loads(answer.body)["error"]["code"] == "payload_too_large"
    assert answer.headers["connection"] == "close"
    assert await conn.closed()


async def test_a_refusal_before_the_body_arrived_closes_the_connection(
    connect, tenant: Tenant
) -> None:
    conn = await connect()
    request = chat(tenant, "never sent").replace(tenant.secret_key.encode(), b"not-a-key")
    await conn.send(request.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")  # the head only
    (answer,) = await conn.answers(1)
    assert answer.status == 401 and answer.headers["connection"] == "close"
    assert orjson.loads(answer.body)["error"]["code"] == "invalid_key"
    assert await conn.closed()


async def test_a_client_gone_mid_body_leaves_the_gateway_serving(
    connect, tenant: Tenant
) -> None:
    conn = await connect()
    request = chat(tenant, "cut short")
    await conn.send(request[:-5])
    conn.writer.close()
    await asyncio.sleep(0.2)
    other = await connect()
    await other.send(chat(tenant, "still here #echo"))
    (answer,) = await other.answers(1)
    assert answer.status == 200 and "still here" in orjson.loads(answer.body)["text"]


async def test_http_1_0_gets_its_answer_and_the_connection_closes(
    connect, tenant: Tenant
) -> None:
    conn = await connect()
    await conn.send(chat(tenant, "old client #echo", version="1.0"))
    async with asyncio.timeout(20):
        raw = await conn.reader.read()  # until the server closes
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close\r\n" in head + b"\r\n"
    assert "old client" in orjson.loads(body)["text"]


async def test_malformed_json_is_refused_on_a_connection_that_stays_open(
    connect, tenant: Tenant
) -> None:
    conn = await connect()
    await conn.send(chat(tenant, "", body=b"{not json") + chat(tenant, "next #echo"))
    refused, answer = await conn.answers(2)
    assert refused.status == 400
    assert orjson.loads(refused.body)["error"]["code"] == "invalid_request"
    assert answer.status == 200 and "next" in orjson.loads(answer.body)["text"]


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    pytest.param("GET", "/v1/nowhere", 404, None, id="unknown-path"),
    pytest.param("GET", "/v1/agents/AGENT/chat", 405, {"POST", "OPTIONS"}, id="get-a-chat"),
    pytest.param("DELETE", "/widget.js", 405, {"GET", "HEAD"}, id="delete-the-widget"),
])
async def test_a_path_or_method_not_served_gets_the_contracts_error(
    stack: Stack, tenant: Tenant, method: str, path: str, status: int, allow: set[str] | None
) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=10) as client:
        response = await client.request(method, path.replace("AGENT", tenant.agent_id))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["code"] == ("not_found" if status == 404 else "invalid_request")
    assert (method in error["message"]) if status == 405 else ("/v1/nowhere" in error["message"])
    if allow is not None:
        assert {m.strip() for m in response.headers["allow"].split(",")} == allow


async def test_bytes_that_are_not_http_get_the_contracts_error(connect) -> None:
    conn = await connect()
    await conn.send(b"GET /healthz HTTP/1.1\r\nhost gateway\r\n\r\n")  # a header without a colon
    (answer,) = await conn.answers(1)
    assert answer.status == 400
    assert answer.headers["content-type"] == "application/json"
    error = orjson.loads(answer.body)["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("malformed HTTP request: ")
    assert error["request_id"] == answer.headers["x-request-id"]
    assert await conn.closed()
