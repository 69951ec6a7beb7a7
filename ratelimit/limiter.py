"""BucketLimiter: checks the buckets of many concurrent requests in one Redis round trip.

Checks made during one event-loop iteration (or until `max_batch` are waiting) are written to
Redis as a single pipelined burst of EVALSHA calls, on one connection of the limiter's own
(`RedisPipe`) where up to `max_in_flight` batches are outstanding at a time and answered in
order. Each call is still its own atomic script run, so batching changes the cost per check,
not the result: a bucket of N admits N.

No retries on purpose: a script whose reply was lost may have consumed tokens, and sending it
again would consume them twice. A failure answers every check of the batch with
LimiterUnavailable (the gateway fails closed); tokens that a lost reply consumed stay consumed,
which errs towards refusing, never towards admitting too many. The one exception is a batch on
a connection that Redis closed before answering any of it (a Redis restarted since the
connection was made): it goes once more, on a new connection.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from ratelimit.buckets import BucketLimit, Decision, check_cost, decide
from ratelimit.errors import (
    LimiterMigrating,
    LimiterRedirected,
    LimiterScriptError,
    LimiterUnavailable,
    RateLimitError,
)
from ratelimit.keys import key_bucket_key, tenant_bucket_key
from ratelimit.pipe import PipeClosed, RedisAddress, RedisPipe, Replies
from ratelimit.script import LOAD_COMMAND, encode_call, encode_limits

DEFAULT_TIMEOUT = 0.5
# Measured with loadtest/bench_ratelimit.py on 2 cores: bigger batches make the client and Redis
# take turns instead of overlapping, smaller ones run into the in-flight cap.
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_IN_FLIGHT = 8

# Error replies that describe the server's state, not the script: out of memory, a replica
# after failover, a cluster without a quorum. BUSY (another script hogging Redis) has no class;
# TRYAGAIN (a slot half migrated) is told apart (LimiterMigrating).
_TRANSIENT_REFUSALS = (OutOfMemoryError, ReadOnlyError, ClusterDownError)


@dataclass(slots=True)
class _PendingCheck:
    command: bytes
    tenant_limit: BucketLimit
    key_limit: BucketLimit
    cost: float
    future: asyncio.Future[Decision]
    resent: bool = False  # went once more after its connection was lost (the one retry)


@dataclass(slots=True, eq=False)
class _Batch:
    checks: list[_PendingCheck]
    timer: asyncio.TimerHandle | None = None
    settled: bool = False
    reloaded: bool = False  # the script was loaded again for its NOSCRIPT calls
    replies: Replies = field(default_factory=list)


class BucketLimiter:
    """Per-tenant and per-key token buckets in Redis, checked together atomically.

    Use one limiter per event loop, built with `from_url`.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if timeout <= 0 or max_batch < 1 or max_in_flight < 1:
            raise ValueError("timeout, max_batch and max_in_flight must be positive")
        self._address = address
        self._timeout = timeout
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        # Limits repeat per agent, so their encoding is computed once per limiter.
        self._encode_limits = functools.lru_cache(maxsize=4096)(encode_limits)
        self._pending: list[_PendingCheck] = []
        self._flush_scheduled = False
        self._pipe: RedisPipe | None = None
        self._connecting: asyncio.Task[RedisPipe] | None = None
        self._in_flight = 0  # batches written and not yet answered
        self._drained: asyncio.Future[None] | None = None  # what `aclose` waits on
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
        """A limiter on the Redis of a redis-py URL (`redis://[[user]:password@]host[:port][/db]`,
        `rediss://` for TLS, `unix://path?db=N`); `timeout` bounds connecting and each batch."""
        return cls(
            RedisAddress.from_url(url),
            timeout=timeout,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
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
        try:
            async with asyncio.timeout(self._timeout):
                pipe = await self._ready()
                self._round_trips += 1
                (reply,) = await pipe.request([LOAD_COMMAND])
            if isinstance(reply, Exception):
                raise reply
        except Exception as exc:
            raise translate_error(exc, self._timeout) from exc

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
        check_cost(cost, tenant_limit, key_limit)
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
        """Answer every accepted check, then close the connection."""
        self._closed = True
        while True:
            self._flush()
            if not (self._pending or self._in_flight or self._connecting is not None):
                break
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained  # woken when a batch is answered or a connection attempt ends
            finally:
                self._drained = None
        if self._pipe is not None:
            self._pipe.close("the limiter is closed")

    # --- batches ---------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        # With every batch in flight, checks keep queueing: the next batch is simply bigger.
        while self._pending and self._in_flight < self._max_in_flight:
            pipe = self._pipe
            if pipe is None or pipe.closed:
                self._connect()  # flushes again once connected
                return
            if len(self._pending) <= self._max_batch:
                checks, self._pending = self._pending, []
            else:
                checks = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
            self._send(pipe, checks)

    def _send(self, pipe: RedisPipe, checks: list[_PendingCheck]) -> None:
        # A caller that gave up before its check was sent should not spend tokens.
        live = [check for check in checks if not check.future.done()]
        self._undecided -= len(checks) - len(live)
        if not live:
            self._wake_aclose()
            return
        batch = _Batch(live)
        self._in_flight += 1
        self._round_trips += 1
        batch.timer = asyncio.get_running_loop().call_later(
            self._timeout, self._expired, batch, pipe
        )
        pipe.call(
            b"".join([check.command for check in live]),
            len(live),
            functools.partial(self._answered, batch, pipe),
        )

    def _answered(self, batch: _Batch, pipe: RedisPipe, replies: Replies | BaseException) -> None:
        if batch.settled:  # past its timeout, and already answered
            return
        if isinstance(replies, BaseException):
            if (
                isinstance(replies, PipeClosed)
                and replies.by_peer
                and not replies.answered
                and not any(check.resent for check in batch.checks)
            ):
                # Closed by Redis before it answered any of the batch: a Redis restarted since
                # the connection was made never saw the calls, so they go once more on a new
                # connection. (Had a live Redis closed it after running them, the tokens are
                # spent twice: the error is on the side of refusing.)
                self._settle(batch, again=True)
            else:
                self._settle(batch, failure=replies)
            return
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing and not batch.reloaded:
            # Redis restarted or its scripts were flushed. A NOSCRIPT call did not run, so
            # sending it again after loading the script cannot consume anything twice.
            batch.reloaded, batch.replies = True, replies
            self._round_trips += 1
            pipe.call(
                LOAD_COMMAND + b"".join([batch.checks[i].command for i in missing]),
                len(missing) + 1,
                functools.partial(self._reloaded, batch, missing),
            )
            return
        batch.replies = replies
        self._settle(batch)

    def _reloaded(self, batch: _Batch, missing: list[int], again: Replies | BaseException) -> None:
        if batch.settled:
            return
        for n, i in enumerate(missing, start=1):
            batch.replies[i] = again if isinstance(again, BaseException) else again[n]
        self._settle(batch)

    def _expired(self, batch: _Batch, pipe: RedisPipe) -> None:
        if batch.settled:
            return
        self._settle(batch, failure=TimeoutError())
        # A connection gone silent is not waited on again: the batches behind this one on it
        # fail too, and the next batch goes on a new connection.
        pipe.close(f"no reply within {self._timeout} s")

    def _settle(
        self, batch: _Batch, *, failure: BaseException | None = None, again: bool = False
    ) -> None:
        """The batch is out of Redis's hands: answer its checks (or queue them to go again)."""
        batch.settled = True
        if batch.timer is not None:
            batch.timer.cancel()
        self._in_flight -= 1
        if again:
            for check in batch.checks:
                check.resent = True
            self._pending[:0] = batch.checks
        else:
            self._undecided -= len(batch.checks)
            if failure is not None:
                for check in batch.checks:
                    _fail(check, translate_error(failure, self._timeout), failure)
            else:
                for check, reply in zip(batch.checks, batch.replies, strict=True):
                    _answer(check, reply, self._timeout)
        if self._pending:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._wake_aclose()

    # --- the connection --------------------------------------------------------------------

    def _connect(self) -> None:
        if self._connecting is None:
            task = asyncio.get_running_loop().create_task(self._open())
            task.add_done_callback(_retrieve)
            self._connecting = task

    async def _ready(self) -> RedisPipe:
        pipe = self._pipe
        if pipe is not None and not pipe.closed:
            return pipe
        if self._closed:
            raise LimiterUnavailable("the limiter is closed")
        self._connect()
        assert self._connecting is not None
        return await asyncio.shield(self._connecting)

    async def _open(self) -> RedisPipe:
        try:
            async with asyncio.timeout(self._timeout):
                pipe = await RedisPipe.open(self._address)
        except BaseException as exc:
            failed, self._pending = self._pending, []
            self._undecided -= len(failed)
            for check in failed:
                _fail(check, translate_error(exc, self._timeout), exc)
            raise
        finally:
            self._connecting = None
            self._wake_aclose()
        self._pipe = pipe
        self._flush()
        return pipe

    def _wake_aclose(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)


def _fail(check: _PendingCheck, error: RateLimitError, cause: BaseException | None = None) -> None:
    if not check.future.done():
        error.__cause__ = cause
        check.future.set_exception(error)


def _answer(check: _PendingCheck, reply: Any, timeout: float) -> None:
    if check.future.done():  # cancelled while in flight: its tokens stay spent
        return
    try:
        decision = script_decision(reply, check.tenant_limit, check.key_limit, check.cost, timeout)
    except RateLimitError as exc:
        _fail(check, exc, exc.__cause__)
        return
    check.future.set_result(decision)


def script_decision(
    reply: Any, tenant_limit: BucketLimit, key_limit: BucketLimit, cost: float, timeout: float
) -> Decision:
    """The decision in the bucket script's reply; an error reply raises it as a RateLimitError."""
    if isinstance(reply, Exception):
        raise translate_error(reply, timeout) from reply
    try:
        allowed, tenant_level, key_level = reply
        return decide(
            allowed == 1, float(tenant_level), float(key_level), tenant_limit, key_limit, cost
        )
    except (TypeError, ValueError) as exc:
        raise LimiterScriptError(f"unexpected script reply: {reply!r}") from exc


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A failed connection attempt is reported through the checks it failed."""
    if not task.cancelled():
        task.exception()


def translate_error(exc: BaseException, timeout: float) -> RateLimitError:
    """A fresh error for each caller, in the limiter's own terms."""
    if isinstance(exc, AskError):  # MOVED as well: a subclass
        moved = isinstance(exc, MovedError)
        return LimiterRedirected(
            f"Redis Cluster {'moved' if moved else 'is migrating'} the bucket's slot "
            f"{exc.slot_id} to {exc.host}:{exc.port}: a cluster of several shards needs a limiter "
            "that routes by slot (ratelimit.cluster.ClusterLimiter)",
            slot=exc.slot_id, host=exc.host, port=exc.port, ask=not moved,
        )
    if isinstance(exc, TryAgainError):
        return LimiterMigrating(
            f"Redis Cluster is migrating the bucket's slot and has moved only some of its "
            f"keys: {exc}"
        )
    if isinstance(exc, _TRANSIENT_REFUSALS) or str(exc).startswith("BUSY"):
        return LimiterUnavailable(f"Redis cannot run the script now: {exc}")
    if isinstance(exc, ResponseError):
        return LimiterScriptError(f"Redis refused the bucket script: {exc}")
    if isinstance(exc, TimeoutError):
        return LimiterUnavailable(f"Redis did not answer within {timeout} s")
    return LimiterUnavailable(f"Redis is unavailable: {exc}")
