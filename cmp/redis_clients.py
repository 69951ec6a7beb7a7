"""Redis as the CMP and the gateways use it: one Redis, or a Redis Cluster of several shards.

A single Redis (or a managed primary) is the default. With `cluster`, the URL names any node
of a Redis Cluster and redis-py's cluster client routes each command to the shard of its key;
pub/sub is cluster-wide (a PUBLISH on any node reaches subscribers on every node).

What differs on a cluster is written here, once for both sides:
- A write and its announcement (`write_and_announce`) go in one MULTI on a single Redis. A
  cluster's transactions hold keys of one slot and no keyless command such as PUBLISH, so
  there the writes go first and the announcements after them: a gateway that hears of a
  change reads the new value, as it does on a single Redis.
- The marker that says Redis still holds what the CMP published (`synced_markers`) is one key
  on a single Redis, and one key per slot range on a cluster, so that a shard that lost its
  data (restarted without persistence, or flushed) is noticed like a whole Redis that did.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.crc import key_slot

from cmp import wire
from ratelimit.cluster import check_cluster_address
from ratelimit.pipe import RedisAddress

AnyRedis = aioredis.Redis | aioredis.RedisCluster
AnyPipeline = Pipeline | ClusterPipeline


def check_redis_url(url: str, *, cluster: bool) -> None:
    """A URL that redis-py cannot read (or whose TLS files cannot be), or that a cluster cannot
    serve: ValueError naming why."""
    address = RedisAddress.from_url(url)
    if cluster:
        check_cluster_address(address)


def connect(url: str, *, cluster: bool, timeout: float, connect_timeout: float) -> AnyRedis:
    """A client for the Redis of a redis-py URL; no connection is made until the first call."""
    if cluster:
        return aioredis.RedisCluster.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=connect_timeout
        )
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=connect_timeout)


async def write_and_announce(
    redis: AnyRedis, write: Callable[[AnyPipeline], object], channel: str,
    messages: Iterable[str],
) -> None:
    """Run the commands `write` queues on a pipeline, then PUBLISH each message on `channel`:
    atomically on a single Redis, writes before announcements on a cluster."""
    if isinstance(redis, aioredis.RedisCluster):
        async with redis.pipeline() as writes:
            write(writes)
            await writes.execute()
        for message in messages:
            await redis.publish(channel, message)
        return
    async with redis.pipeline(transaction=True) as pipe:
        write(pipe)
        for message in messages:
            pipe.publish(channel, message)
        await pipe.execute()


async def synced_markers(redis: AnyRedis) -> list[str]:
    """The keys that, all present, say Redis holds everything the CMP published."""
    if not isinstance(redis, aioredis.RedisCluster):
        return [wire.SYNCED_MARKER]
    ranges = await redis.cluster_slots()
    return [_marker_in(int(first), int(last)) for first, last in sorted(ranges)]


@functools.lru_cache(maxsize=1024)  # read every second; ranges change only with resharding
def _marker_in(first: int, last: int) -> str:
    """A marker key whose hash tag puts it in a slot of [first, last]."""
    for n in itertools.count():
        key = f"{wire.SYNCED_MARKER}:{{{n}}}"
        if first <= key_slot(key.encode()) <= last:
            return key
    raise AssertionError("unreachable")
