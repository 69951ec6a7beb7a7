"""The limiter against the session Redis: exactness, both-or-neither, refill, headers, batching."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from ratelimit import (
    BucketLimit,
    BucketLimiter,
    Decision,
    LimiterScriptError,
    LimiterUnavailable,
)
from ratelimit.keys import key_bucket_key, tenant_bucket_key
from ratelimit.script import BUCKETS_LUA
from tests.ratelimit.conftest import STILL, WIDE


async def check_many(
    limiter: BucketLimiter,
    count: int,
    tenant_limit: BucketLimit,
    key_limit: BucketLimit,
    *,
    tenant: str = "acme",
    keys: int = 1,
) -> list[Decision]:
    return await asyncio.gather(
        *(limiter.check(tenant, f"key{i % keys}", tenant_limit, key_limit) for i in range(count))
    )


async def stored(redis: aioredis.Redis, key: str, field: str) -> str:
    """A field of a bucket as the script wrote it."""
    value = await redis.hget(key, field)
    assert isinstance(value, str), f"{key} has no {field}"
    return value


async def test_key_bucket_admits_exactly_its_capacity(limiter: BucketLimiter) -> None:
    decisions = await check_many(limiter, 600, WIDE, BucketLimit(rate=STILL, burst=57))
    assert sum(d.allowed for d in decisions) == 57
    assert {d.refused_by for d in decisions if not d.allowed} == {"key"}


async def test_tenant_bucket_admits_exactly_its_capacity_across_keys(
    limiter: BucketLimiter,
) -> None:
    decisions = await check_many(limiter, 600, BucketLimit(rate=STILL, burst=41), WIDE, keys=13)
    assert sum(d.allowed for d in decisions) == 41
    assert {d.refused_by for d in decisions if not d.allowed} == {"tenant"}


async def test_an_empty_key_bucket_leaves_the_tenant_bucket_alone(
    limiter: BucketLimiter, redis: aioredis.Redis
) -> None:
    tenant = BucketLimit(rate=STILL, burst=10)
    key = BucketLimit(rate=STILL, burst=2)
    first = await check_many(limiter, 20, tenant, key)  # all on key0: 2 pass, 18 refused
    assert [d.refused_by for d in first].count("key") == 18
    assert float(await stored(redis, tenant_bucket_key("acme"), "tokens")) == pytest.approx(8)
    # The 18 refusals consumed nothing: the tenant still has 8 tokens for other keys.
    others = [await limiter.check("acme", f"other{i}", tenant, key) for i in range(9)]
    assert [d.allowed for d in others] == [True] * 8 + [False]
    assert others[-1].refused_by == "tenant"


async def test_an_empty_tenant_bucket_leaves_the_key_bucket_alone(
    limiter: BucketLimiter, redis: aioredis.Redis
) -> None:
    tenant = BucketLimit(rate=STILL, burst=3)
    key = BucketLimit(rate=STILL, burst=10)
    decisions = await check_many(limiter, 20, tenant, key)
    assert sum(d.allowed for d in decisions) == 3
    assert float(await stored(redis, key_bucket_key("acme", "key0"), "tokens")) == pytest.approx(7)
    # Once the tenant has tokens again, the key's 7 are all there: the refusals took none.
    await redis.delete(tenant_bucket_key("acme"))
    again = await check_many(limiter, 20, WIDE, key)
    assert sum(d.allowed for d in again) == 7


async def test_refill_follows_redis_time(
    limiter: BucketLimiter, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process's wall clock stands still, an hour behind: the bucket refills all the same,
    # by Redis's clock.
    frozen = time.time() - 3600
    monkeypatch.setattr(time, "time", lambda: frozen)
    monkeypatch.setattr(time, "time_ns", lambda: int(frozen * 1e9))
    key = BucketLimit(rate=10.0, burst=5)
    started = time.monotonic()
    assert all(d.allowed for d in await check_many(limiter, 5, WIDE, key))
    refused = await limiter.check("acme", "key0", WIDE, key)
    assert not refused.allowed
    assert refused.retry_after_seconds == 1

    # The bucket's clock is Redis's: the stored timestamp is Redis TIME, in microseconds,
    # not this process's time an hour earlier.
    seconds, micros = await redis.time()
    stamp = int(await stored(redis, key_bucket_key("acme", "key0"), "ts"))
    assert abs(seconds * 1_000_000 + micros - stamp) < 1_000_000

    await asyncio.sleep(0.3)
    refilled = await check_many(limiter, 10, WIDE, key)
    waited = time.monotonic() - started
    # 10 tokens/s: 3 back after 0.3 s, more only as far as a slow machine made the test longer.
    assert 3 <= sum(d.allowed for d in refilled) <= min(5, int(waited * 10) + 1)


async def test_the_script_takes_the_time_from_redis(redis: aioredis.Redis) -> None:
    # A call carries the two limits and the cost, nothing of the caller's clock: the same
    # call made again finds tokens only if the script read the time in Redis.
    keys = (tenant_bucket_key("acme"), key_bucket_key("acme", "key0"))
    limits = (1000.0, 1000.0, 10.0, 5.0)  # tenant rate and burst, key rate and burst
    drained = await redis.eval(BUCKETS_LUA, 2, *keys, *limits, 5.0)
    assert drained[0] == 1 and float(drained[2]) == 0
    await asyncio.sleep(0.3)
    refilled = await redis.eval(BUCKETS_LUA, 2, *keys, *limits, 2.0)
    assert refilled[0] == 1  # 10 tokens/s: 3 back after 0.3 s


async def test_idle_buckets_expire_once_they_would_be_full(
    limiter: BucketLimiter, redis: aioredis.Redis
) -> None:
    await limiter.check("acme", "key0", BucketLimit(rate=2.0, burst=50), BucketLimit(10.0, 5))
    # One token short: full again in 0.5 s (tenant) and 0.1 s (key), plus a 1 s margin.
    assert 1_400 < await redis.pttl(tenant_bucket_key("acme")) <= 1_500
    assert 1_000 < await redis.pttl(key_bucket_key("acme", "key0")) <= 1_100


async def test_decisions_carry_the_header_data(limiter: BucketLimiter) -> None:
    tenant = BucketLimit(rate=100.0, burst=100)
    key = BucketLimit(rate=0.5, burst=3)
    decisions = [await limiter.check("acme", "key0", tenant, key) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.limit for d in decisions] == [3, 3, 3, 3]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert [d.reset_seconds for d in decisions] == [2, 4, 6, 6]
    assert decisions[3].refused_by == "key"
    assert decisions[3].retry_after_seconds == 2  # one token at 0.5/s
    assert decisions[3].headers()["Retry-After"] == "2"

    tighter_tenant = BucketLimit(rate=1.0, burst=2)
    first = await limiter.check("beta", "key0", tighter_tenant, key)
    assert (first.limit, first.remaining) == (2, 1)


async def test_concurrent_checks_share_round_trips(limiter: BucketLimiter) -> None:
    await limiter.load_script()
    before = limiter.round_trips
    decisions = await check_many(limiter, 1_000, WIDE, WIDE, keys=50)
    assert all(d.allowed for d in decisions)
    used = limiter.round_trips - before
    assert used <= 1_000 / 50
    assert limiter.checks == 1_000

    before = limiter.round_trips
    for _ in range(3):
        await limiter.check("acme", "key0", WIDE, WIDE)
    assert limiter.round_trips - before == 3  # nothing to share with: one each


async def test_submit_answers_with_a_future_and_counts_what_is_undecided(
    limiter: BucketLimiter, redis: aioredis.Redis
) -> None:
    limit = BucketLimit(rate=STILL, burst=2)
    await redis.set(tenant_bucket_key("broken"), "not a hash")
    futures = [limiter.submit("acme", "key0", limit, limit) for _ in range(3)]
    futures.append(limiter.submit("broken", "key0", WIDE, WIDE))
    assert limiter.undecided == 4
    await asyncio.wait(futures)
    assert limiter.undecided == 0  # answered or failed, each is decided
    assert [f.result().allowed for f in futures[:3]] == [True, True, False]
    assert isinstance(futures[3].exception(), LimiterScriptError)


async def test_flushed_scripts_are_loaded_again(
    limiter: BucketLimiter, redis: aioredis.Redis
) -> None:
    limit = BucketLimit(rate=STILL, burst=20)
    assert all(d.allowed for d in await check_many(limiter, 10, limit, limit))
    await redis.script_flush()
    before = limiter.round_trips
    decisions = await check_many(limiter, 20, limit, limit)
    assert limiter.round_trips - before == 2  # NOSCRIPT, then load and run in one trip
    assert sum(d.allowed for d in decisions) == 10  # NOSCRIPT calls did not run twice


async def test_a_failing_script_fails_only_its_own_check(
    limiter: BucketLimiter, redis: aioredis.Redis
) -> None:
    await redis.set(tenant_bucket_key("broken"), "not a hash")
    results = await asyncio.gather(
        limiter.check("broken", "key0", WIDE, WIDE),
        limiter.check("acme", "key0", WIDE, WIDE),
        return_exceptions=True,
    )
    assert isinstance(results[0], LimiterScriptError)
    assert isinstance(results[1], Decision) and results[1].allowed


async def test_a_caller_cancelled_before_sending_spends_nothing(limiter: BucketLimiter) -> None:
    limit = BucketLimit(rate=STILL, burst=5)
    waiting = [asyncio.ensure_future(limiter.check("acme", "key0", limit, limit)) for _ in range(8)]
    await asyncio.sleep(0)  # all 8 are queued; the batch leaves on the next loop iteration
    waiting[0].cancel()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert sum(isinstance(r, Decision) and r.allowed for r in results[1:]) == 5


async def test_invalid_checks_are_refused_before_redis(limiter: BucketLimiter) -> None:
    small = BucketLimit(rate=1.0, burst=2)
    with pytest.raises(ValueError):
        await limiter.check("acme", "key0", small, WIDE, cost=3)
    with pytest.raises(ValueError):
        await limiter.check("acme", "key0", small, WIDE, cost=0)
    with pytest.raises(ValueError):
        await limiter.check("a{b", "key0", small, WIDE)
    assert limiter.round_trips == 0


async def test_costs_above_one_consume_that_many(limiter: BucketLimiter) -> None:
    limit = BucketLimit(rate=STILL, burst=10)
    costs = [await limiter.check("acme", "key0", limit, WIDE, cost=4) for _ in range(3)]
    assert [d.allowed for d in costs] == [True, True, False]
    assert costs[1].remaining == 2
    assert (await limiter.check("acme", "key0", limit, WIDE, cost=2)).allowed


async def test_close_answers_every_accepted_check(redis_url: str) -> None:
    limiter = BucketLimiter.from_url(redis_url)
    waiting = [asyncio.ensure_future(limiter.check("acme", f"k{i}", WIDE, WIDE)) for i in range(50)]
    await asyncio.sleep(0)
    await limiter.aclose()
    assert all(d.allowed for d in await asyncio.gather(*waiting))
    with pytest.raises(LimiterUnavailable, match="closed"):
        await limiter.check("acme", "key0", WIDE, WIDE)
