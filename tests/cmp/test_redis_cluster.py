"""The CMP's Redis writes on a Redis Cluster of three shards (CMP_REDIS_CLUSTER): an entry and
its announcement, and getting back what a shard lost."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from cmp import wire
from cmp.apikeys import issue_key, revoke_key
from cmp.app import _keep_redis_in_sync
from cmp.config import CmpConfig
from cmp.redis_clients import synced_markers
from cmp.registry import AgentInstance, publish_entry
from devstack.redis_cluster import RANGES, Shard, ThreeShards
from tests.cmp.conftest import make_agent


def test_the_setting_is_named() -> None:
    base = {"CMP_DATABASE_URL": "postgresql://x", "CMP_SERVICE_TOKEN": "t"}
    assert CmpConfig.from_env({**base, "CMP_REDIS_CLUSTER": "on"}).redis_cluster
    assert not CmpConfig.from_env(base).redis_cluster
    with pytest.raises(Exception, match="CMP_REDIS_CLUSTER must be on or off, got 'yes'"):
        CmpConfig.from_env({**base, "CMP_REDIS_CLUSTER": "yes"})
    with pytest.raises(Exception, match="CMP_REDIS_URL: Redis Cluster has database 0 only"):
        CmpConfig.from_env(
            {**base, "CMP_REDIS_CLUSTER": "on", "CMP_REDIS_URL": "redis://127.0.0.1:7000/3"})


async def test_an_entry_is_written_before_it_is_announced(
    conn: asyncpg.Connection, redis_cluster_client: aioredis.RedisCluster
) -> None:
    cluster = redis_cluster_client
    agent = await make_agent(conn)
    pubsub = cluster.pubsub()
    await pubsub.subscribe(wire.REGISTRY_CHANNEL)
    await publish_entry(cluster, agent)
    message = None
    async with asyncio.timeout(5):
        while message is None or message["type"] != "message":
            message = await pubsub.get_message(timeout=0.2)
    assert message["data"].decode() == agent.agent_id
    entry = orjson.loads(await cluster.get(wire.registry_key(agent.agent_id)))
    assert entry["tenant_id"] == agent.tenant_id
    await pubsub.aclose()


async def test_a_shard_that_lost_its_data_gets_it_back(
    conn: asyncpg.Connection, database_url: str, redis_cluster: ThreeShards,
    redis_cluster_client: aioredis.RedisCluster,
) -> None:
    cluster = redis_cluster_client
    agents = [await make_agent(conn) for _ in range(9)]
    for agent in agents:
        await publish_entry(cluster, agent)
    issued = await issue_key(conn, issuer="sitekit-test", tenant_id=agents[0].tenant_id,
                             agent_id=agents[0].agent_id, kind="secret")
    await revoke_key(conn, cluster, tenant_id=agents[0].tenant_id, key_id=issued.key.key_id)

    markers = await synced_markers(cluster)
    assert [
        next(i for i, (first, last) in enumerate(RANGES) if first <= key_slot(m.encode()) <= last)
        for m in markers
    ] == [0, 1, 2]  # one marker on each shard

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    stopping = asyncio.Event()
    syncing = asyncio.create_task(_keep_redis_in_sync(pool, cluster, stopping))
    try:
        async with asyncio.timeout(5):
            while not all([await cluster.exists(m) for m in markers]):
                await asyncio.sleep(0.05)
        # A shard restarted empty: one that holds entries, and not the key a single marker
        # would be (so a single marker would not notice).
        single = key_slot(wire.SYNCED_MARKER.encode())
        holding = {
            shard.port: [a for a in agents if await shard_holds(shard, entry_slot(a))]
            for shard in redis_cluster.shards
        }
        lost = [
            shard for shard in redis_cluster.shards
            if holding[shard.port] and not await shard_holds(shard, single)
        ][0]
        lost_agents = holding[lost.port]
        await lost.command("FLUSHALL")
        assert not await cluster.get(wire.registry_key(lost_agents[0].agent_id))
        # The lost shard's marker went with its data; the sync sets the markers again last,
        # after the entries and the revocations.
        async with asyncio.timeout(5):
            while not all([await cluster.exists(m) for m in markers]):
                await asyncio.sleep(0.05)
        assert all([await cluster.get(wire.registry_key(a.agent_id)) for a in agents])
        assert await cluster.sismember(wire.REVOKED_SET, issued.key.key_id)
    finally:
        stopping.set()
        await syncing
        await pool.close()


def entry_slot(agent: AgentInstance) -> int:
    return key_slot(wire.registry_key(agent.agent_id).encode())


async def shard_holds(shard: Shard, slot: int) -> bool:
    """Whether the shard serves the slot."""
    slots = await shard.command("CLUSTER", "SLOTS")
    return any(int(first) <= slot <= int(last) and int(primary[1]) == shard.port
               for first, last, primary, *_ in slots)
