"""A buyer's agent config (CustomerAgentConfig): what the buyer edits, and how it becomes the
registry entry gateways route by. `agent_instances` holds the registry's copy; this module is
the one place that writes it from a config."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from cmp.errors import NotFound
from cmp.redis_clients import AnyRedis
from cmp.registry import AgentInstance, Limits, publish_entry, save_instance

CONFIG_COLUMNS = (
    "c.agent_id, c.tenant_id, c.order_id, c.provider_agent_id, c.flow_version, c.display_name,"
    " c.greeting, c.theme, c.starter_prompts, c.allowed_origins, c.plan, c.limits, c.suspended,"
    " c.provisioning, c.failure_reason, c.runtime_url, c.flow_id, c.created_at, c.updated_at"
)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    row: asyncpg.Record

    @property
    def agent_id(self) -> uuid.UUID:
        value: uuid.UUID = self.row["agent_id"]
        return value

    @property
    def status(self) -> str:
        """pending, provisioning, active or failed; suspended overrides them all."""
        return "suspended" if self.row["suspended"] else str(self.row["provisioning"])

    def as_json(self) -> dict[str, Any]:
        row = dict(self.row)
        row["theme"] = orjson.loads(row["theme"])
        row["limits"] = orjson.loads(row["limits"])
        row["status"] = self.status
        return row

    def instance(self) -> AgentInstance:
        row = self.row
        assert row["flow_id"] is not None and row["runtime_url"] is not None
        widget: dict[str, Any] = {
            "greeting": row["greeting"],
            "starter_prompts": list(row["starter_prompts"]),
            "theme": orjson.loads(row["theme"]),
        }
        return AgentInstance(
            agent_id=str(row["agent_id"]), tenant_id=str(row["tenant_id"]),
            name=row["display_name"], runtime_url=row["runtime_url"], flow_id=row["flow_id"],
            flow_version=row["flow_version"],
            status="suspended" if row["suspended"] else "active",
            limits=Limits.from_json(orjson.loads(row["limits"])),
            allowed_origins=tuple(row["allowed_origins"]), widget=widget,
        )


async def load_config(
    conn: asyncpg.Connection, agent_id: uuid.UUID, tenant_ids: list[uuid.UUID] | None,
    *, for_update: bool = False,
) -> AgentConfig:
    """One config; with `tenant_ids`, only if one of those tenants owns it."""
    row = await conn.fetchrow(
        f"SELECT {CONFIG_COLUMNS} FROM customer_agent_configs c WHERE c.agent_id = $1"
        " AND ($2::uuid[] IS NULL OR c.tenant_id = ANY($2))"
        + (" FOR UPDATE" if for_update else ""),
        agent_id, tenant_ids,
    )
    if row is None:
        raise NotFound(f"no agent config {agent_id}")
    return AgentConfig(row)


async def publish_config(
    conn: asyncpg.Connection, redis: AnyRedis, config: AgentConfig
) -> None:
    """Write the registry's copy and tell gateways; a config not yet provisioned has none."""
    if config.row["provisioning"] != "active":
        return
    instance = await save_instance(conn, config.instance())
    await publish_entry(redis, instance)
