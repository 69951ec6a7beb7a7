"""BucketLimiter: checks the buckets of many concurrent requests in one Redis round trip.

Checks made during one event-loop iteration (or until `max_batch` are waiting) are written to
one connection as a single pipelined burst of EVALSHA calls. Each call is still its own atomic
script run, so batching changes the cost per check, not the result: a bucket of N admits N.

No retries on purpose: a script whose reply was lost may have consumed tokens, and sending it
again would consume them twice. A failure answers every check of the batch with
LimiterUnavailable (the gateway fails closed); tokens that a lost reply consumed stay consumed,
which errs towards refusing, never towards admitting too many.
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)

from ratelimit.buckets import BucketLimit, Decision, decide
from ratelimit.errors import LimiterScriptError, LimiterUnavailable, RateLimitError
from ratelimit.keys import key_bucket_key, tenant_bucket_key
from ratelimit.script import BUCKETS_LUA, LOAD_COMMAND, encode_call, encode_limits

DEFAULT_TIMEOUT = 0.5
# Measured with loadtest/bench_ratelimit.py on 2 cores: bigger batches make the client and Redis
# take turns instead of overlapping, smaller ones run into the in-flight cap.
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_IN_FLIGHT = 8

# Error replies that describe the server's state, not the script: out of memory, a replica
# after failover, a cluster resharding. BUSY (another script hogging Redis) has no class.
_TRANSIENT_REFUSALS = (OutOfMemoryError, ReadOnlyError, ClusterDownError, TryAgainError)


@dataclass(slots=True)
class _PendingCheck:
    command: bytes
    tenant_limit: BucketLimit
    key_limit: BucketLimit
    cost: float
    future: asyncio.Future[Decision]


class BucketLimiter:
    """Per-tenant and per-key token buckets in Redis, checked together atomically.

    Use one limiter per event loop. Build it with `from_url` (which sets the socket timeouts and
    turns redis-py's retries off), or hand it a client configured the same way.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        owns_client: bool = False,
    ) -> None:
        if timeout <= 0 or max_batch < 1 or max_in_flight < 1:
            raise ValueError("timeout, max_batch and max_in_flight must be positive")
        self._redis = redis
        self._timeout = timeout
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._owns_client = owns_client
        # Limits repeat per agent, so their encoding is computed once per limiter.
        self._encode_limits = functools.lru_cache(maxsize=4096)(encode_limits)
        self._pending: list[_PendingCheck] = []
        self._idle: list[Any] = []  # connections between batches; at most max_in_flight
        self._flush_scheduled = False
        self._batches: set[asyncio.Task[None]] = set()
        self._closed = False
        self._checks = 0
        self._round_trips = 0
        self._undecided = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> BucketLimiter:
        redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            # The pool makes the batches' connections (at most one per batch in flight) and
            # serves `load_script`.
            max_connections=max_in_flight,
        )
        return cls(
            redis,
            timeout=timeout,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
            owns_client=True,
        )

    @property
    def checks(self) -> int:
        """Checks accepted so far."""
        return self._checks

    @property
    def undecided(self) -> int:
        """Checks accepted whose decision has not come yet."""
        return self._undecided

    @property
    def round_trips(self) -> int:
        """Requests written to Redis so far (batches, script loads and their retries)."""
        return self._round_trips

    async def load_script(self) -> None:
        """Load the script now (at start-up, or as a readiness probe) instead of on first use."""
        self._round_trips += 1
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.script_load(BUCKETS_LUA)
        except Exception as exc:
            raise _translate(exc, self._timeout) from exc

    async def check(
        self,
        tenant_id: str,
        key_id: str,
        tenant_limit: BucketLimit,
        key_limit: BucketLimit,
        cost: float = 1,
    ) -> Decision:
        """Consume `cost` tokens from both buckets if both hold them, otherwise from neither."""
        return await self.submit(tenant_id, key_id, tenant_limit, key_limit, cost)

    def submit(
        self,
        tenant_id: str,
        key_id: str,
        tenant_limit: BucketLimit,
        key_limit: BucketLimit,
        cost: float = 1,
    ) -> asyncio.Future[Decision]:
        """As `check`, but return at once with the decision's future, so that the caller can
        do other work while Redis answers. The future always completes: with the decision, or
        with a RateLimitError (a closed limiter, Redis failing or past the limiter's timeout).
        Only a cost that does not fit the buckets raises here: ValueError."""
        if not 0 < cost <= min(tenant_limit.burst, key_limit.burst):
            raise ValueError(f"cost must be positive and fit in both buckets: {cost}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        if self._closed:
            future.set_exception(LimiterUnavailable("the limiter is closed"))
            return future
        command = encode_call(
            tenant_bucket_key(tenant_id),
            key_bucket_key(tenant_id, key_id),
            self._encode_limits(tenant_limit, key_limit, cost),
        )
        self._pending.append(_PendingCheck(command, tenant_limit, key_limit, cost, future))
        self._checks += 1
        self._undecided += 1
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif not self._flush_scheduled:
            # Runs after every callback already queued, so the checks made in this loop
            # iteration share one round trip.
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    async def aclose(self) -> None:
        """Answer every accepted check, then close the client if the limiter created it."""
        self._closed = True
        while self._pending or self._batches:
            self._flush()
            await asyncio.gather(*self._batches, return_exceptions=True)
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect(nowait=True)
        if self._owns_client:
            await self._redis.aclose()

    def _flush(self) -> None:
        self._flush_scheduled = False
        # With every connection busy, checks keep queueing: the next batch is simply bigger.
        while self._pending and len(self._batches) < self._max_in_flight:
            if len(self._pending) <= self._max_batch:
                batch, self._pending = self._pending, []
            else:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _run(self, batch: list[_PendingCheck]) -> None:
        try:
            await self._decide(batch)
        finally:
            self._undecided -= len(batch)

    async def _decide(self, batch: list[_PendingCheck]) -> None:
        # A caller that gave up before its check was sent should not spend tokens.
        batch = [check for check in batch if not check.future.done()]
        if not batch:
            return
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._evaluate(batch)
        except asyncio.CancelledError:
            for check in batch:
                _fail(check, LimiterUnavailable("the limiter was closed"))
            raise
        except Exception as exc:
            for check in batch:
                _fail(check, _translate(exc, self._timeout), exc)
            return
        for check, reply in zip(batch, replies, strict=True):
            if check.future.done():  # cancelled while in flight: its tokens stay spent
                continue
            if isinstance(reply, Exception):
                _fail(check, _translate(reply, self._timeout), reply)
                continue
            try:
                allowed, tenant_level, key_level = reply
                decision = decide(
                    allowed == 1,
                    float(tenant_level),
                    float(key_level),
                    check.tenant_limit,
                    check.key_limit,
                    check.cost,
                )
            except (TypeError, ValueError) as exc:
                _fail(check, LimiterScriptError(f"unexpected script reply: {reply!r}"), exc)
                continue
            check.future.set_result(decision)

    async def _evaluate(self, batch: list[_PendingCheck]) -> list[Any]:
        replies = await self._send([check.command for check in batch])
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis restarted or its scripts were flushed. A NOSCRIPT call did not run, so
            # sending it again after loading the script cannot consume anything twice.
            again = await self._send([LOAD_COMMAND, *(batch[i].command for i in missing)])
            for i, reply in zip(missing, again[1:], strict=True):
                replies[i] = reply
        return replies

    async def _send(self, commands: list[bytes]) -> list[Any]:
        """Write the commands in one go and read one reply (or error reply) for each.

        On a connection of the limiter's own (made by the client's pool, never lent to it),
        minus redis-py's per-argument encoding, per-reply timers and the pool's checkout work
        (a lock, a readiness probe, metrics): the caller's timeout bounds the whole exchange,
        and a connection whose exchange did not end cleanly is closed, so no reply is ever
        left on it to be misread.
        """
        idle = self._idle
        if idle:
            connection = idle.pop()
        else:
            connection = self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            # The batch's own timeout bounds the exchange; with a socket timeout too, redis-py
            # would wrap every write in `wait_for` (a task and a timer per round trip).
            connection.socket_timeout = None
        clean = False
        try:
            try:
                replies = await self._exchange(connection, commands)
            except _StaleConnection:
                # A kept connection to a Redis that has since restarted fails before any
                # reply: that Redis never saw the calls, so they go once more on a new
                # connection. (Had a live Redis dropped the connection after running them,
                # the tokens are spent twice: the error is on the side of refusing.)
                await connection.disconnect(nowait=True)
                replies = await self._exchange(connection, commands, retry=False)
            clean = True
            return replies
        finally:
            if clean and not self._closed:
                idle.append(connection)
            else:
                await connection.disconnect(nowait=True)

    async def _exchange(
        self, connection: Any, commands: list[bytes], *, retry: bool = True
    ) -> list[Any]:
        self._round_trips += 1
        replies: list[Any] = []
        try:
            await connection.send_packed_command(b"".join(commands), check_health=False)
            for _ in commands:
                try:
                    replies.append(await connection.read_response(timeout=math.inf))
                except ResponseError as exc:  # raised after the whole reply was read
                    replies.append(exc)
        except (RedisConnectionError, OSError) as exc:
            if retry and not replies:
                raise _StaleConnection() from exc
            raise
        return replies


class _StaleConnection(Exception):
    pass


def _fail(check: _PendingCheck, error: RateLimitError, cause: BaseException | None = None) -> None:
    if not check.future.done():
        error.__cause__ = cause
        check.future.set_exception(error)


def _translate(exc: BaseException, timeout: float) -> RateLimitError:
    """A fresh error for each caller, in the limiter's own terms."""
    if isinstance(exc, _TRANSIENT_REFUSALS) or str(exc).startswith("BUSY"):
        return LimiterUnavailable(f"Redis cannot run the script now: {exc}")
    if isinstance(exc, ResponseError):
        return LimiterScriptError(f"Redis refused the bucket script: {exc}")
    if isinstance(exc, TimeoutError):
        return LimiterUnavailable(f"Redis did not answer within {timeout} s")
    return LimiterUnavailable(f"Redis is unavailable: {exc}")
