"""Agents of an earlier `make up` follow the runtime to the port of this one."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis

from cmp import wire
from cmp.registry import load_instance, publish_entry, save_instance
from devstack.seed import create_tenant_agent, point_agents_at_runtime
from devstack.stack import Stack
from tests.e2e.conftest import SSE, auth, sse_events

# Where an earlier run's runtime listened: nothing answers there now.
EARLIER_RUNTIME = "http://127.0.0.1:9"


async def chat_status(stack: Stack, agent_id: str, key: str) -> tuple[int, list[str]]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        response = await client.post(f"/v1/agents/{agent_id}/chat",
                                     json={"message": "Hello there #tokens=3"},
                                     headers={**auth(key), **SSE})
    events = sse_events(response.text) if response.status_code == 200 else []
    return response.status_code, [name for name, _ in events]


async def test_agents_on_an_earlier_runtime_port_move_to_this_one(stack: Stack) -> None:
    conn = await asyncpg.connect(stack.database_url)
    redis = aioredis.from_url(stack.redis_url)
    try:
        made = await create_tenant_agent(conn, redis, stack, name="Moved shop",
                                         origin="http://moved.example")
        agent_id = made["agent_id"]
        earlier = await save_instance(conn, dataclasses.replace(
            await load_instance(conn, agent_id), runtime_url=EARLIER_RUNTIME))
        await publish_entry(redis, earlier)
        status, _ = await chat_status(stack, agent_id, made["secret_key"])
        assert status == 503

        assert await point_agents_at_runtime(stack) >= 1

        moved = await load_instance(conn, agent_id)
        assert moved.runtime_url == stack.runtime_url and moved.version == earlier.version + 1
        entry = await redis.get(wire.registry_key(agent_id))
        assert entry is not None and orjson.loads(entry)["runtime_url"] == stack.runtime_url
        # Gateways drop their cached copy when the invalidation reaches them.
        deadline = time.monotonic() + 5
        while (answer := await chat_status(stack, agent_id, made["secret_key"]))[0] == 503:
            assert time.monotonic() < deadline, "the gateway still routes to the earlier port"
            await asyncio.sleep(0.1)
        status, events = answer
        assert status == 200 and events[-1] == "end" and set(events[:-1]) == {"token"}
        assert await point_agents_at_runtime(stack) == 0
    finally:
        await redis.aclose()
        await conn.close()
