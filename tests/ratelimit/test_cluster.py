"""The limiter on Redis Cluster.

A one-node cluster (all 16384 slots on one server) enforces the same-slot rule for scripts,
so a plain client can show both the rule and that the limiter's keys obey it. On a cluster of
three shards (the `redis_cluster` fixture), ClusterLimiter sends each tenant's checks to the
shard of its slot, stays exact there, and follows a slot that moves, or is being moved, with
the tenant's buckets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from devstack import services
from devstack.procs import free_port
from devstack.redis_cluster import RANGES, Shard, ThreeShards
from ratelimit import BucketLimit, BucketLimiter, LimiterMigrating, LimiterUnavailable
from ratelimit.cluster import MIGRATION_WAIT_S, ClusterLimiter, tenant_slot
from ratelimit.errors import LimiterRedirected
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


# --- three shards ------------------------------------------------------------------------------


def tenant_on(shard_index: int, skip: int = 0) -> str:
    """A tenant id whose slot is in the shard's first range (before any slot moved)."""
    first, last = RANGES[shard_index]
    found = (f"tenant-{n}" for n in range(100_000) if first <= tenant_slot(f"tenant-{n}") <= last)
    for _ in range(skip):
        next(found)
    return next(found)


async def spend(limiter: ClusterLimiter, tenant: str, count: int, limit: BucketLimit) -> int:
    decisions = await asyncio.gather(
        *(limiter.check(tenant, "k1", WIDE, limit) for _ in range(count))
    )
    return sum(d.allowed for d in decisions)


async def bucket_holder(cluster: ThreeShards, tenant: str) -> list[int]:
    """The ports of the shards that hold the tenant's bucket."""
    name, slot = tenant_bucket_key(tenant), tenant_slot(tenant)
    return [
        shard.port for shard in cluster.shards
        if name in await shard.command("CLUSTER", "GETKEYSINSLOT", slot, 100)
    ]


