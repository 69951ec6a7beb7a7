"""The registry as a gateway sees it: entries cached in process, read from Redis on a miss
(and from the CMP when Redis has none), dropped when the CMP announces a change."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from redis.exceptions import AskError, RedisError

from cmp import wire
from cmp.redis_clients import AnyRedis
from gateway.errors import Unavailable
from gateway.log_throttle import REDIS_CLUSTER_HINT, LogThrottle
from ratelimit.buckets import BucketLimit

log = logging.getLogger("sitekit.gateway")


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    agent_id: str
    tenant_id: str
    active: bool
    runtime_host: str
    runtime_port: int
    stream_path: str
    flow_id: str
    flow_version: int
    collection: str
    tenant_limit: BucketLimit
    key_limit: BucketLimit
    allowed_origins: frozenset[str]
    widget: dict[str, Any]
    version: int

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RegistryEntry:
        runtime = urlsplit(raw["runtime_url"])
        if runtime.scheme != "http" or not runtime.hostname:
            raise ValueError(f"runtime_url {raw['runtime_url']!r} is not an http URL")
        limits = raw["limits"]
        return cls(
            agent_id=raw["agent_id"],
            tenant_id=raw["tenant_id"],
            active=raw["status"] == "active",
            runtime_host=runtime.hostname,
            runtime_port=runtime.port or 80,
            stream_path=f"{runtime.path.rstrip('/')}/flows/{raw['flow_id']}/stream",
            flow_id=raw["flow_id"],
            flow_version=int(raw["flow_version"]),
            collection=raw["collection"],
            tenant_limit=_bucket(limits["tenant"]),
            key_limit=_bucket(limits["key"]),
            allowed_origins=frozenset(raw.get("allowed_origins") or ()),
            widget=dict(raw.get("widget") or {}),
            version=int(raw["version"]),
        )


def _bucket(raw: dict[str, Any]) -> BucketLimit:
    return BucketLimit(float(raw["rate"]), float(raw["burst"]))


class RegistryCache:
    def __init__(
        self, redis: AnyRedis, cmp: httpx.AsyncClient, cmp_token: str, *, timeout: float,
        max_entries: int = 100_000,
    ) -> None:
        self._redis = redis
        self._max_entries = max_entries
        self._cmp = cmp
        self._cmp_headers = {"authorization": f"Bearer {cmp_token}"}
        self._timeout = timeout
        self._failing = LogThrottle()  # each chat gets its 503 anyway
        self._entries: dict[str, RegistryEntry | None] = {}
        self._inflight: dict[str, asyncio.Future[RegistryEntry | None]] = {}
        # Bumped by every invalidation; a fetch that raced one is not cached.
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def resolve(self, agent_id: str) -> RegistryEntry | None:
        """The entry for `agent_id`, or None if no such agent instance exists."""
        try:
            return self._entries[agent_id]
        except KeyError:
            pass
        pending = self._inflight.get(agent_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[RegistryEntry | None] = asyncio.get_running_loop().create_future()
        self._inflight[agent_id] = future
        generation = self._generation
        try:
            entry = await self._fetch(agent_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may be none
            raise
        finally:
            del self._inflight[agent_id]
        if generation == self._generation:
            if len(self._entries) >= self._max_entries:
                # Any key holder can ask for made-up agent ids: memory stays bounded by
                # dropping the oldest entry (dicts keep insertion order).
                del self._entries[next(iter(self._entries))]
            self._entries[agent_id] = entry
        future.set_result(entry)
        return entry

    def invalidate(self, agent_id: str) -> None:
        self._generation += 1
        self._entries.pop(agent_id, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    async def _fetch(self, agent_id: str) -> RegistryEntry | None:
        try:
            raw = await asyncio.wait_for(
                self._redis.get(wire.registry_key(agent_id)), self._timeout
            )
        except (RedisError, OSError, TimeoutError) as exc:
            if self._failing.due():
                hint = f" ({REDIS_CLUSTER_HINT})" if isinstance(exc, AskError) else ""
                log.warning("cannot read the agent registry from Redis: %s: %s%s",
                            type(exc).__name__, exc, hint)
            raise Unavailable("the agent registry is unreachable") from exc
        if raw is None:
            return await self._fetch_from_cmp(agent_id)
        return _parse(raw)

    async def _fetch_from_cmp(self, agent_id: str) -> RegistryEntry | None:
        try:
            response = await self._cmp.get(
                f"/internal/registry/{agent_id}", headers=self._cmp_headers
            )
        except httpx.HTTPError as exc:
            raise Unavailable("the agent registry is unreachable") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise Unavailable(f"the agent registry answered {response.status_code}")
        return _parse(response.content)


def _parse(raw: bytes | str) -> RegistryEntry:
    try:
        return RegistryEntry.from_json(orjson.loads(raw))
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise Unavailable(f"the agent's registry entry is malformed: {exc}") from exc
