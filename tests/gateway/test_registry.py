"""The gateway's registry cache against a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from cmp import wire
from cmp.registry import AgentInstance
from devstack.procs import free_port
from gateway.errors import Unavailable
from gateway.registry import RegistryCache


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def publish(redis: aioredis.Redis, **changes: object) -> AgentInstance:
    instance = AgentInstance(**{
        "agent_id": str(uuid.uuid4()), "tenant_id": str(uuid.uuid4()), "name": "Helper",
        "runtime_url": "http://127.0.0.1:9/rt", "flow_id": "demo", "flow_version": 1,
        "allowed_origins": ("https://shop.example",), **changes,
    })
    await redis.set(wire.registry_key(instance.agent_id), orjson.dumps(instance.registry_entry()))
    return instance


@pytest.fixture
async def cmp_unreachable() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url="http://127.0.0.1:9", timeout=0.5) as client:
        yield client


async def test_entries_are_read_from_redis_and_cached_until_invalidated(
    redis: aioredis.Redis, cmp_unreachable: httpx.AsyncClient
) -> None:
    cache = RegistryCache(redis, cmp_unreachable, "token", timeout=1.0)
    instance = await publish(redis)
    entry = await cache.resolve(instance.agent_id)
    assert entry is not None and entry.tenant_id == instance.tenant_id
    assert entry.stream_path == "/rt/flows/demo/stream" and entry.runtime_port == 9
    assert entry.collection == f"tenant_{instance.tenant_id}_agent_{instance.agent_id}"
    suspended = await publish(redis, agent_id=instance.agent_id, tenant_id=instance.tenant_id,
                              status="suspended")
    assert (await cache.resolve(suspended.agent_id)).active  # type: ignore[union-attr]
    cache.invalidate(instance.agent_id)
    assert not (await cache.resolve(instance.agent_id)).active  # type: ignore[union-attr]


async def test_the_cache_stays_bounded(
    redis: aioredis.Redis, cmp_unreachable: httpx.AsyncClient
) -> None:
    cache = RegistryCache(redis, cmp_unreachable, "token", timeout=1.0, max_entries=5)
    instances = [await publish(redis) for _ in range(12)]
    for instance in instances:
        assert await cache.resolve(instance.agent_id) is not None
    assert len(cache) == 5
    # The newest stay; an evicted one is simply read again.
    assert (await cache.resolve(instances[0].agent_id)) is not None
    assert len(cache) == 5


async def test_an_unreachable_registry_is_503_with_retry_after(
    redis: aioredis.Redis, cmp_unreachable: httpx.AsyncClient
) -> None:
    """Redis down, or the entry missing from Redis and the CMP down: the chat is refused as
    the contract says of a dependency that is down, with when to retry."""
    gone = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        for cache in (RegistryCache(gone, cmp_unreachable, "token", timeout=1.0),
                      RegistryCache(redis, cmp_unreachable, "token", timeout=1.0)):
            with pytest.raises(Unavailable, match="the agent registry is unreachable") as caught:
                await cache.resolve(str(uuid.uuid4()))
            assert caught.value.status == 503
            assert (b"retry-after", b"1") in caught.value.headers
    finally:
        await gone.aclose()
