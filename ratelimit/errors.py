"""The exceptions of the limiter, translated from redis-py where they enter.

    RateLimitError
    ├── LimiterUnavailable   Redis is down, timed out, loading, read-only or out of memory
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
