"""Dependencies failing under the gateway: Kafka, Redis and the runtime stopped and brought back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from cmp.registry import BucketLimit, Limits
from devstack.stack import Stack
from tests.e2e.conftest import SSE, MakeTenant, Tenant, UsageReader, auth, sse_events


async def chat(client: httpx.AsyncClient, tenant: Tenant, message: str) -> httpx.Response:
    return await client.post(tenant.chat_path, json={"message": message},
                             headers=auth(tenant.secret_key))


@dataclass(frozen=True)
class Done:
    request_id: str
    started: float
    ended: float
    output_tokens: int


async def test_kafka_stopped_and_restarted_mid_load_loses_no_usage_event(
    stack: Stack, make_tenant: MakeTenant, usage: UsageReader
) -> None:
    """Chats go on, four at a time, while the broker stops and starts again. The embedded
    broker keeps its log in memory, so what it acked before it stopped is gone after its
    restart: the test reads the topic as it goes until the broker has stopped. Every chat that
    ends once the broker is stopped must have its event in the new log; what is read before
    the stop must be there once. Events come at least once: one usage record per chat once
    copies (the same event id) are dropped, as the usage consumer drops them. A chat that
    ended just before the stop, its event acked but not yet read, is counted by neither."""
    tenant = await make_tenant(Limits(tenant=BucketLimit(1000, 1000), key=BucketLimit(1000, 1000)))
    done: list[Done] = []
    enough = asyncio.Event()

    async def chatter(client: httpx.AsyncClient, message: str) -> None:
        while not enough.is_set():
            started = time.monotonic()
            response = await chat(client, tenant, message)
            assert response.status_code == 200, response.text
            answer = response.json()
            done.append(Done(answer["request_id"], started, time.monotonic(),
                             answer["usage"]["output_tokens"]))

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(60):
            while not condition():
                for task in chatters:
                    if task.done():
                        task.result()  # a chat that failed fails the test now
                await asyncio.sleep(0.02)

    def spanning(moment: float) -> list[Done]:
        return [d for d in done if d.started < moment < d.ended]

    kafka = stack.process("kafka")
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        # Two chatters go at the mock LLM's pace; two take two seconds a chat (#slow, 3 tokens).
        chatters = [asyncio.create_task(chatter(client, message)) for message in (
            "load", "more load", "Take your time #slow #tokens=3", "Slowly now #slow #tokens=3")]
        try:
            async with usage.watching() as seen:
                await until(lambda: len(done) >= 10)
                read_before = {d.request_id for d in done}
                await until(lambda: read_before <= seen.keys())
                await asyncio.to_thread(kafka.stop)
                stopped_at = time.monotonic()
            await until(lambda: len(spanning(stopped_at)) >= 2
                        and sum(d.started > stopped_at for d in done) >= 10)
            await asyncio.to_thread(stack.start_process, "kafka")
            restarted_at = time.monotonic()
            await until(lambda: len(spanning(restarted_at)) >= 2
                        and sum(d.started > restarted_at for d in done) >= 10)
        finally:
            enough.set()
            await asyncio.gather(*chatters)
    read = {rid: len(seen[rid]) for rid in seen.keys() & {d.request_id for d in done}}
    assert read_before <= read.keys() and set(read.values()) == {1}
    after = {d.request_id: d for d in done if d.ended > stopped_at}
    found = await usage.collect(set(after), timeout=60, settle=1.0)
    missing = sorted(set(after) - found.keys())
    assert not missing, f"{len(missing)} of {len(after)} chats have no usage event: {missing}"
    for request_id, events in found.items():
        assert all(event == events[0] for event in events), events  # copies of one event
        data = events[0]["data"]
        assert (data["status"], data["tenant_id"], data["output_tokens"]) == (
            "completed", tenant.tenant_id, after[request_id].output_tokens)


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
    kill -9 of every gateway process, the restarted gateway delivers them. The kill comes as
    soon as the last answer's end arrived (streamed: with its connection still open): the
    event was written before the end was sent."""
    stack.process("kafka").stop()
    completed = []
    try:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            for i in range(10):
                if i % 2 == 0:
                    response = await chat(client, tenant, f"before the crash {i}")
                    assert response.status_code == 200, response.text
                    completed.append(response.json()["request_id"])
                    continue
                async with client.stream(
                    "POST", tenant.chat_path, json={"message": f"before the crash {i}"},
                    headers={**auth(tenant.secret_key), **SSE},
                ) as streamed:
                    assert streamed.status_code == 200
                    body = ""
                    async for text in streamed.aiter_text():
                        body += text
                        if "event: end" in body and body.endswith("\n\n"):
                            break
                    end = dict(sse_events(body))["end"]
                    completed.append(end["request_id"])
                    if i == 9:  # the last chat: kill the gateway while its stream is open
                        stack.process("gateway").kill()
    finally:
        stack.start_process("kafka")
        if not stack.process("gateway").running:
            stack.start_process("gateway")
    found = await usage.collect(set(completed), timeout=60)
    missing = [i for i, rid in enumerate(completed) if rid not in found]
    assert not missing, f"requests {missing} lost their usage event"
