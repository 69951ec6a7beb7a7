"""Registry entries: what a gateway needs to route one agent instance, authored here from the
`agent_instances` table and published to Redis with an invalidation event."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from cmp import wire
from cmp.errors import InvalidInput, NotFound, Unavailable
from cmp.redis_clients import AnyRedis, write_and_announce


@dataclass(frozen=True, slots=True)
class BucketLimit:
    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class Limits:
    tenant: BucketLimit
    key: BucketLimit

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": {"rate": self.tenant.rate, "burst": self.tenant.burst},
            "key": {"rate": self.key.rate, "burst": self.key.burst},
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Limits:
        try:
            return cls(
                tenant=BucketLimit(float(raw["tenant"]["rate"]), int(raw["tenant"]["burst"])),
                key=BucketLimit(float(raw["key"]["rate"]), int(raw["key"]["burst"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(
                "limits must be {tenant: {rate, burst}, key: {rate, burst}}",
                fields={"limits": str(exc)},
            ) from exc


DEFAULT_LIMITS = Limits(tenant=BucketLimit(50.0, 100), key=BucketLimit(10.0, 20))


@dataclass(frozen=True, slots=True)
class AgentInstance:
    agent_id: str
    tenant_id: str
    name: str
    runtime_url: str
    flow_id: str
    flow_version: int
    status: str = "active"
    limits: Limits = DEFAULT_LIMITS
    allowed_origins: tuple[str, ...] = ()
    widget: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def registry_entry(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "tenant_id": self.tenant_id,
            "status": self.status,
            "runtime_url": self.runtime_url,
            "flow_id": self.flow_id,
            "flow_version": self.flow_version,
            "collection": wire.collection_name(self.tenant_id, self.agent_id),
            "limits": self.limits.to_json(),
            "allowed_origins": list(self.allowed_origins),
            "widget": {"name": self.name, **self.widget},
            "version": self.version,
        }


_COLUMNS = (
    "agent_id::text, tenant_id::text, name, status, runtime_url, flow_id, flow_version,"
    " limits, allowed_origins, widget, version"
)


def _instance(row: asyncpg.Record) -> AgentInstance:
    return AgentInstance(
        agent_id=row["agent_id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        status=row["status"],
        runtime_url=row["runtime_url"],
        flow_id=row["flow_id"],
        flow_version=row["flow_version"],
        limits=Limits.from_json(orjson.loads(row["limits"])),
        allowed_origins=tuple(row["allowed_origins"]),
        widget=orjson.loads(row["widget"]),
        version=row["version"],
    )


async def save_instance(conn: asyncpg.Connection, instance: AgentInstance) -> AgentInstance:
    """Insert or update an agent instance; each change bumps its version."""
    row = await conn.fetchrow(
        "INSERT INTO agent_instances (agent_id, tenant_id, name, status, runtime_url, flow_id,"
        " flow_version, limits, allowed_origins, widget)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        " ON CONFLICT (agent_id) DO UPDATE SET name = $3, status = $4, runtime_url = $5,"
        " flow_id = $6, flow_version = $7, limits = $8, allowed_origins = $9, widget = $10,"
        " version = agent_instances.version + 1, updated_at = now()"
        " WHERE agent_instances.tenant_id = $2"
        f" RETURNING {_COLUMNS}",
        uuid.UUID(instance.agent_id), uuid.UUID(instance.tenant_id), instance.name,
        instance.status, instance.runtime_url, instance.flow_id, instance.flow_version,
        orjson.dumps(instance.limits.to_json()).decode(), list(instance.allowed_origins),
        orjson.dumps(instance.widget).decode(),
    )
    if row is None:
        raise NotFound(f"no agent instance {instance.agent_id} for this tenant")
    return _instance(row)


async def load_instance(
    conn: asyncpg.Connection, agent_id: str, tenant_id: str | None = None
) -> AgentInstance:
    """One instance; with `tenant_id`, only if it belongs to that tenant."""
    try:
        agent_uuid = uuid.UUID(agent_id)
    except ValueError:
        raise NotFound(f"no agent instance {agent_id!r}") from None
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM agent_instances"
        " WHERE agent_id = $1 AND ($2::uuid IS NULL OR tenant_id = $2::uuid)",
        agent_uuid, uuid.UUID(tenant_id) if tenant_id else None,
    )
    if row is None:
        raise NotFound(f"no agent instance {agent_id!r}")
    return _instance(row)


async def publish_entry(redis: AnyRedis, instance: AgentInstance) -> None:
    """Write the entry, then tell every gateway to drop its cached copy."""
    entry = orjson.dumps(instance.registry_entry())
    try:
        await write_and_announce(
            redis, lambda pipe: pipe.set(wire.registry_key(instance.agent_id), entry),
            wire.REGISTRY_CHANNEL, [instance.agent_id],
        )
    except (RedisError, OSError) as exc:
        raise Unavailable(f"could not publish registry entry: {exc}") from exc


async def republish_all(conn: asyncpg.Connection, redis: AnyRedis) -> int:
    """Write every entry again: after Redis lost its data, gateways find them all back."""
    count = 0
    async with conn.transaction():
        async for row in conn.cursor(f"SELECT {_COLUMNS} FROM agent_instances"):
            await publish_entry(redis, _instance(row))
            count += 1
    return count
