"""Token buckets in Redis: per-tenant and per-key limits checked in one atomic script."""

from ratelimit.buckets import Bucket, BucketLimit, Decision
from ratelimit.errors import LimiterScriptError, LimiterUnavailable, RateLimitError
from ratelimit.limiter import BucketLimiter

__all__ = [
    "Bucket",
    "BucketLimit",
    "BucketLimiter",
    "Decision",
    "LimiterScriptError",
    "LimiterUnavailable",
    "RateLimitError",
]
