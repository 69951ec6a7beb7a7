"""Fixtures for tests through the whole stack: fresh tenants, keys, clients and readers of the
usage topic and the audit log."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from cmp.registry import DEFAULT_LIMITS, Limits, load_instance, publish_entry, save_instance
from cmp.signing import SigningKey, active_signing_key
from devstack.procs import ManagedProcess, free_port, http_ready
from devstack.seed import create_tenant_agent
from devstack.stack import Stack
from tests.gateway.raw_server import RawServer, chunk


@dataclass
class Tenant:
    tenant_id: str
    agent_id: str
    secret_key: str
    secret_key_id: str
    publishable_key: str
    publishable_key_id: str
    allowed_origin: str

    @property
    def chat_path(self) -> str:
        return f"/v1/agents/{self.agent_id}/chat"


@pytest.fixture(autouse=True)
def services_up(stack: Stack) -> None:
    """A fault test may have stopped a service; the next test gets the whole stack back."""
    for name in ("redis", "kafka", "runtime"):
        if not stack.process(name).running:
            stack.start_process(name)


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack.database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def stack_redis(stack: Stack) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(stack.redis_url)
    yield client
    await client.aclose()


MakeTenant = Callable[..., Awaitable[Tenant]]


@pytest.fixture
def make_tenant(stack: Stack, db: asyncpg.Connection, stack_redis: aioredis.Redis) -> MakeTenant:
    async def make(
        limits: Limits = DEFAULT_LIMITS, origin: str | None = None, runtime_url: str | None = None
    ) -> Tenant:
        """A tenant whose agent runs on the stack's runtime, or on `runtime_url`."""
        made = await create_tenant_agent(
            db, stack_redis, stack, name="Test shop",
            origin=origin or f"http://shop-{uuid.uuid4().hex[:8]}.example",
            limits=limits,
        )
        if runtime_url is not None:
            # Before its first chat, so no gateway holds the entry that names the stack's runtime.
            instance = await load_instance(db, made["agent_id"], made["tenant_id"])
            rerouted = dataclasses.replace(instance, runtime_url=runtime_url)
            await publish_entry(stack_redis, await save_instance(db, rerouted))
        return Tenant(**{k: made[k] for k in Tenant.__dataclass_fields__})

    return make


@pytest.fixture
async def tenant(make_tenant: MakeTenant) -> Tenant:
    return await make_tenant()


@pytest.fixture
async def gateway(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        yield client


@pytest.fixture
async def signing_key(db: asyncpg.Connection) -> SigningKey:
    return await active_signing_key(db)


@contextlib.contextmanager
def extra_gateway_process(
    stack: Stack, name: str, env: dict[str, str]
) -> Iterator[tuple[ManagedProcess, str]]:
    """One more gateway worker on the session's stack, with `env` over the stack's settings;
    yields its process and URL, and stops it after."""
    port = free_port()
    base = stack.process("gateway")
    process = dataclasses.replace(
        base, name=name, popen=None,
        env={**base.env, **env, "GATEWAY_PORT": str(port), "GATEWAY_WORKERS": "1",
             "GATEWAY_SPOOL_DIR": str(stack.root / name / "spool")},
        ready=http_ready(f"http://127.0.0.1:{port}/readyz"),
        log_path=stack.root / "logs" / f"{name}.log")
    process.start()
    try:
        process.wait_ready()
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@contextlib.contextmanager
def extra_gateway(stack: Stack, name: str, env: dict[str, str]) -> Iterator[str]:
    """As `extra_gateway_process`, for a test that needs only the URL."""
    with extra_gateway_process(stack, name, env) as (_, url):
        yield url


SSE = {"accept": "text/event-stream"}

_LINK_REFUSED = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
             b"transfer-encoding: chunked\r\n\r\n")


class ScriptedRuntime(RawServer):
    @property
    def runs(self) -> list[dict[str, Any]]:
        """The JSON body of each run as this runtime received it, and its path as `_path`."""
        found = []
        for request in self.requests:
            head, _, body = request.partition(b"\r\n\r\n")
            if not request.startswith(b"GET /link "):
                found.append({**orjson.loads(body), "_path": head.split(b" ")[1].decode()})
        return found


