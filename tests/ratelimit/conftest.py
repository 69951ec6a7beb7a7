"""A limiter on the session Redis (emptied per test by the root `redis_url` fixture)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from ratelimit import BucketLimit, BucketLimiter

# Refills about one token per 11 days: for the length of a test, a bucket that does not refill.
STILL = 1e-6
WIDE = BucketLimit(rate=1000.0, burst=1000.0)


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[BucketLimiter]:
    limiter = BucketLimiter.from_url(redis_url, timeout=2.0)
    yield limiter
    await limiter.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()
