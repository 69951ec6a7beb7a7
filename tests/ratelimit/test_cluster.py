"""On a Redis Cluster node, the two-key script runs without CROSSSLOT errors.

A one-node cluster (all 16384 slots on one server) enforces the same-slot rule for scripts,
so a plain client can show both the rule and that the limiter's keys obey it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from devstack import services
from devstack.procs import free_port
from ratelimit import BucketLimit, BucketLimiter
from ratelimit.keys import key_bucket_key, tenant_bucket_key
from ratelimit.script import BUCKETS_LUA
from tests.ratelimit.conftest import STILL, WIDE


async def command(client: aioredis.Redis, *args: str | int) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
async def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """One node for the module: a master takes 2 s after getting its slots to report ok."""
    tmp_path = tmp_path_factory.mktemp("redis-cluster")
    port = free_port()
    plain = services.redis(port, tmp_path)
    node = dataclasses.replace(
        plain,
        name="redis-cluster-node",
        argv=[
            *plain.argv,
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(tmp_path / "nodes.conf"),
            # The bus defaults to port + 10000, which a free port above 55535 cannot have.
            "--cluster-port", str(free_port()),
        ],
    )  # fmt: skip
    node.start()
    try:
        node.wait_ready(30)
        url = f"redis://127.0.0.1:{port}/0"
        client = aioredis.Redis.from_url(url, decode_responses=True)
        await command(client, "CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        async with asyncio.timeout(10):
            while "cluster_state:ok" not in await command(client, "CLUSTER", "INFO"):
                await asyncio.sleep(0.05)
        await client.aclose()
        yield url
    finally:
        node.stop()


async def test_bucket_keys_of_a_tenant_map_to_one_slot(cluster_url: str) -> None:
    client = aioredis.Redis.from_url(cluster_url)
    slots = {
        await command(client, "CLUSTER", "KEYSLOT", name)
        for name in (tenant_bucket_key("acme"), key_bucket_key("acme", "k1"), "{acme}")
    }
    await client.aclose()
    assert len(slots) == 1


async def test_the_limiter_runs_on_a_cluster_node(cluster_url: str) -> None:
    limiter = BucketLimiter.from_url(cluster_url)
    try:
        decisions = await asyncio.gather(
            *(
                limiter.check(f"tenant{i % 5}", f"key{i}", WIDE, BucketLimit(STILL, 1))
                for i in range(50)
            )
        )
    finally:
        await limiter.aclose()
    assert all(d.allowed for d in decisions)


async def test_keys_without_a_shared_tag_are_refused_by_the_cluster(cluster_url: str) -> None:
    """The control: the node does enforce the rule the hash tags exist for."""
    client = aioredis.Redis.from_url(cluster_url)
    try:
        with pytest.raises(ResponseError, match="slot"):
            await client.eval(BUCKETS_LUA, 2, "rl:acme:t", "rl:acme:k:k1", 1, 10, 1, 10, 1)
    finally:
        await client.aclose()
