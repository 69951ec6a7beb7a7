"""`/api/marketplace`: the published agents of every provider, for any signed-in user. What a
buyer needs to choose (name, description, seller, price, limits); never the flow."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel

from cmp.api.fields import Query
from cmp.api.operation import Call, Operation
from cmp.api.pages import Page
from cmp.api.provider_agents import PlanLimits, Price, agent_fields
from cmp.errors import NotFound


class MarketplaceAgent(BaseModel):
    provider_agent_id: uuid.UUID
    provider_org_id: uuid.UUID
    provider_name: str
    name: str
    description: str
    price: Price
    limits: PlanLimits
    current_version: int
    updated_at: dt.datetime


class MarketplaceFilter(Query):
    provider_org_id: uuid.UUID | None = None


_LISTING = (
    "SELECT a.provider_agent_id, a.org_id AS provider_org_id, o.name AS provider_name, a.name,"
    " a.description, a.price, a.limits, a.current_version, a.updated_at"
    " FROM provider_agents a JOIN organisations o USING (org_id) WHERE a.published"
)


async def list_marketplace(call: Call) -> Page[MarketplaceAgent]:
    page = call.page
    assert page is not None
    wanted: MarketplaceFilter = call.query
    rows = await call.conn.fetch(
        f"{_LISTING} AND ($1::uuid IS NULL OR a.org_id = $1)"
        " AND ($2::uuid IS NULL OR a.provider_agent_id > $2)"
        " ORDER BY a.provider_agent_id LIMIT $3",
        wanted.provider_org_id, page.after[0] if page.after else None, page.limit + 1,
    )
    agents = [MarketplaceAgent(**agent_fields(r)) for r in rows]
    return page.page(agents, lambda a: [a.provider_agent_id])


async def get_marketplace_agent(call: Call) -> MarketplaceAgent:
    agent_id = call.path_id("provider_agent_id", "published agent")
    row = await call.conn.fetchrow(f"{_LISTING} AND a.provider_agent_id = $1", agent_id)
    if row is None:
        raise NotFound(f"no published agent {agent_id}")
    return MarketplaceAgent(**agent_fields(row))


OPERATIONS = [
    Operation("GET", "/api/marketplace", "Published agents of all providers",
              list_marketplace, "marketplace", query=MarketplaceFilter,
              response=MarketplaceAgent, paged=True),
    Operation("GET", "/api/marketplace/{provider_agent_id}", "One published agent",
              get_marketplace_agent, "marketplace", response=MarketplaceAgent),
]
