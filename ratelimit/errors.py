"""The exceptions of the limiter, translated from redis-py where they enter.

    RateLimitError
    ├── LimiterUnavailable   Redis is down, timed out, loading, read-only or out of memory
    │   ├── LimiterRedirected  a Redis Cluster node sent the check to another node (MOVED, ASK)
    │   └── LimiterMigrating   a Redis Cluster node has only some of the check's keys: their
    │                          slot is being migrated (TRYAGAIN)
    └── LimiterScriptError   Redis ran the bucket script and it failed (a bug, or foreign data
                             under a limiter key)

Both mean "no decision": the gateway fails closed and answers 503. Invalid arguments (a bad
limit, an empty tenant id) are programming errors and raise ValueError instead.
"""

from __future__ import annotations


class RateLimitError(Exception):
    """The limiter could not decide whether a request is allowed."""


class LimiterUnavailable(RateLimitError):
    """Redis could not be reached or did not answer within the timeout."""


class LimiterScriptError(RateLimitError):
    """Redis answered the bucket script with an error."""


class LimiterRedirected(LimiterUnavailable):
    """A Redis Cluster node does not serve the check's slot and named the node that does: the
    script did not run. `ask`: the slot is being migrated to that node (ASK), rather than moved
    (MOVED). `ratelimit.cluster.ClusterLimiter` follows these; a limiter for one Redis cannot."""

    def __init__(self, message: str, *, slot: int, host: str, port: int, ask: bool) -> None:
        super().__init__(message)
        self.slot = slot
        self.host = host
        self.port = port
        self.ask = ask


class LimiterMigrating(LimiterUnavailable):
    """A Redis Cluster node holds only some of the check's keys, their slot being migrated
    between two nodes (TRYAGAIN): the script did not run, and will once the rest of the slot's
    keys have moved. `ratelimit.cluster.ClusterLimiter` waits for that, within a bound."""
