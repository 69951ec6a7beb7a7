"""ClusterLimiter: the limiter on a Redis Cluster of several shards.

Both buckets of a check carry the tenant's hash tag, so a check touches one slot, which one
primary serves. The limiter keeps the cluster's slot map (CLUSTER SLOTS, asked of the node in
its URL, or of any node it has seen when that one is down) and a `BucketLimiter` per primary:
each check goes to its slot's primary, where it is batched with that node's other checks
exactly as on a single Redis.

A node that does not serve a check's slot refuses it before running anything, so following
its redirection cannot spend tokens twice:
- MOVED (resharding finished, or a replica took over): the check goes once more, to the node
  named, and the whole map is read again in the background.
- ASK (the slot is being migrated and the tenant's buckets are already on the target): the
  check goes once to the target, after ASKING, as EVAL with the script's text (the target
  may not have loaded it).
- TRYAGAIN (mid-migration, the tenant's two buckets split between the two nodes, or a new
  key's bucket not yet on the target that already has the tenant's): the check waits for the
  rest of the slot's keys to move, and is sent again after 2, 4, 8... ms, for at most
  MIGRATION_WAIT_S in all; past that it fails with LimiterMigrating.
A check follows at most two redirections per attempt; past that, and for CLUSTERDOWN or a node
that does not answer, it fails with LimiterUnavailable, as on a single Redis: the gateway
answers 503 and the client retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot

from ratelimit.buckets import BucketLimit, Decision, check_cost
from ratelimit.errors import (
    LimiterMigrating,
    LimiterRedirected,
    LimiterUnavailable,
    RateLimitError,
)
from ratelimit.keys import check_key_id, key_bucket_key, tenant_bucket_key
from ratelimit.limiter import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_TIMEOUT,
    BucketLimiter,
    script_decision,
    translate_error,
)
from ratelimit.pipe import RedisAddress, RedisPipe, encode_command
from ratelimit.script import encode_eval, encode_limits

SLOTS = 16384
MAX_REDIRECTS = 2
# After a node failed (a failover may have moved its slots), how soon the map may be read again.
REFRESH_INTERVAL_S = 0.5
# TRYAGAIN: the first wait before a check is sent again, and the most it waits in all. Tools
# migrate a slot's keys in batches of ten to a hundred, so a tenant's buckets are split for
# milliseconds; a bigger slot, or a migration left half done, ends in a 503.
MIGRATION_FIRST_WAIT_S = 0.002
MIGRATION_WAIT_S = 0.25
_CLUSTER_SLOTS = encode_command(b"CLUSTER", b"SLOTS")
_ASKING = encode_command(b"ASKING")

Node = tuple[str, int]


@dataclass(slots=True)
class _Check:
    tenant_id: str
    key_id: str
    tenant_limit: BucketLimit
    key_limit: BucketLimit
    cost: float
    slot: int
    waited: float = 0.0  # how long it has waited for migrations (TRYAGAIN) so far


def check_cluster_address(address: RedisAddress) -> None:
    """What a Redis Cluster's URL cannot name: ValueError, saying which part."""
    if address.path is not None:
        raise ValueError("a Redis Cluster is reached over TCP: the URL names a Unix socket")
    if address.db:
        raise ValueError(f"Redis Cluster has database 0 only: the URL names database {address.db}")


def tenant_slot(tenant_id: str) -> int:
    """The cluster slot of a tenant's buckets (both keys hash their `{tenant}` tag only)."""
    return key_slot(tenant_bucket_key(tenant_id).encode())


