"""`/api/usage/...`: requests and tokens per agent per day, newest day first. Buyers see their
instances; sellers see their agents, summed over every buyer's instance. Both read the
`usage_daily` rollup the usage table keeps by trigger, so a view costs a few rows per day."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, Field

from cmp.api.fields import Query
from cmp.api.operation import Call, Operation
from cmp.api.pages import Page


class Totals(BaseModel):
    day: dt.date
    requests: int
    completed: int
    failed: int
    cancelled: int
    input_tokens: int
    output_tokens: int


class InstanceUsage(Totals):
    agent_id: uuid.UUID


class AgentUsage(Totals):
    provider_agent_id: uuid.UUID
    instances: int = Field(description="buyers' instances with usage that day")


class InstanceFilter(Query):
    org_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    since: dt.date | None = Field(default=None, description="first day, inclusive (UTC)")
    until: dt.date | None = Field(default=None, description="last day, inclusive (UTC)")


class AgentFilter(Query):
    org_id: uuid.UUID | None = None
    provider_agent_id: uuid.UUID | None = None
    since: dt.date | None = Field(default=None, description="first day, inclusive (UTC)")
    until: dt.date | None = Field(default=None, description="last day, inclusive (UTC)")


_CURSOR = (dt.date.fromisoformat, uuid.UUID)


# Keyset bounds when there is no cursor: every real (day, id) sorts below these.
_LAST_DAY = dt.date.max
_LAST_ID = uuid.UUID(int=(1 << 128) - 1)


async def instance_usage(call: Call) -> Page[InstanceUsage]:
    page, wanted = call.page, call.query
    assert page is not None and isinstance(wanted, InstanceFilter)
    after = page.after or [_LAST_DAY, _LAST_ID]
    # One index range per organisation (tenant_id, day, agent_id), walked backwards from the
    # cursor and merged: a page reads about `limit` rows per organisation, however many lie
    # behind it.
    rows = await call.conn.fetch(
        "SELECT u.* FROM unnest($1::uuid[]) AS t(tenant_id) CROSS JOIN LATERAL ("
        "  SELECT agent_id, day, requests, completed, failed, cancelled, input_tokens,"
        "  output_tokens FROM usage_daily d WHERE d.tenant_id = t.tenant_id"
        "  AND (day, agent_id) < ($2::date, $3::uuid)"
        "  AND day >= coalesce($4::date, '-infinity') AND day <= coalesce($5::date, 'infinity')"
        "  AND ($6::uuid IS NULL OR agent_id = $6)"
        "  ORDER BY day DESC, agent_id DESC LIMIT $7) u"
        " ORDER BY u.day DESC, u.agent_id DESC LIMIT $7",
        call.caller.org_ids(only=wanted.org_id),
        after[0], after[1], wanted.since, wanted.until, wanted.agent_id, page.limit + 1,
    )
    return page.page([InstanceUsage(**dict(r)) for r in rows],
                     lambda u: [u.day.isoformat(), u.agent_id])


async def agent_usage(call: Call) -> Page[AgentUsage]:
    page, wanted = call.page, call.query
    assert page is not None and isinstance(wanted, AgentFilter)
    after = page.after or [_LAST_DAY, _LAST_ID]
    # As for instances: one index range per organisation (org_id, day, provider_agent_id).
    rows = await call.conn.fetch(
        "SELECT u.* FROM unnest($1::uuid[]) AS o(org_id) CROSS JOIN LATERAL ("
        "  SELECT provider_agent_id, day, requests, completed, failed, cancelled,"
        "  input_tokens, output_tokens, instances FROM usage_daily_by_agent a"
        "  WHERE a.org_id = o.org_id AND (day, provider_agent_id) < ($2::date, $3::uuid)"
        "  AND day >= coalesce($4::date, '-infinity') AND day <= coalesce($5::date, 'infinity')"
        "  AND ($6::uuid IS NULL OR provider_agent_id = $6)"
        "  ORDER BY day DESC, provider_agent_id DESC LIMIT $7) u"
        " ORDER BY u.day DESC, u.provider_agent_id DESC LIMIT $7",
        call.caller.org_ids(only=wanted.org_id),
        after[0], after[1], wanted.since, wanted.until, wanted.provider_agent_id,
        page.limit + 1,
    )
    return page.page([AgentUsage(**dict(r)) for r in rows],
                     lambda u: [u.day.isoformat(), u.provider_agent_id])


OPERATIONS = [
    Operation("GET", "/api/usage/agent-instances",
              "Buyer: usage per agent instance per day, newest first", instance_usage, "usage",
              query=InstanceFilter, response=InstanceUsage, paged=True, cursor=_CURSOR),
    Operation("GET", "/api/usage/provider-agents",
              "Seller: usage per agent per day across every buyer's instance, newest first",
              agent_usage, "usage", query=AgentFilter, response=AgentUsage, paged=True,
              cursor=_CURSOR),
]
