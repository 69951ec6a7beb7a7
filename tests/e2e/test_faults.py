"""Dependencies failing under the gateway: Kafka, Redis and the runtime stopped and brought back."""

from __future__ import annotations

import asyncio
import time

import httpx

from devstack.stack import Stack
from tests.e2e.conftest import SSE, Tenant, UsageReader, auth, sse_events


async def chat(client: httpx.AsyncClient, tenant: Tenant, message: str) -> httpx.Response:
    return await client.post(tenant.chat_path, json={"message": message},
                             headers=auth(tenant.secret_key))


async def test_kafka_stopped_mid_load_loses_no_usage_event(
    stack: Stack, tenant: Tenant, usage: UsageReader
) -> None:
    """The embedded broker keeps its log in memory, so what it acked before it stops is gone
    after its restart: the test reads those events before stopping it, then checks that every
    request made while it was down or after is delivered once it is back."""
    before: list[str] = []
    during_and_after: list[str] = []

    async def load(client: httpx.AsyncClient, rounds: int, into: list[str]) -> None:
        for i in range(rounds):
            response = await chat(client, tenant, f"load {i}")
            assert response.status_code == 200, response.text
            into.append(response.json()["request_id"])

    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        await load(client, 10, before)
        seen = await usage.collect(set(before))
        assert {rid: len(events) for rid, events in seen.items()} == dict.fromkeys(before, 1)
        stack.process("kafka").stop()
        # Requests go on while the broker is down: their events wait in the gateway's spool.
        await load(client, 15, during_and_after)
        stack.start_process("kafka")
        await load(client, 10, during_and_after)
    found = await usage.collect(set(during_and_after), timeout=60)
    missing = [i for i, rid in enumerate(during_and_after) if rid not in found]
    assert not missing, f"requests {missing} of {len(during_and_after)} have no usage event"
    assert all(e[0]["data"]["status"] == "completed" for e in found.values())


async def test_redis_down_gives_503_and_recovers_without_a_restart(
    stack: Stack, gateway: httpx.AsyncClient, tenant: Tenant
) -> None:
    assert (await chat(gateway, tenant, "before")).status_code == 200
    stack.process("redis").stop()
    try:
        response = await chat(gateway, tenant, "during")
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert int(response.headers["retry-after"]) >= 1
        ready = await gateway.get("/readyz")
        assert ready.status_code == 503
    finally:
        stack.start_process("redis")
    # Redis came back empty: the CMP publishes the registry again, the gateway reconnects.
    statuses: list[int] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        statuses.append((await chat(gateway, tenant, "after")).status_code)
        if statuses[-1] == 200:
            break
        await asyncio.sleep(0.2)
    assert statuses[-1] == 200, statuses
    assert set(statuses) <= {200, 503}


async def test_runtime_killed_mid_stream_sends_an_error_event_and_a_failed_usage_event(
    stack: Stack, tenant: Tenant
) -> None:
    body = ""
    async with (
        httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client,
        client.stream("POST", tenant.chat_path, json={"message": "Take your time #slow"},
                      headers={**auth(tenant.secret_key), **SSE}) as response,
    ):
        request_id = response.headers["x-request-id"]
        status = response.status_code
        async for text in response.aiter_text():
            body += text
            if "event: token" in body and stack.process("runtime").running:
                stack.process("runtime").kill()
    events = sse_events(body)
    assert events and events[0][0] == "token", (status, body)
    assert events[-1][0] == "error"
    assert events[-1][1]["code"] == "runtime_error"
    assert events[-1][1]["request_id"] == request_id
    found = await UsageReader(stack.kafka_bootstrap, stack.settings.usage_topic).collect(
        {request_id})
    assert found[request_id][0]["data"]["status"] == "failed"


async def test_runtime_down_before_the_request_is_503(
    stack: Stack, gateway: httpx.AsyncClient, tenant: Tenant
) -> None:
    stack.process("runtime").stop()
    response = await chat(gateway, tenant, "anyone there?")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    assert response.headers["retry-after"]


async def test_kill_9_of_the_gateway_loses_no_usage_event(
    stack: Stack, tenant: Tenant, usage: UsageReader
) -> None:
    """Events of answered requests sit in the gateway's spool while Kafka is down; after a
    kill -9 of every gateway process, straight after the last answer arrived, the restarted
    gateway delivers them: each event is written before its client receives the answer."""
    stack.process("kafka").stop()
    completed = []
    try:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            for i in range(10):
                response = await chat(client, tenant, f"before the crash {i}")
                assert response.status_code == 200, response.text
                completed.append(response.json()["request_id"])
        stack.process("gateway").kill()
    finally:
        stack.start_process("kafka")
        if not stack.process("gateway").running:
            stack.start_process("gateway")
    found = await usage.collect(set(completed), timeout=60)
    missing = [i for i, rid in enumerate(completed) if rid not in found]
    assert not missing, f"requests {missing} lost their usage event"
