"""Listens to the CMP's announcements on Redis: registry changes and key revocations.

It subscribes first and then reloads the revocation set and drops the registry cache, so
nothing announced while it was disconnected is missed. While disconnected, `connected` is
False and readiness reports it."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from cmp import wire
from cmp.redis_clients import AnyRedis
from gateway.registry import RegistryCache

log = logging.getLogger("sitekit.gateway")


class RevokedKeys:
    def __init__(self) -> None:
        self._ids: set[str] = set()

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, key_id: str) -> None:
        self._ids.add(key_id)

    def update(self, key_ids: set[str]) -> None:
        # Revocation is forever: a Redis that lost its data must not bring a key back.
        self._ids |= key_ids


class ChangeListener:
    def __init__(
        self,
        redis: AnyRedis,
        registry: RegistryCache,
        revoked: RevokedKeys,
        on_jwks_change: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self._redis = redis
        self._registry = registry
        self._revoked = revoked
        self._on_jwks_change = on_jwks_change
        self._jwks_refresh: asyncio.Task[None] | None = None
        self.connected = False
        self.ready = asyncio.Event()

    async def run(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._listen()
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("lost the change feed from Redis: %s", exc)
                self.connected = False
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(
                wire.REGISTRY_CHANNEL, wire.REVOKED_CHANNEL, wire.JWKS_CHANNEL
            )
            members = await self._redis.smembers(wire.REVOKED_SET)
            self._revoked.update({_text(m) for m in members})
            self._registry.clear()
            self.connected = True
            self.ready.set()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                if message is None:
                    # An idle feed still proves the connection is alive.
                    await pubsub.ping()
                    continue
                if message["type"] != "message":
                    continue
                data = _text(message["data"])
                channel = _text(message["channel"])
                if channel == wire.REVOKED_CHANNEL:
                    self._revoked.add(data)
                elif channel == wire.JWKS_CHANNEL:
                    if self._jwks_refresh is None or self._jwks_refresh.done():
                        self._jwks_refresh = asyncio.create_task(self._on_jwks_change())
                else:
                    self._registry.invalidate(data)
        finally:
            self.connected = False
            await pubsub.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
