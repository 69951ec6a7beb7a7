"""A warning that can repeat with every request (Redis down, a misconfigured cluster) is written
at most once per interval: the first occurrence is logged at once, the flood is not."""

from __future__ import annotations

import math
import time

# What a worker not told of a Redis Cluster needs to hear, from its registry reads or limiter.
REDIS_CLUSTER_HINT = "Redis is a cluster of several shards: set GATEWAY_REDIS_CLUSTER=on"


class LogThrottle:
    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval_s = interval_s
        self._logged_at = -math.inf

    def due(self) -> bool:
        """True, and restart the interval, when a warning may be written now."""
        now = time.monotonic()
        if now - self._logged_at < self._interval_s:
            return False
        self._logged_at = now
        return True