class ClusterLimiter:
    """`BucketLimiter`'s interface on a Redis Cluster; see the module docstring."""

    def __init__(
        self,
        seed: RedisAddress,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        check_cluster_address(seed)
        if timeout <= 0 or max_batch < 1 or max_in_flight < 1:
            raise ValueError("timeout, max_batch and max_in_flight must be positive")
        self._seed = seed
        self._timeout = timeout
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._owners: list[Node | None] = [None] * SLOTS
        self._nodes: dict[Node, BucketLimiter] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -math.inf
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slot_of: Callable[[str], int] = functools.lru_cache(maxsize=65536)(tenant_slot)
        self._closed = False
        self._checks = 0
        self._undecided = 0
        self._own_round_trips = 0  # slot map reads and ASK calls
        self._redirects = 0
        self._migration_waits = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> ClusterLimiter:
        """A limiter on the cluster that the node of a redis-py URL belongs to
        (`redis://[[user]:password@]host[:port]`, `rediss://` for TLS): every node is logged
        in to with the URL's credentials and TLS settings."""
        return cls(
            RedisAddress.from_url(url),
            timeout=timeout,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
        )

    @property
    def checks(self) -> int:
        return self._checks

    @property
    def undecided(self) -> int:
        return self._undecided

    @property
    def round_trips(self) -> int:
        return self._own_round_trips + sum(node.round_trips for node in self._nodes.values())

    @property
    def redirects(self) -> int:
        """Checks sent again after a MOVED or ASK reply."""
        return self._redirects

    @property
    def migration_waits(self) -> int:
        """Checks sent again after a TRYAGAIN reply."""
        return self._migration_waits

    @property
    def nodes(self) -> list[Node]:
        """The primaries of the slot map, as last read."""
        return sorted({owner for owner in self._owners if owner is not None})

    async def load_script(self) -> None:
        """Read the slot map and load the script on every primary (at start-up, or as a
        readiness probe)."""
        await self._refresh_now()
        await asyncio.gather(*(self._node(node).load_script() for node in self.nodes))

    async def check(
        self,
        tenant_id: str,
        key_id: str,
        tenant_limit: BucketLimit,
        key_limit: BucketLimit,
        cost: float = 1,
    ) -> Decision:
        return await self.submit(tenant_id, key_id, tenant_limit, key_limit, cost)

    def submit(
        self,
        tenant_id: str,
        key_id: str,
        tenant_limit: BucketLimit,
        key_limit: BucketLimit,
        cost: float = 1,
    ) -> asyncio.Future[Decision]:
        """As `BucketLimiter.submit`: the future always completes, with the decision or a
        RateLimitError; a bad argument raises ValueError here."""
        check_cost(cost, tenant_limit, key_limit)
        slot = self._slot_of(tenant_id)  # a bad tenant id raises here (ValueError)
        check_key_id(key_id)
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(LimiterUnavailable("the limiter is closed"))
            return future
        self._checks += 1
        self._undecided += 1
        future.add_done_callback(self._decided)
        self._dispatch(future, _Check(tenant_id, key_id, tenant_limit, key_limit, cost, slot))
        return future

    async def aclose(self) -> None:
        """Answer every accepted check, then close every node's connection."""
        self._closed = True
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(node.aclose() for node in self._nodes.values()))

    # --- routing ---------------------------------------------------------------------------

    def _dispatch(self, future: asyncio.Future[Decision], check: _Check) -> None:
        """To the slot's primary, or to reading the slot map first when it has none yet."""
        owner = self._owners[check.slot]
        if owner is None:
            self._spawn(self._route(future, check))
        else:
            self._send(future, check, owner, redirects=0)

    def _send(
        self, future: asyncio.Future[Decision], check: _Check, owner: Node, *, redirects: int
    ) -> None:
        inner = self._node(owner).submit(
            check.tenant_id, check.key_id, check.tenant_limit, check.key_limit, check.cost
        )
        inner.add_done_callback(functools.partial(self._answered, future, check, redirects))
        # A caller that gives up before the check is written spends no tokens (BucketLimiter).
        future.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)

    def _answered(
        self, future: asyncio.Future[Decision], check: _Check, redirects: int,
        inner: asyncio.Future[Decision],
    ) -> None:
        if future.done():
            return
        if inner.cancelled():
            future.cancel()
            return
        error = inner.exception()
        if error is None:
            future.set_result(inner.result())
            return
        if isinstance(error, LimiterRedirected) and redirects < MAX_REDIRECTS and not self._closed:
            self._redirects += 1
            self._spawn(self._follow(future, check, error, redirects + 1))
            return
        if isinstance(error, LimiterMigrating) and self._wait_for_migration(future, check):
            return
        if isinstance(error, LimiterUnavailable):
            self._refresh_soon()  # a node that fails may have been replaced by a replica
        future.set_exception(error)

    async def _route(self, future: asyncio.Future[Decision], check: _Check) -> None:
        """A check whose slot has no known owner yet: read the map first."""
        try:
            await self._refresh_now()
            owner = self._owners[check.slot]
            if owner is None:
                raise LimiterUnavailable(
                    f"no node of the Redis Cluster serves slot {check.slot} (of tenant "
                    f"{check.tenant_id!r}): the cluster is being set up or lost a shard"
                )
            if not future.done():
                self._send(future, check, owner, redirects=0)
        except RateLimitError as exc:
            if not future.done():
                future.set_exception(exc)

    async def _follow(
        self, future: asyncio.Future[Decision], check: _Check, redirect: LimiterRedirected,
        redirects: int,
    ) -> None:
        target = (redirect.host, redirect.port)
        if not redirect.ask:
            self._owners[redirect.slot] = target
            self._refresh_soon(force=True)  # the rest of a resharding or failover, at once
            if not future.done():
                self._send(future, check, target, redirects=redirects)
            return
        try:
            decision = await self._ask(target, check)
        except RateLimitError as exc:
            if isinstance(exc, LimiterMigrating) and self._wait_for_migration(future, check):
                return
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(decision)

    async def _ask(self, target: Node, check: _Check) -> Decision:
        """The check once on the node importing its slot (ASKING applies to one command)."""
        command = encode_eval(
            tenant_bucket_key(check.tenant_id),
            key_bucket_key(check.tenant_id, check.key_id),
            encode_limits(check.tenant_limit, check.key_limit, check.cost),
        )
        self._own_round_trips += 1
        try:
            async with asyncio.timeout(self._timeout):
                pipe = await RedisPipe.open(self._address(target))
                try:
                    asking, reply = await pipe.request([_ASKING, command])
                finally:
                    pipe.close("the migrating slot's check is answered")
        except Exception as exc:
            raise translate_error(exc, self._timeout) from exc
        if isinstance(asking, Exception):
            raise translate_error(asking, self._timeout) from asking
        return script_decision(
            reply, check.tenant_limit, check.key_limit, check.cost, self._timeout
        )

    def _wait_for_migration(self, future: asyncio.Future[Decision], check: _Check) -> bool:
        """After TRYAGAIN: send the check again later (True), unless it has waited
        MIGRATION_WAIT_S already, or the limiter is closing (False: it fails now)."""
        delay = min(check.waited + MIGRATION_FIRST_WAIT_S, MIGRATION_WAIT_S - check.waited)
        if delay <= 0 or self._closed or future.done():
            return False
        check.waited += delay
        self._migration_waits += 1
        self._spawn(self._again(future, check, delay))
        return True

    async def _again(self, future: asyncio.Future[Decision], check: _Check, delay: float) -> None:
        await asyncio.sleep(delay)
        if future.done():
            return
        if self._closed:
            future.set_exception(LimiterUnavailable("the limiter is closed"))
            return
        self._dispatch(future, check)

    # --- the slot map ----------------------------------------------------------------------

    def _refresh_soon(self, *, force: bool = False) -> None:
        if self._closed or (self._refreshing is not None and not self._refreshing.done()):
            return
        if not force and time.monotonic() - self._refreshed_at < REFRESH_INTERVAL_S:
            return
        self._refreshing = self._spawn(self._refresh())

    async def _refresh_now(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self._spawn(self._refresh())
        try:
            await asyncio.shield(self._refreshing)
        except RateLimitError:
            raise
        except Exception as exc:
            raise translate_error(exc, self._timeout) from exc

    async def _refresh(self) -> None:
        """Read the slot map from the URL's node, else from each node seen so far."""
        self._refreshed_at = time.monotonic()
        seed: Node = (self._seed.host, self._seed.port)
        asked = [seed, *(node for node in self._nodes if node != seed)]
        errors = []
        for node in asked:
            self._own_round_trips += 1
            try:
                async with asyncio.timeout(self._timeout):
                    pipe = await RedisPipe.open(self._address(node))
                    try:
                        (reply,) = await pipe.request([_CLUSTER_SLOTS])
                    finally:
                        pipe.close("the slot map is read")
                if isinstance(reply, Exception):
                    raise reply
                self._apply(reply, node)
                return
            except Exception as exc:  # the next node may answer
                errors.append(f"{node[0]}:{node[1]}: {str(exc) or type(exc).__name__}")
        raise LimiterUnavailable(
            f"could not read the Redis Cluster's slot map ({'; '.join(errors)})"
        )

    def _apply(self, reply: Any, asked: Node) -> None:
        owners: list[Node | None] = [None] * SLOTS
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            # A node that does not know its own address reports "" (or "?"): it is the one asked.
            node = (host if host not in ("", "?") else asked[0], int(primary[1]))
            owners[start : end + 1] = [node] * (end - start + 1)
        self._owners = owners
        serving = set(owners)
        for node in [node for node in self._nodes if node not in serving]:
            self._spawn(self._nodes.pop(node).aclose())  # answers what it still holds

    # --- internals -------------------------------------------------------------------------

    def _node(self, node: Node) -> BucketLimiter:
        limiter = self._nodes.get(node)
        if limiter is None:
            limiter = self._nodes[node] = BucketLimiter(
                self._address(node), timeout=self._timeout, max_batch=self._max_batch,
                max_in_flight=self._max_in_flight,
            )
        return limiter

    def _address(self, node: Node) -> RedisAddress:
        return dataclasses.replace(self._seed, host=node[0], port=node[1])

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_report)
        return task

    def _decided(self, _: asyncio.Future[Decision]) -> None:
        self._undecided -= 1


def _report(task: asyncio.Task[Any]) -> None:
    """A map read that failed in the background is reported through the checks it fails;
    anything else a task raised is a bug, and goes to the loop's exception handler."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, RateLimitError):
        asyncio.get_running_loop().call_exception_handler(
            {"message": "a ClusterLimiter task failed", "exception": error, "task": task}
        )