@contextlib.asynccontextmanager
async def scripted_runtime(
    events: bytes | None, *, then_hold: bool = False
) -> AsyncIterator[ScriptedRuntime]:
    """A runtime the test scripts, for a tenant made with its URL: it does not serve the runtime
    link (so runs come over HTTP/1.1), keeps what each run asked, and answers each with the SSE
    body `events`; with None it never answers, and with `then_hold` the answer stays open after
    `events`. A run held is let go when the gateway closes its connection."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await server.read_request(reader)) is not None:
            if request.startswith(b"GET /link "):
                writer.write(_LINK_REFUSED)
            elif events is None or then_hold:
                if events is not None:
                    writer.write(_SSE_HEAD + chunk(events))
                await server.wait_eof(reader)
                return
            else:
                writer.write(_SSE_HEAD + chunk(events) + b"0\r\n\r\n")

    server = ScriptedRuntime(handler)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def llm_stats(stack: Stack) -> dict[str, int]:
    """What the stack's mock LLM has seen: chat requests, streams open, completed, cancelled."""
    async with httpx.AsyncClient(timeout=10) as client:
        stats: dict[str, int] = (await client.get(
            stack.llm_url.removesuffix("/v1") + "/_stats")).json()
    return stats


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def leave_after_first_token(gateway_url: str, tenant: Tenant) -> str:
    """Start a slow chat, read until its first token and hang up; answers its request id."""
    async with (
        httpx.AsyncClient(base_url=gateway_url, timeout=30) as client,
        client.stream("POST", tenant.chat_path, json={"message": "Go slowly #slow"}, headers={
            **auth(tenant.secret_key), **SSE}) as response,
    ):
        request_id = response.headers["x-request-id"]
        async for text in response.aiter_text():
            if "event: token" in text:
                break
    return request_id


def sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse a whole SSE body into (event, data) pairs."""
    events = []
    for frame in body.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in frame.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data:
            events.append((name, orjson.loads("\n".join(data))))
    return events


class AuditReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    async def events(self, request_id: str, wait: float = 2.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + wait
        while True:
            found = []
            if self.path.exists():
                with open(self.path, "rb") as handle:
                    handle.seek(self.start)
                    found = [
                        record for line in handle if line.strip()
                        if (record := orjson.loads(line))["request_id"] == request_id
                    ]
            if found or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.05)


@pytest.fixture
def audit(stack: Stack) -> AuditReader:
    return AuditReader(stack.root / "logs" / "audit.jsonl")


class UsageReader:
    """Reads the usage topic from its beginning and finds events by request id."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic

    async def collect(
        self, request_ids: set[str], *, timeout: float = 20.0, settle: float = 0.0
    ) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + timeout
        settled_at: float | None = None
        async with self._consumer() as consumer:
            while time.monotonic() < deadline:
                _take(await consumer.getmany(timeout_ms=200), found, request_ids)
                if request_ids <= found.keys():
                    settled_at = settled_at or time.monotonic()
                    if time.monotonic() - settled_at >= settle:
                        break
        return found

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[dict[str, list[dict[str, Any]]]]:
        """Every event of the topic by request id, read in the background as they come, until
        the block ends (a test that stops the broker ends it after)."""
        found: dict[str, list[dict[str, Any]]] = {}
        async with self._consumer() as consumer:
            async def read() -> None:
                while True:
                    _take(await consumer.getmany(timeout_ms=200), found, None)

            reader = asyncio.create_task(read())
            try:
                yield found
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    @contextlib.asynccontextmanager
    async def _consumer(self) -> AsyncIterator[Any]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False, group_id=None,
        )
        await consumer.start()
        try:
            yield consumer
        finally:
            try:
                await consumer.stop()
            except asyncio.CancelledError:
                # aiokafka 0.14 awaits a fetch backing off from a broker gone away after
                # cancelling it, which raises here: only a cancellation of this task counts.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise


def _take(
    batches: dict[Any, list[Any]], found: dict[str, list[dict[str, Any]]],
    request_ids: set[str] | None,
) -> None:
    for records in batches.values():
        for record in records:
            event = orjson.loads(record.value)
            if request_ids is None or event["id"] in request_ids:
                assert record.key == event["data"]["tenant_id"].encode()
                found.setdefault(event["id"], []).append(event)


@pytest.fixture
def usage(stack: Stack) -> UsageReader:
    return UsageReader(stack.kafka_bootstrap, stack.settings.usage_topic)
