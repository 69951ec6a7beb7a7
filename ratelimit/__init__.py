"""Token buckets in Redis: per-tenant and per-key limits checked in one atomic script."""

from ratelimit.buckets import Bucket, BucketLimit, Decision
from ratelimit.cluster import ClusterLimiter
from ratelimit.errors import (
    LimiterMigrating,
    LimiterRedirected,
    LimiterScriptError,
    LimiterUnavailable,
    RateLimitError,
)
from ratelimit.limiter import BucketLimiter

# One Redis, or a Redis Cluster of several shards: the same interface.
Limiter = BucketLimiter | ClusterLimiter

__all__ = [
    "Bucket",
    "BucketLimit",
    "BucketLimiter",
    "ClusterLimiter",
    "Decision",
    "Limiter",
    "LimiterMigrating",
    "LimiterRedirected",
    "LimiterScriptError",
    "LimiterUnavailable",
    "RateLimitError",
]