async def test_each_shard_admits_exactly_the_burst_of_its_tenants(
    redis_cluster: ThreeShards,
) -> None:
    tenants = [tenant_on(i, skip) for i in range(3) for skip in range(2)]
    burst = BucketLimit(STILL, 20)
    limiter = ClusterLimiter.from_url(redis_cluster.url, timeout=2.0)
    try:
        decisions = await asyncio.gather(
            *(limiter.check(t, f"key{n % 3}", burst, WIDE) for n in range(60) for t in tenants)
        )
        assert limiter.nodes == sorted(("127.0.0.1", s.port) for s in redis_cluster.shards)
    finally:
        await limiter.aclose()
    allowed = {t: 0 for t in tenants}
    for n, decision in enumerate(decisions):
        allowed[tenants[n % len(tenants)]] += decision.allowed
    assert allowed == {t: 20 for t in tenants}
    for i, tenant in enumerate(tenants):
        owner = redis_cluster.shards[i // 2]
        assert await owner.command("EXISTS", tenant_bucket_key(tenant)) == 1
        assert await bucket_holder(redis_cluster, tenant) == [owner.port]
    assert limiter.redirects == 0


async def test_a_limiter_for_one_redis_names_the_redirect(redis_cluster: ThreeShards) -> None:
    """Pointed at one node of a cluster, the single-Redis limiter refuses (the gateway answers
    503) and says why, rather than counting anything."""
    limiter = BucketLimiter.from_url(redis_cluster.url, timeout=2.0)
    tenant = tenant_on(2)
    try:
        with pytest.raises(LimiterRedirected, match="ClusterLimiter") as caught:
            await limiter.check(tenant, "k1", WIDE, WIDE)
    finally:
        await limiter.aclose()
    assert caught.value.slot == tenant_slot(tenant)
    assert caught.value.port == redis_cluster.shards[2].port
    assert not caught.value.ask
    assert await bucket_holder(redis_cluster, tenant) == []


async def test_the_limiter_follows_a_moved_slot_with_its_buckets(
    redis_cluster: ThreeShards,
) -> None:
    tenant, limit = tenant_on(0), BucketLimit(STILL, 10)
    limiter = ClusterLimiter.from_url(redis_cluster.url, timeout=2.0)
    try:
        assert await spend(limiter, tenant, 4, limit) == 4
        target = redis_cluster.shards[1]
        await redis_cluster.move_slot(tenant_slot(tenant), target)
        assert await bucket_holder(redis_cluster, tenant) == [target.port]
        # The first check after the move is redirected (MOVED); the bucket's level came along.
        assert await spend(limiter, tenant, 10, limit) == 6
        assert limiter.redirects >= 1
        redirects = limiter.redirects
        assert await spend(limiter, tenant, 3, limit) == 0
        assert limiter.redirects == redirects  # the map was read again: no more detours
    finally:
        await limiter.aclose()


async def test_a_check_during_a_migration_asks_the_target(redis_cluster: ThreeShards) -> None:
    """Mid-resharding, the tenant's buckets already on the target: the source answers ASK, and
    the check runs on the target once, after ASKING."""
    tenant, limit = tenant_on(1), BucketLimit(STILL, 10)
    slot, target = tenant_slot(tenant), redis_cluster.shards[2]
    limiter = ClusterLimiter.from_url(redis_cluster.url, timeout=2.0)
    try:
        assert await spend(limiter, tenant, 3, limit) == 3
        await redis_cluster.move_slot(slot, target, finish=False)
        assert await bucket_holder(redis_cluster, tenant) == [target.port]
        assert await spend(limiter, tenant, 4, limit) == 4
        assert limiter.redirects == 4
        assert await bucket_holder(redis_cluster, tenant) == [target.port]
        await redis_cluster.move_slot(slot, target)  # the operator finishes the resharding
        assert await spend(limiter, tenant, 5, limit) == 3
    finally:
        await limiter.aclose()


async def split_buckets(cluster: ThreeShards, tenant: str, target: Shard) -> Shard:
    """Start migrating the tenant's slot to `target` and move only the tenant's bucket: its
    key buckets stay behind (what a tool moving keys in batches leaves for a moment)."""
    slot = tenant_slot(tenant)
    source = await cluster.owner(slot)
    await cluster.move_slot(slot, target, keys=False, finish=False)
    await source.command(
        "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", tenant_bucket_key(tenant)
    )
    return source


async def refused_by_migration(limiter: ClusterLimiter, times: int) -> None:
    """Until the limiter has waited `times` times for a migration (TRYAGAIN)."""
    async with asyncio.timeout(2):
        while limiter.migration_waits < times:
            await asyncio.sleep(0.001)


async def level(shard: Shard, key: str) -> float:
    return round(float(await shard.command("HGET", key, "tokens")), 3)


async def test_a_check_waits_while_its_buckets_are_split_by_a_migration(
    redis_cluster: ThreeShards,
) -> None:
    """Mid-migration, the tenant's bucket on the target and its key's still on the source:
    both nodes answer TRYAGAIN. The check waits until the key's bucket has moved too, then runs
    once, on the target, with both buckets' levels carried over."""
    tenant, limit = tenant_on(0), BucketLimit(STILL, 10)
    target = redis_cluster.shards[1]
    limiter = ClusterLimiter.from_url(redis_cluster.url, timeout=2.0)
    try:
        assert await spend(limiter, tenant, 3, limit) == 3
        source = await split_buckets(redis_cluster, tenant, target)
        check = asyncio.ensure_future(limiter.check(tenant, "k1", WIDE, limit))
        await refused_by_migration(limiter, 2)  # refused, and waited, twice
        assert not check.done()
        await redis_cluster.move_keys(tenant_slot(tenant), source, target)
        decision = await check
    finally:
        await limiter.aclose()
    assert decision.allowed
    assert decision.remaining == 6
    assert await source.command("CLUSTER", "COUNTKEYSINSLOT", tenant_slot(tenant)) == 0
    await redis_cluster.move_slot(tenant_slot(tenant), target)  # the migration ends
    assert await level(target, key_bucket_key(tenant, "k1")) == 6.0  # spent once, there


async def test_a_new_key_of_a_tenant_that_moved_waits_for_the_migration_to_end(
    redis_cluster: ThreeShards,
) -> None:
    """The tenant's bucket already on the target, a key never used: its bucket is on neither
    node, so the target refuses it (TRYAGAIN) until the slot is handed over."""
    tenant, limit = tenant_on(2), BucketLimit(STILL, 10)
    target = redis_cluster.shards[0]
    limiter = ClusterLimiter.from_url(redis_cluster.url, timeout=2.0)
    try:
        assert await spend(limiter, tenant, 2, limit) == 2
        await redis_cluster.move_slot(tenant_slot(tenant), target, finish=False)
        check = asyncio.ensure_future(limiter.check(tenant, "a-new-key", WIDE, limit))
        await refused_by_migration(limiter, 1)
        await redis_cluster.move_slot(tenant_slot(tenant), target)  # the migration ends
        decision = await check
    finally:
        await limiter.aclose()
    assert decision.allowed
    assert decision.remaining == 9
    assert await level(target, key_bucket_key(tenant, "a-new-key")) == 9.0


async def test_a_migration_that_does_not_end_fails_the_check_and_spends_nothing(
    redis_cluster: ThreeShards,
) -> None:
    """Buckets left split: the check is refused for MIGRATION_WAIT_S in all (the gateway then
    answers 503), and neither node ran the script."""
    tenant, limit = tenant_on(1), BucketLimit(STILL, 10)
    target = redis_cluster.shards[2]
    limiter = ClusterLimiter.from_url(redis_cluster.url, timeout=2.0)
    try:
        assert await spend(limiter, tenant, 1, limit) == 1
        source = await split_buckets(redis_cluster, tenant, target)
        started = time.monotonic()
        with pytest.raises(LimiterMigrating, match="migrating the bucket's slot"):
            await limiter.check(tenant, "k1", WIDE, limit)
        waited = time.monotonic() - started
        assert limiter.migration_waits == 7  # 2 + 4 + ... + 64 ms, then the 124 ms left
    finally:
        await limiter.aclose()
    assert MIGRATION_WAIT_S <= waited < MIGRATION_WAIT_S + 1.0
    assert await level(source, key_bucket_key(tenant, "k1")) == 9.0  # not spent there
    await redis_cluster.move_slot(tenant_slot(tenant), target)  # the migration ends
    assert await level(target, key_bucket_key(tenant, "k1")) == 9.0  # nor on the target


async def test_a_redis_that_is_not_a_cluster_is_named(redis_url: str) -> None:
    limiter = ClusterLimiter.from_url(redis_url, timeout=2.0)
    try:
        with pytest.raises(LimiterUnavailable, match="slot map.*cluster support disabled"):
            await limiter.check("acme", "k1", WIDE, WIDE)
        with pytest.raises(LimiterUnavailable, match="slot map"):
            await limiter.load_script()
    finally:
        await limiter.aclose()


def test_a_cluster_url_must_name_database_0() -> None:
    with pytest.raises(ValueError, match="database 0 only"):
        ClusterLimiter.from_url("redis://127.0.0.1:7000/2")
