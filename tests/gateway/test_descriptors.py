"""A worker with no file descriptor left (its open-files limit reached, as with thousands of
open streams) refuses new chats with a 503 that names the cause, tells the operator which limit
to raise, and recovers by itself once descriptors are free again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from devstack.procs import free_port
from gateway.http import ChatCycle
from gateway.metrics import GatewayMetrics
from gateway.relay import ChatRequest, Relay
from gateway.upstream import UpstreamNoDescriptors, UpstreamPool
from gateway.usage import UsageRecord
from tests.gateway.test_http_cycle import Protocol


@contextlib.contextmanager
def no_free_descriptors() -> Iterator[None]:
    """Lower this process's open-files limit to its lowest free descriptor number, so the
    next socket cannot be made; the descriptors already open stay usable."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    listing = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        used = {int(name) for name in os.listdir(listing)} - {listing}
    finally:
        os.close(listing)
    lowest_free = min(set(range(max(used) + 2)) - used)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Usage:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def emit(self, record: UsageRecord) -> None:
        self.records.append(record)


def chat(port: int) -> ChatRequest:
    agent = SimpleNamespace(runtime_host="127.0.0.1", runtime_port=port,
                            stream_path="/flows/f/stream", tenant_id="t1", agent_id="a1",
                            collection="c1")
    key = SimpleNamespace(tenant_id="t1", agent_id="a1", key_id="k1")
    access: Any = SimpleNamespace(agent=agent, key=key)
    return ChatRequest(request_id="r1", access=access, message="hi", session_id="s1",
                       streamed=True, response_headers=[(b"x-request-id", b"r1")])


async def test_the_pool_names_the_missing_descriptors() -> None:
    pool, url = UpstreamPool(), f"http://127.0.0.1:{free_port()}/"
    with no_free_descriptors(), pytest.raises(UpstreamNoDescriptors) as caught:
        await pool.request("GET", url)
    assert "Too many open files" in str(caught.value)
    await pool.aclose()


async def answer(relay: Relay, request: ChatRequest) -> tuple[int, bytes]:
    protocol = Protocol()
    cycle: Any = ChatCycle(
        protocol, None, GatewayMetrics(), "a1", [], keep_alive=True,  # type: ignore[arg-type]
        expect_continue=False,
    )
    cycle.body_complete()
    status = await relay.run(request, cycle)
    return status, b"".join(protocol.transport.written)


async def test_a_chat_without_descriptors_gets_503_and_the_operator_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = Usage()
    relay = Relay(UpstreamPool(), usage, GatewayMetrics(), runtime_token="token")  # type: ignore[arg-type]
    port = free_port()
    with caplog.at_level(logging.ERROR, logger="sitekit.gateway"), no_free_descriptors():
        first = await answer(relay, chat(port))
        second = await answer(relay, chat(port))
    for status, response in (first, second):
        head, _, body = response.partition(b"\r\n\r\n")
        assert status == 503 and head.startswith(b"HTTP/1.1 503")
        assert b"retry-after: 1" in head.lower()
        error = orjson.loads(body)["error"]
        assert error == {"code": "unavailable", "request_id": "r1",
                         "message": "the gateway has no free connections; retry shortly"}
    warnings = [r.getMessage() for r in caplog.records if "RLIMIT_NOFILE" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per interval, not once per chat
    assert "each open chat takes one (two over GATEWAY_RUNTIME_TRANSPORT=http)" in warnings[0]
    assert [r.status for r in usage.records] == ["failed", "failed"]

    # Descriptors free again: the same relay reaches the runtime again (here one that hangs up).
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    async with server:
        status, response = await answer(relay, chat(port))
    assert status == 502 and b"no free connections" not in response
