"""`/api/customer-agent-configs`: a buyer's agent instances. Each change is written to the
registry entry and announced, so gateways route by it within a second."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cmp.agent_configs import CONFIG_COLUMNS, AgentConfig, load_config, publish_config
from cmp.api.fields import Body, Name, Query
from cmp.api.operation import Call, Operation
from cmp.api.pages import FIRST_ID, Page
from cmp.apikeys import normalise_origins
from cmp.errors import Conflict
from cmp.provisioning import queue_provisioning

Status = Literal["pending", "provisioning", "active", "failed", "suspended"]
Plan = Literal["starter", "standard", "pro"]
# A plan scales the seller's limits for this instance.
PLAN_FACTORS: dict[str, float] = {"starter": 0.5, "standard": 1.0, "pro": 4.0}

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
Greeting = Annotated[str, StringConstraints(max_length=1000, pattern=r"^[^\x00]*$")]
OriginText = Annotated[str, StringConstraints(min_length=1, max_length=300)]


class Theme(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accent: str | None = Field(default=None, pattern=r"^#[0-9a-fA-F]{6}$")
    mode: Literal["light", "dark", "auto"] | None = None
    position: Literal["bottom-right", "bottom-left"] | None = None


class AgentConfigOut(BaseModel):
    agent_id: uuid.UUID
    tenant_id: uuid.UUID
    order_id: uuid.UUID
    provider_agent_id: uuid.UUID
    flow_version: int
    display_name: str
    greeting: str
    theme: dict[str, Any]
    starter_prompts: list[str]
    allowed_origins: list[str]
    plan: Plan
    limits: dict[str, Any]
    suspended: bool
    status: Status
    failure_reason: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class ConfigUpdate(Body):
    display_name: Name | None = None
    greeting: Greeting | None = None
    theme: Theme | None = None
    starter_prompts: list[Prompt] | None = Field(default=None, max_length=6)
    allowed_origins: list[OriginText] | None = Field(default=None, max_length=20)
    plan: Plan | None = None
    suspended: bool | None = None


class ConfigFilter(Query):
    org_id: uuid.UUID | None = None
    status: Status | None = None
    provider_agent_id: uuid.UUID | None = None


def _out(config: AgentConfig) -> AgentConfigOut:
    return AgentConfigOut(**{
        k: v for k, v in config.as_json().items() if k in AgentConfigOut.model_fields
    })


async def list_configs(call: Call) -> Page[AgentConfigOut]:
    page, wanted = call.page, call.query
    assert page is not None and isinstance(wanted, ConfigFilter)
    status = wanted.status
    # One index range (tenant_id, agent_id) per organisation, merged: a page costs the same for
    # a tenant with five instances among millions as for one with millions.
    rows = await call.conn.fetch(
        "SELECT c.* FROM unnest($1::uuid[]) AS t(tenant_id) CROSS JOIN LATERAL ("
        f" SELECT {CONFIG_COLUMNS} FROM customer_agent_configs c"
        "  WHERE c.tenant_id = t.tenant_id AND c.agent_id > $2"
        "  AND ($3::uuid IS NULL OR c.provider_agent_id = $3)"
        "  AND ($4::text IS NULL OR CASE WHEN c.suspended THEN 'suspended'"
        "       ELSE c.provisioning END = $4)"
        "  ORDER BY c.agent_id LIMIT $5) c ORDER BY c.agent_id LIMIT $5",
        call.caller.org_ids(only=wanted.org_id),
        page.after[0] if page.after else FIRST_ID, wanted.provider_agent_id, status,
        page.limit + 1,
    )
    return page.page([_out(AgentConfig(r)) for r in rows], lambda c: [c.agent_id])


async def get_config(call: Call) -> AgentConfigOut:
    agent_id = call.path_id("agent_id", "agent config")
    return _out(await load_config(call.conn, agent_id, call.caller.org_ids()))


async def update_config(call: Call) -> AgentConfigOut:
    agent_id = call.path_id("agent_id", "agent config")
    body: ConfigUpdate = call.body
    changes: dict[str, Any] = {}
    for name in ("display_name", "greeting", "starter_prompts", "suspended"):
        value = getattr(body, name)
        if value is not None:
            changes[name] = value
    if body.theme is not None:
        changes["theme"] = orjson.dumps(body.theme.model_dump(exclude_none=True)).decode()
    if body.allowed_origins is not None:
        changes["allowed_origins"] = normalise_origins(body.allowed_origins, "allowed_origins")
    async with call.conn.transaction():
        config = await load_config(call.conn, agent_id, call.caller.org_ids(), for_update=True)
        call.caller.require(config.row["tenant_id"], "admin", "agent config")
        if body.plan is not None:
            changes["plan"] = body.plan
            changes["limits"] = await _plan_limits(call, config, body.plan)
        if changes:
            assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=2))
            await call.conn.execute(
                f"UPDATE customer_agent_configs SET {assignments}, updated_at = now()"
                " WHERE agent_id = $1", agent_id, *changes.values(),
            )
            config = await load_config(call.conn, agent_id, None)
            await publish_config(call.conn, call.services.redis, config)
            await call.audit("agent_config.update", "agent_config", agent_id,
                             config.row["tenant_id"], {"fields": sorted(changes)})
    return _out(config)


async def _plan_limits(call: Call, config: AgentConfig, plan: str) -> str:
    raw = await call.conn.fetchval(
        "SELECT limits FROM provider_agents WHERE provider_agent_id = $1",
        config.row["provider_agent_id"],
    )
    limits: dict[str, dict[str, float]] = orjson.loads(raw)
    factor = PLAN_FACTORS[plan]
    scaled = {
        scope: {"rate": bucket["rate"] * factor, "burst": max(1, int(bucket["burst"] * factor))}
        for scope, bucket in limits.items()
    }
    return orjson.dumps(scaled).decode()


async def retry_provisioning(call: Call) -> AgentConfigOut:
    agent_id = call.path_id("agent_id", "agent config")
    async with call.conn.transaction():
        config = await load_config(call.conn, agent_id, call.caller.org_ids(), for_update=True)
        call.caller.require(config.row["tenant_id"], "admin", "agent config")
        if config.row["provisioning"] != "failed":
            raise Conflict(f"provisioning is {config.row['provisioning']}, not failed")
        await call.conn.execute(
            "UPDATE customer_agent_configs SET provisioning = 'pending', updated_at = now()"
            " WHERE agent_id = $1", agent_id,
        )
        await queue_provisioning(call.conn, agent_id)
        await call.audit("agent_config.retry", "agent_config", agent_id,
                         config.row["tenant_id"])
        config = await load_config(call.conn, agent_id, None)
    call.services.provisioner.wake()
    return _out(config)


OPERATIONS = [
    Operation("GET", "/api/customer-agent-configs", "Your agent instances",
              list_configs, "customer-agent-configs", query=ConfigFilter,
              response=AgentConfigOut, paged=True),
    Operation("GET", "/api/customer-agent-configs/{agent_id}", "One agent instance",
              get_config, "customer-agent-configs", response=AgentConfigOut),
    Operation("PATCH", "/api/customer-agent-configs/{agent_id}",
              "Change display name, greeting, theme, starter prompts, allowed origins, plan "
              "(starter: half the seller's limits, standard, pro: four times) or suspension; "
              "gateways see it within a second", update_config, "customer-agent-configs",
              body=ConfigUpdate, response=AgentConfigOut, errors=(403,)),
    Operation("POST", "/api/customer-agent-configs/{agent_id}/retry-provisioning",
              "Queue a failed provisioning again", retry_provisioning,
              "customer-agent-configs", response=AgentConfigOut, errors=(403, 409)),
]
