"""Exactness across processes: several workers hit the same buckets at the same moment."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from devstack.redis_cluster import ThreeShards
from ratelimit import BucketLimit
from ratelimit.cluster import tenant_slot
from tests.ratelimit.conftest import STILL, WIDE

REPO = Path(__file__).resolve().parents[2]
WORKERS = 4
CHECKS_PER_WORKER = 300
# Buckets here refill about one token a day (10 * STILL): a bucket of STILL would take longer to
# fill than BucketLimit allows.


async def run_workers(
    redis_url: str, tenant: BucketLimit, key: BucketLimit, keys: int, *, cluster: bool = False
) -> list[tuple[int, float, float]]:
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.ratelimit.admit_worker",
            redis_url, str(CHECKS_PER_WORKER),
            str(tenant.rate), str(tenant.burst), str(key.rate), str(key.burst), str(keys),
            *(["cluster"] if cluster else []),
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(WORKERS)
    ]  # fmt: skip
    try:
        async with asyncio.timeout(60):
            for worker in workers:
                assert worker.stdout is not None
                assert (await worker.stdout.readline()).strip() == b"ready"
            # Every worker is connected and has the script: start them all at one moment.
            start = f"{time.time() + 0.2}\n".encode()
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.write(start)
                await worker.stdin.drain()
            outputs = [await worker.communicate() for worker in workers]
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    assert [worker.returncode for worker in workers] == [0] * WORKERS
    reports = [stdout.splitlines()[-1].split() for stdout, _ in outputs]
    return [
        (int(allowed), float(started), float(finished)) for allowed, started, finished in reports
    ]


@pytest.mark.parametrize(
    ("tenant", "key", "keys"),
    [
        pytest.param(WIDE, BucketLimit(rate=10 * STILL, burst=773), 1, id="one-key-bucket"),
        pytest.param(BucketLimit(rate=10 * STILL, burst=659), WIDE, 7, id="one-tenant-many-keys"),
    ],
)
async def test_processes_together_admit_exactly_the_capacity(
    redis_url: str, tenant: BucketLimit, key: BucketLimit, keys: int
) -> None:
    # The capacity is more than two workers ask for (and less than all ask for), so it is only
    # admitted exactly if at least three of them took from the bucket while others were refused.
    capacity = min(tenant.burst, key.burst)
    assert 2 * CHECKS_PER_WORKER < capacity < WORKERS * CHECKS_PER_WORKER
    reports = await run_workers(redis_url, tenant, key, keys)
    assert sum(allowed for allowed, _, _ in reports) == capacity
    # The workers really raced: all were checking at one time.
    assert max(started for _, started, _ in reports) < min(finished for _, _, finished in reports)


async def test_processes_on_a_redis_cluster_admit_exactly_the_capacity(
    redis_cluster: ThreeShards,
) -> None:
    """The same race through ClusterLimiter, on a cluster of three shards: the tenant's slot is
    moved off the node the workers are given, so each finds its shard through the slot map."""
    await redis_cluster.move_slot(tenant_slot("shared"), redis_cluster.shards[2])
    key = BucketLimit(rate=10 * STILL, burst=773)
    reports = await run_workers(redis_cluster.url, WIDE, key, 1, cluster=True)
    assert sum(allowed for allowed, _, _ in reports) == 773
    assert max(started for _, started, _ in reports) < min(finished for _, _, finished in reports)
