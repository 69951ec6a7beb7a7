"""Signing-key rotation seen by running gateways, and a graceful shutdown with streams open."""

from __future__ import annotations

import asyncio
import signal

import asyncpg
import httpx
import jwt
import redis.asyncio as aioredis

from cmp.apikeys import issue_key
from cmp.signing import retire_signing_key, rotate_signing_key
from devstack.stack import Stack
from tests.e2e.conftest import (
    SSE,
    Tenant,
    UsageReader,
    auth,
    extra_gateway_process,
    sse_events,
)


async def fresh_statuses(stack: Stack, tenant: Tenant, key: str, count: int = 4) -> list[int]:
    """Statuses of `count` requests on new connections, so both workers answer some."""
    statuses = []
    for _ in range(count):
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            response = await client.post(tenant.chat_path, json={"message": "hi"},
                                         headers=auth(key))
            statuses.append(response.status_code)
    return statuses


async def test_signing_key_rotation_and_retirement_reach_running_gateways(
    stack: Stack, tenant: Tenant, db: asyncpg.Connection, stack_redis: aioredis.Redis
) -> None:
    old_kid = jwt.get_unverified_header(tenant.secret_key)["kid"]
    await rotate_signing_key(db, stack_redis)
    fresh = await issue_key(db, issuer=stack.settings.issuer, tenant_id=tenant.tenant_id,
                            agent_id=tenant.agent_id, kind="secret")
    await asyncio.sleep(0.5)
    assert await fresh_statuses(stack, tenant, fresh.token) == [200] * 4
    assert await fresh_statuses(stack, tenant, tenant.secret_key) == [200] * 4
    await retire_signing_key(db, stack_redis, old_kid)
    await asyncio.sleep(0.5)
    assert await fresh_statuses(stack, tenant, tenant.secret_key) == [401] * 4
    assert await fresh_statuses(stack, tenant, fresh.token) == [200] * 4


async def test_shutdown_drains_open_streams_and_keeps_their_usage(
    stack: Stack, tenant: Tenant, usage: UsageReader
) -> None:
    gateway = stack.process("gateway")

    async def stream() -> tuple[str, str]:
        async with (
            httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client,
            client.stream("POST", tenant.chat_path,
                          json={"message": "A longer answer please #tokens=200"},
                          headers={**auth(tenant.secret_key), "accept": "text/event-stream"}
                          ) as response,
        ):
            body = "".join([text async for text in response.aiter_text()])
            return response.headers["x-request-id"], f"{response.status_code}\n\n{body}"

    try:
        streams = [asyncio.create_task(stream()) for _ in range(4)]
        await asyncio.sleep(0.3)
        gateway.signal(signal.SIGTERM)
        results = await asyncio.gather(*streams)
        for _, body in results:
            assert body.startswith("200") and sse_events(body)[-1][0] == "end", body[-300:]
        assert gateway.popen is not None
        await asyncio.to_thread(gateway.popen.wait, 30)
        found = await usage.collect({rid for rid, _ in results})
        assert {e[0]["data"]["status"] for e in found.values()} == {"completed"}
    finally:
        gateway.stop()
        stack.start_process("gateway")


DRAIN_S = 3  # GATEWAY_DRAIN_TIMEOUT_S of the gateway the next test stops


async def refused_connection(url: str) -> bool:
    """Whether a new connection to `url` is refused, tried for a while."""
    for _ in range(50):
        try:
            async with httpx.AsyncClient(base_url=url, timeout=1) as client:
                await client.get("/healthz")
        except httpx.ConnectError:
            return True
        except httpx.RemoteProtocolError:
            # Taken into the listener's backlog just as it closed: dropped unanswered. The
            # next try shows whether the listener is gone.
            pass
        await asyncio.sleep(0.02)
    return False


async def test_shutdown_cuts_a_stream_at_the_drain_bound_and_refuses_new_connections(
    stack: Stack, tenant: Tenant, usage: UsageReader
) -> None:
    """SIGTERM: new connections are refused at once; a stream still open after the drain
    bound is cut there with an error event that says why, and the worker exits."""
    env = {"GATEWAY_DRAIN_TIMEOUT_S": str(DRAIN_S)}
    with extra_gateway_process(stack, "gateway-short-drain", env) as (process, url):
        body, tokens_after_refusal, refused = "", 0, False
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as client,
            client.stream("POST", tenant.chat_path, json={"message": "Take your time #slow"},
                          headers={**auth(tenant.secret_key), **SSE}) as response,
        ):
            request_id = response.headers["x-request-id"]
            async for text in response.aiter_text():
                body += text
                if refused:
                    tokens_after_refusal += text.count("event: token")
                elif "event: token" in body:
                    process.signal(signal.SIGTERM)
                    refused = await refused_connection(url)
                    assert refused
        assert process.popen is not None
        # Shut down, uvicorn raises the signal it caught again: the worker ends by SIGTERM.
        exit_code = await asyncio.to_thread(process.popen.wait, 30)
        assert exit_code in (0, -signal.SIGTERM)
    events = sse_events(body)
    assert events[-1] == ("error", {
        "code": "unavailable", "request_id": request_id,
        "message": "the gateway is shutting down; the answer was cut short"})
    assert {name for name, _ in events[:-1]} == {"token"}
    assert 2 <= len(events) - 1 < 40  # the answer has 40 tokens, one a second
    assert tokens_after_refusal >= 1  # the stream went on while new connections were refused
    found = await usage.collect({request_id})
    assert found[request_id][0]["data"]["status"] == "failed"
