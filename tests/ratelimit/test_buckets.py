"""Limits and the header arithmetic of a decision (no Redis needed)."""

from __future__ import annotations

import math

import pytest

from ratelimit import BucketLimit, Decision
from ratelimit.buckets import MAX_REFILL_SECONDS, decide


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0.0, 10.0), (-1.0, 10.0), (math.nan, 10.0), (math.inf, 10.0), (1.0, 0.0), (1.0, math.inf)],
)
def test_limit_rejects_values_that_make_no_bucket(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        BucketLimit(rate=rate, burst=burst)


def test_limit_rejects_a_bucket_that_would_take_decades_to_refill() -> None:
    BucketLimit(rate=1.0, burst=MAX_REFILL_SECONDS)
    with pytest.raises(ValueError, match="to refill"):
        BucketLimit(rate=1.0, burst=MAX_REFILL_SECONDS * 2)


def test_allowed_reports_the_bucket_with_fewer_tokens_left() -> None:
    tenant, key = BucketLimit(rate=10.0, burst=100.0), BucketLimit(rate=0.5, burst=5.0)
    decision = decide(True, 80.0, 2.0, tenant, key, 1)
    assert decision == Decision(
        allowed=True,
        refused_by=None,
        limit=5,
        remaining=2,
        reset_seconds=6,  # 3 tokens at 0.5/s
        retry_after_seconds=None,
    )
    assert decide(True, 1.5, 4.0, tenant, key, 1).limit == 100


def test_refused_reports_the_bucket_that_makes_the_caller_wait_longest() -> None:
    tenant, key = BucketLimit(rate=1.0, burst=100.0), BucketLimit(rate=0.25, burst=5.0)
    # Both are short of a token: the tenant needs 0.5 s, the key 0.9 / 0.25 = 3.6 s.
    decision = decide(False, 0.5, 0.1, tenant, key, 1)
    assert decision.refused_by == "key"
    assert decision.retry_after_seconds == 4
    assert (decision.limit, decision.remaining) == (5, 0)
    only_tenant = decide(False, 0.9, 3.0, tenant, key, 1)
    assert only_tenant.refused_by == "tenant"
    assert only_tenant.retry_after_seconds == 1  # 0.1 s rounds up to the 1 s minimum
    assert only_tenant.limit == 100


def test_float_noise_does_not_move_header_values() -> None:
    limit = BucketLimit(rate=1.0, burst=5.0)
    decision = decide(True, 2.9999999999999996, 10.0, limit, BucketLimit(1.0, 10.0), 1)
    assert decision.remaining == 3
    assert decision.reset_seconds == 2


def test_headers_carry_retry_after_only_when_refused() -> None:
    limit = BucketLimit(rate=1.0, burst=5.0)
    assert decide(True, 4.0, 4.0, limit, limit, 1).headers() == {
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "4",
        "RateLimit-Reset": "1",
    }
    refused = decide(False, 0.0, 4.0, limit, limit, 1).headers()
    assert refused["Retry-After"] == "1"
    assert refused["RateLimit-Remaining"] == "0"
    assert refused["RateLimit-Reset"] == "5"
