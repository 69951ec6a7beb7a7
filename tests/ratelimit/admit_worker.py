"""One process of the multi-process exactness test.

    python -m tests.ratelimit.admit_worker URL CHECKS \
        TENANT_RATE TENANT_BURST KEY_RATE KEY_BURST KEYS [cluster]

Prints "ready" once connected, reads a start time (Unix seconds) from stdin, and at that moment
runs CHECKS checks from CALLERS concurrent callers over KEYS key ids of tenant "shared". Prints
"ALLOWED STARTED FINISHED" so the test can see that the workers really overlapped. A shared
start time lines the workers up far closer than a signal that each reads in turn.
"""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop

from ratelimit import BucketLimit, BucketLimiter, ClusterLimiter, Limiter

CALLERS = 32


async def main(
    url: str, checks: int, tenant: BucketLimit, key: BucketLimit, keys: int, cluster: bool
) -> str:
    limiter: Limiter = (ClusterLimiter if cluster else BucketLimiter).from_url(url, timeout=5.0)
    await limiter.load_script()
    print("ready", flush=True)
    start = float(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
    await asyncio.sleep(start - time.time())
    remaining = iter(range(checks))
    allowed = 0

    async def caller() -> None:
        nonlocal allowed
        for i in remaining:  # shared iterator: CHECKS in all, spread over the callers
            decision = await limiter.check("shared", f"key{i % keys}", tenant, key)
            allowed += decision.allowed

    started = time.time()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    finished = time.time()
    await limiter.aclose()
    return f"{allowed} {started} {finished}"


if __name__ == "__main__":
    url, checks, tenant_rate, tenant_burst, key_rate, key_burst, keys = sys.argv[1:8]
    cluster = sys.argv[8:] == ["cluster"]
    tenant = BucketLimit(rate=float(tenant_rate), burst=float(tenant_burst))
    key = BucketLimit(rate=float(key_rate), burst=float(key_burst))
    print(uvloop.run(main(url, int(checks), tenant, key, int(keys), cluster)), flush=True)
