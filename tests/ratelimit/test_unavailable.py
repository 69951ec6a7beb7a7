"""Redis down or hung: checks fail fast with LimiterUnavailable, and work again once it is back.

Uses a Redis of its own, so the session one stays up for the other tests.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devstack import services
from devstack.procs import ManagedProcess, free_port
from ratelimit import BucketLimiter, LimiterUnavailable, RateLimitError
from tests.ratelimit.conftest import WIDE

TIMEOUT = 0.3


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[tuple[ManagedProcess, BucketLimiter]]:
    port = free_port()
    process = services.redis(port, tmp_path)
    process.start()
    process.wait_ready(30)
    limiter = BucketLimiter.from_url(f"redis://127.0.0.1:{port}/0", timeout=TIMEOUT)
    try:
        yield process, limiter
    finally:
        process.signal(signal.SIGCONT)
        await limiter.aclose()
        process.stop()


async def timed_failure(limiter: BucketLimiter, count: int) -> float:
    """Seconds until `count` concurrent checks have all failed with LimiterUnavailable."""
    started = time.monotonic()
    results = await asyncio.gather(
        *(limiter.check("acme", f"key{i}", WIDE, WIDE) for i in range(count)),
        return_exceptions=True,
    )
    assert all(isinstance(result, LimiterUnavailable) for result in results), results
    return time.monotonic() - started


async def test_stopped_redis_fails_fast_and_recovers(
    own_redis: tuple[ManagedProcess, BucketLimiter],
) -> None:
    process, limiter = own_redis
    assert (await limiter.check("acme", "key0", WIDE, WIDE)).allowed

    process.stop()
    assert await timed_failure(limiter, 1) < TIMEOUT + 0.2
    assert await timed_failure(limiter, 200) < TIMEOUT + 0.2
    assert issubclass(LimiterUnavailable, RateLimitError)

    process.start()
    process.wait_ready(30)
    # A fresh server without the script: the limiter reconnects and loads it again.
    assert (await limiter.check("acme", "key0", WIDE, WIDE)).allowed


async def test_hung_redis_times_out_and_recovers(
    own_redis: tuple[ManagedProcess, BucketLimiter],
) -> None:
    process, limiter = own_redis
    assert (await limiter.check("acme", "key0", WIDE, WIDE)).allowed

    process.signal(signal.SIGSTOP)  # connections stay open, nothing answers
    try:
        elapsed = await timed_failure(limiter, 200)
    finally:
        process.signal(signal.SIGCONT)
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT * 2 + 0.3

    # The timed-out connections were dropped: no late reply is read as a new check's answer.
    decisions = await asyncio.gather(
        *(limiter.check("acme", f"key{i}", WIDE, WIDE) for i in range(100))
    )
    assert all(d.allowed for d in decisions)


async def test_first_check_after_a_redis_restart_succeeds_on_a_stale_connection(
    own_redis: tuple[ManagedProcess, BucketLimiter],
) -> None:
    """A pooled connection left over from before a restart must not cost a refused request."""
    process, limiter = own_redis
    assert (await limiter.check("acme", "key0", WIDE, WIDE)).allowed
    process.stop()
    process.start()
    process.wait_ready(30)
    decision = await limiter.check("acme", "key0", WIDE, WIDE)
    assert decision.allowed
