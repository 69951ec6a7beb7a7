"""The gateway and the CMP on a Redis Cluster of three shards (GATEWAY_REDIS_CLUSTER,
CMP_REDIS_CLUSTER): registry entries and revocations the CMP's code writes reach a gateway
worker through the cluster, and the worker's buckets live on the shard of each tenant's slot."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import redis.asyncio as aioredis
from redis.crc import key_slot

from cmp import wire
from cmp.apikeys import revoke_key
from cmp.registry import Limits
from devstack.redis_cluster import ThreeShards
from devstack.seed import create_tenant_agent
from devstack.stack import Stack
from ratelimit import BucketLimit
from ratelimit.cluster import tenant_slot
from ratelimit.keys import tenant_bucket_key
from tests.e2e.conftest import SSE, auth, extra_gateway, sse_events

BURST = 3
LIMITS = Limits(tenant=BucketLimit(1e-6, BURST), key=BucketLimit(1000, 1000))
BODY = {"message": "hello"}


async def test_a_gateway_on_a_redis_cluster_limits_and_hears_revocations(
    stack: Stack, db: asyncpg.Connection, redis_cluster: ThreeShards,
    redis_cluster_client: aioredis.RedisCluster,
) -> None:
    tenants = [
        await create_tenant_agent(db, redis_cluster_client, stack, name=f"Shop {n}",
                                  origin=f"http://shop{n}.example", limits=LIMITS)
        for n in range(3)
    ]
    for made in tenants:  # written through the cluster client, to the shard of each key
        assert await redis_cluster_client.get(wire.registry_key(made["agent_id"]))
    env = {"GATEWAY_REDIS_URL": redis_cluster.url, "GATEWAY_REDIS_CLUSTER": "on"}
    with extra_gateway(stack, "gateway-redis-cluster", env) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for made in tenants:
                path = f"/v1/agents/{made['agent_id']}/chat"
                headers = {**auth(made["secret_key"]), **SSE}
                statuses = []
                for _ in range(BURST + 2):
                    response = await client.post(path, json=BODY, headers=headers)
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        events = sse_events(response.text)
                        assert events[-1][0] == "end", response.text
                assert statuses == [200] * BURST + [429] * 2, statuses
                # The tenant's bucket is on the shard that serves its slot, and only there.
                owner = await redis_cluster.owner(tenant_slot(made["tenant_id"]))
                holders = [
                    shard.port for shard in redis_cluster.shards
                    if tenant_bucket_key(made["tenant_id"]) in await shard.command(
                        "CLUSTER", "GETKEYSINSLOT", tenant_slot(made["tenant_id"]), 10)
                ]
                assert holders == [owner.port]

            # A revocation published on the cluster reaches the worker's subscription.
            made = tenants[0]
            await revoke_key(db, redis_cluster_client, tenant_id=made["tenant_id"],
                             key_id=made["secret_key_id"])
            assert made["secret_key_id"] in {
                m.decode() for m in await redis_cluster_client.smembers(wire.REVOKED_SET)
            }
            await asyncio.sleep(1.0)
            refused = await client.post(f"/v1/agents/{made['agent_id']}/chat", json=BODY,
                                        headers=auth(made["secret_key"]))
            assert refused.status_code == 401, refused.text
            assert "revoked" in refused.json()["error"]["message"]


async def test_a_gateway_not_told_of_the_cluster_fails_closed_and_says_why(
    stack: Stack, db: asyncpg.Connection, redis_cluster: ThreeShards,
    redis_cluster_client: aioredis.RedisCluster,
) -> None:
    """Pointed at a node of a cluster as if it were one Redis, a worker refuses chats whose
    registry entry or buckets live on another shard (503 and Retry-After), and its log names
    the redirection and the setting."""
    made = [
        await create_tenant_agent(db, redis_cluster_client, stack, name=f"Shop {n}",
                                  origin=f"http://shop{n}.example", limits=LIMITS)
        for n in range(10)  # random ids: all ten wholly on the first shard is 1 in 3.5 billion
    ]
    first = redis_cluster.shards[0]
    elsewhere = [
        m for m in made
        if await redis_cluster.owner(tenant_slot(m["tenant_id"])) is not first
        or await redis_cluster.owner(key_slot(wire.registry_key(m["agent_id"]).encode()))
        is not first
    ][0]
    env = {"GATEWAY_REDIS_URL": redis_cluster.url, "GATEWAY_REDIS_CLUSTER": "off"}
    with extra_gateway(stack, "gateway-redis-not-cluster", env) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            refused = await client.post(f"/v1/agents/{elsewhere['agent_id']}/chat", json=BODY,
                                        headers=auth(elsewhere["secret_key"]))
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"]
    logged = (stack.root / "logs" / "gateway-redis-not-cluster.log").read_text()
    assert "MovedError" in logged or "moved the bucket's slot" in logged, logged
    assert "set GATEWAY_REDIS_CLUSTER=on" in logged, logged


async def test_a_chat_during_a_resharding_waits_for_its_buckets_instead_of_failing(
    stack: Stack, db: asyncpg.Connection, redis_cluster: ThreeShards,
    redis_cluster_client: aioredis.RedisCluster,
) -> None:
    """Mid-migration, the tenant's bucket moved and its key's not yet (both nodes answer
    TRYAGAIN): the chat waits for the rest of the slot's keys, then streams its answer."""
    made = await create_tenant_agent(db, redis_cluster_client, stack, name="Shop",
                                     origin="http://shop.example", limits=LIMITS)
    path, headers = f"/v1/agents/{made['agent_id']}/chat", {**auth(made["secret_key"]), **SSE}
    slot = tenant_slot(made["tenant_id"])
    env = {"GATEWAY_REDIS_URL": redis_cluster.url, "GATEWAY_REDIS_CLUSTER": "on"}
    with extra_gateway(stack, "gateway-redis-resharding", env) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            first = await client.post(path, json=BODY, headers=headers)
            assert first.status_code == 200, first.text  # both buckets exist now
            source = await redis_cluster.owner(slot)
            target = next(s for s in redis_cluster.shards if s is not source)
            await redis_cluster.move_slot(slot, target, keys=False, finish=False)
            await source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS",
                                 tenant_bucket_key(made["tenant_id"]))
            chat = asyncio.ensure_future(client.post(path, json=BODY, headers=headers))
            await asyncio.sleep(0.05)  # refused meanwhile: the buckets are split
            assert not chat.done()
            await redis_cluster.move_slot(slot, target)  # the rest moves, the slot is handed over
            answered = await chat
    assert answered.status_code == 200, answered.text
    assert sse_events(answered.text)[-1][0] == "end"
    assert answered.headers["ratelimit-remaining"] == str(BURST - 2)
