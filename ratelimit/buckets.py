"""Bucket limits and the decision for one request, with the data of the RateLimit headers.

Headers follow draft-ietf-httpapi-ratelimit-headers: when both buckets allow, they describe the
one with fewer tokens left; when a request is refused, the bucket that refused it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Bucket = Literal["tenant", "key"]

# The script keeps an idle bucket until it would be full again; past this horizon that TTL stops
# being a sensible number, so such limits are refused up front rather than silently rounded.
MAX_REFILL_SECONDS = 10 * 365 * 24 * 3600

# Float noise (2.9999999999999996 tokens) must not move a header value by one.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class BucketLimit:
    """A token bucket: `burst` tokens of capacity, refilled at `rate` tokens per second."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a positive number of tokens per second: {self.rate}")
        if not (math.isfinite(self.burst) and self.burst > 0):
            raise ValueError(f"burst must be a positive number of tokens: {self.burst}")
        if self.burst / self.rate > MAX_REFILL_SECONDS:
            raise ValueError(
                f"a bucket of {self.burst} tokens at {self.rate}/s takes longer than "
                f"{MAX_REFILL_SECONDS} s to refill"
            )

    def seconds_until(self, level: float, tokens: float) -> float:
        """Seconds until a bucket now at `level` holds `tokens` (0 if it already does)."""
        return max(tokens - level, 0.0) / self.rate


def check_cost(cost: float, tenant_limit: BucketLimit, key_limit: BucketLimit) -> None:
    """A check's cost must be positive and fit in both buckets (else it could never pass)."""
    if not 0 < cost <= min(tenant_limit.burst, key_limit.burst):
        raise ValueError(f"cost must be positive and fit in both buckets: {cost}")


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether one request may go ahead, and what its RateLimit headers say."""

    allowed: bool
    refused_by: Bucket | None
    limit: int
    remaining: int
    reset_seconds: int
    retry_after_seconds: int | None

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }
        if self.retry_after_seconds is not None:
            headers["Retry-After"] = str(self.retry_after_seconds)
        return headers


def decide(
    allowed: bool,
    tenant_level: float,
    key_level: float,
    tenant_limit: BucketLimit,
    key_limit: BucketLimit,
    cost: float,
) -> Decision:
    """The decision from the script's answer: levels after consumption, or untouched if refused."""
    if allowed:
        if key_level <= tenant_level:
            return _decision(None, key_level, key_limit, None)
        return _decision(None, tenant_level, tenant_limit, None)
    tenant_wait = tenant_limit.seconds_until(tenant_level, cost)
    key_wait = key_limit.seconds_until(key_level, cost)
    # Nothing was consumed, so the request goes through once both buckets hold `cost`.
    retry_after = max(1, math.ceil(max(tenant_wait, key_wait) - _EPSILON))
    if tenant_wait >= key_wait:
        return _decision("tenant", tenant_level, tenant_limit, retry_after)
    return _decision("key", key_level, key_limit, retry_after)


def _decision(
    refused_by: Bucket | None, level: float, limit: BucketLimit, retry_after: int | None
) -> Decision:
    return Decision(
        allowed=refused_by is None,
        refused_by=refused_by,
        limit=math.floor(limit.burst + _EPSILON),
        remaining=max(0, math.floor(level + _EPSILON)),
        reset_seconds=max(0, math.ceil(limit.seconds_until(level, limit.burst) - _EPSILON)),
        retry_after_seconds=retry_after,
    )
