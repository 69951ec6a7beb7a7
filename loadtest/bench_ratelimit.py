"""Limiter throughput from one process: batched checks against one EVALSHA round trip per check.

Starts its own redis-server on a free port (pinned to its own core), runs `--callers`
concurrent callers for `--seconds` in each mode, and prints one JSON object: checks per second,
latency, client CPU per check, Redis round trips per check and Redis's own time per script run.
With `--cluster`, the same callers also go through ClusterLimiter to a Redis Cluster of three
shards (all on the Redis core): what routing by slot costs the client per check.

    .venv/bin/python -m loadtest.bench_ratelimit [--callers 256] [--seconds 3] [--max-batch 64]
        [--cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis  # noqa: E402
import uvloop  # noqa: E402

from devstack.procs import free_port  # noqa: E402
from devstack.redis_cluster import ThreeShards  # noqa: E402
from devstack.services import redis as redis_process  # noqa: E402
from ratelimit import BucketLimit, BucketLimiter, ClusterLimiter, Limiter  # noqa: E402
from ratelimit.buckets import decide  # noqa: E402
from ratelimit.keys import key_bucket_key, tenant_bucket_key  # noqa: E402
from ratelimit.limiter import DEFAULT_MAX_BATCH  # noqa: E402
from ratelimit.script import BUCKETS_LUA, BUCKETS_SHA  # noqa: E402

# Generous limits: the bench measures the cost of a check, so (almost) every check is admitted.
TENANT_LIMIT = BucketLimit(rate=1e6, burst=1e6)
KEY_LIMIT = BucketLimit(rate=1e5, burst=1e5)
TENANTS = 64
KEYS_PER_TENANT = 4

Check = Callable[[str, str], Awaitable[object]]


async def drive(check: Check, callers: int, seconds: float) -> dict[str, float]:
    """`callers` coroutines calling `check` back to back; a short warm-up is not counted."""
    latencies: list[float] = []
    measuring = False
    stop = False

    async def caller(index: int) -> None:
        tenant = f"t{index % TENANTS}"
        key = f"k{index % (TENANTS * KEYS_PER_TENANT)}"
        while not stop:
            started = time.perf_counter()
            await check(tenant, key)
            if measuring:
                latencies.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
    await asyncio.sleep(0.5)
    measuring = True
    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    measuring = False
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    stop = True
    await asyncio.gather(*tasks)
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "checks": len(latencies),
        "checks_per_second": round(len(latencies) / elapsed),
        "latency_p50_ms": round(quantiles[49] * 1000, 3),
        "latency_p99_ms": round(quantiles[98] * 1000, 3),
        "client_cpu_usec_per_check": round(cpu / len(latencies) * 1e6, 1),
    }


async def bench_batched(
    url: str, callers: int, seconds: float, max_batch: int, *, cluster: bool = False
) -> dict[str, Any]:
    limiter: Limiter = (ClusterLimiter if cluster else BucketLimiter).from_url(
        url, max_batch=max_batch
    )
    await limiter.load_script()

    async def check(tenant: str, key: str) -> object:
        return await limiter.check(tenant, key, TENANT_LIMIT, KEY_LIMIT)

    before_checks, before_trips = limiter.checks, limiter.round_trips
    result: dict[str, Any] = await drive(check, callers, seconds)
    checks = limiter.checks - before_checks
    result["round_trips_per_check"] = round((limiter.round_trips - before_trips) / checks, 4)
    await limiter.aclose()
    return result


async def bench_unbatched(url: str, callers: int, seconds: float) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(url, socket_timeout=0.5, max_connections=callers)
    await redis.script_load(BUCKETS_LUA)
    t, k = TENANT_LIMIT, KEY_LIMIT

    async def check(tenant: str, key: str) -> object:
        keys = (tenant_bucket_key(tenant), key_bucket_key(tenant, key))
        allowed, t_level, k_level = await redis.evalsha(
            BUCKETS_SHA, 2, *keys, t.rate, t.burst, k.rate, k.burst, 1
        )
        return decide(allowed == 1, float(t_level), float(k_level), t, k, 1)

    result: dict[str, Any] = await drive(check, callers, seconds)
    result["round_trips_per_check"] = 1.0
    await redis.aclose()
    return result


def pin_to_separate_cores(redis_pid: int | None) -> None:
    """Client and Redis each on their own core: unpinned, the scheduler sometimes stacks them
    on one and the numbers swing by 2x between runs."""
    cores = sorted(os.sched_getaffinity(0))
    if redis_pid is not None and len(cores) >= 2:
        os.sched_setaffinity(0, {cores[0]})
        os.sched_setaffinity(redis_pid, {cores[1]})


async def with_server_cost(url: str, mode: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Adds what Redis itself spent per script run, the ceiling of one Redis whatever the client."""
    admin = aioredis.Redis.from_url(url)
    await admin.config_resetstat()
    result = await mode
    stats = (await admin.info("commandstats")).get("cmdstat_evalsha", {})
    result["redis_usec_per_script"] = stats.get("usec_per_call")
    await admin.aclose()
    return result


async def bench_cluster(callers: int, seconds: float, max_batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ratelimit-cluster-") as data_dir:
        cluster = ThreeShards(Path(data_dir))
        try:
            await cluster.start()
            cores = sorted(os.sched_getaffinity(0))
            for shard in cluster.shards:
                if shard.process.popen is not None and len(cores) >= 2:
                    os.sched_setaffinity(shard.process.popen.pid, {cores[1]})
            result = await bench_batched(cluster.url, callers, seconds, max_batch, cluster=True)
            result["shards"] = len(cluster.shards)
            return result
        finally:
            await cluster.stop()


async def main(callers: int, seconds: float, max_batch: int, cluster: bool) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as data_dir:
        server = redis_process(port, Path(data_dir))
        server.start()
        try:
            server.wait_ready(30)
            pin_to_separate_cores(server.popen.pid if server.popen else None)
            url = f"redis://127.0.0.1:{port}/0"
            batched = await with_server_cost(url, bench_batched(url, callers, seconds, max_batch))
            unbatched = await with_server_cost(url, bench_unbatched(url, callers, seconds))
        finally:
            server.stop()
    on_cluster = await bench_cluster(callers, seconds, max_batch) if cluster else None
    return {
        "bench": "ratelimit",
        "callers": callers,
        "max_batch": max_batch,
        "seconds_per_mode": seconds,
        "batched": batched,
        "unbatched": unbatched,
        "speedup": round(batched["checks_per_second"] / unbatched["checks_per_second"], 2),
        "redis_round_trips_per_request": batched["round_trips_per_check"],
        **({"cluster": on_cluster} if on_cluster else {}),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument("--cluster", action="store_true",
                        help="also through ClusterLimiter to a three-shard Redis Cluster")
    options = parser.parse_args()
    print(json.dumps(uvloop.run(
        main(options.callers, options.seconds, options.max_batch, options.cluster)
    )))
