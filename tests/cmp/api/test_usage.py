"""Usage views: per instance per day for buyers, per agent per day for sellers, from the
rollup the usage table keeps by trigger."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import asyncpg

from cmp.ids import uuid7
from tests.cmp.conftest import MakeUser, PublishedAgent, User


async def instance_for(conn: asyncpg.Connection, buyer: User, agent: PublishedAgent) -> uuid.UUID:
    order_id, agent_id = uuid7(), uuid7()
    await conn.execute(
        "INSERT INTO orders (order_id, customer_org_id, provider_agent_id, flow_version, status)"
        " VALUES ($1, $2, $3, 1, 'approved')", order_id, buyer.org_id, agent.provider_agent_id,
    )
    await conn.execute(
        "INSERT INTO customer_agent_configs (agent_id, tenant_id, order_id, provider_agent_id,"
        " flow_version, display_name, limits) VALUES ($1, $2, $3, $4, 1, 'x', '{}')",
        agent_id, buyer.org_id, order_id, agent.provider_agent_id,
    )
    return agent_id


async def record(conn: asyncpg.Connection, tenant: uuid.UUID, agent: uuid.UUID, day: dt.date,
                 status: str = "completed", tokens: tuple[int, int] = (10, 20)) -> None:
    await conn.execute(
        "INSERT INTO usage_events (event_id, tenant_id, agent_id, status, input_tokens,"
        " output_tokens, occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        uuid7(), tenant, agent, status, *tokens,
        dt.datetime.combine(day, dt.time(12), dt.UTC),
    )


async def test_buyers_and_sellers_see_their_own_usage_per_day(
    make_user: MakeUser, published_agent: PublishedAgent, cmp_config: Any,
) -> None:
    buyer, other_buyer = await make_user("customer"), await make_user("customer")
    conn = await asyncpg.connect(cmp_config.database_url)
    mine = await instance_for(conn, buyer, published_agent)
    theirs = await instance_for(conn, other_buyer, published_agent)
    d1, d2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
    await record(conn, buyer.org_id, mine, d1)
    await record(conn, buyer.org_id, mine, d1, "failed", (5, 0))
    await record(conn, buyer.org_id, mine, d2, "cancelled", (1, 2))
    await record(conn, other_buyer.org_id, theirs, d2)
    await conn.close()

    view = (await buyer.client.get("/api/usage/agent-instances")).json()
    rows = [(r["day"], r["agent_id"], r["requests"], r["completed"], r["failed"],
             r["cancelled"], r["input_tokens"], r["output_tokens"]) for r in view["items"]]
    assert rows == [
        ("2026-11-02", str(mine), 1, 0, 0, 1, 1, 2),
        ("2026-11-01", str(mine), 2, 1, 1, 0, 15, 20),
    ]
    page1 = (await buyer.client.get("/api/usage/agent-instances?limit=1")).json()
    page2 = (await buyer.client.get(
        f"/api/usage/agent-instances?limit=1&cursor={page1['next_cursor']}")).json()
    assert [r["day"] for r in page1["items"] + page2["items"]] == ["2026-11-02", "2026-11-01"]
    assert page2["next_cursor"] is None
    only_d1 = (await buyer.client.get("/api/usage/agent-instances?since=2026-11-01"
                                      "&until=2026-11-01")).json()
    assert [r["day"] for r in only_d1["items"]] == ["2026-11-01"]

    seller = (await published_agent.provider.client.get("/api/usage/provider-agents")).json()
    assert [(r["day"], r["requests"], r["instances"], r["output_tokens"])
            for r in seller["items"]] == [("2026-11-02", 2, 2, 22), ("2026-11-01", 2, 1, 20)]
    assert (await buyer.client.get("/api/usage/provider-agents")).json()["items"] == []
    bad = await buyer.client.get("/api/usage/agent-instances?since=yesterday&cursor=zz")
    assert bad.status_code == 422
    assert set(bad.json()["error"]["fields"]) == {"cursor", "since"}


async def test_sellers_page_and_filter_their_agents_usage(
    make_user: MakeUser, published_agent: PublishedAgent, cmp_config: Any,
) -> None:
    buyer = await make_user("customer")
    conn = await asyncpg.connect(cmp_config.database_url)
    instance = await instance_for(conn, buyer, published_agent)
    days = [dt.date(2026, 10, d) for d in (1, 2, 3)]
    for day in days:
        await record(conn, buyer.org_id, instance, day)
    await conn.close()
    seller = published_agent.provider.client
    agent = str(published_agent.provider_agent_id)

    seen, cursor = [], ""
    while True:
        page = (await seller.get(f"/api/usage/provider-agents?limit=1{cursor}")).json()
        seen += [(r["day"], r["provider_agent_id"]) for r in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == [("2026-10-03", agent), ("2026-10-02", agent), ("2026-10-01", agent)]

    window = (await seller.get(
        "/api/usage/provider-agents?since=2026-10-02&until=2026-10-02"
        f"&provider_agent_id={agent}&org_id={published_agent.provider.org_id}")).json()
    assert [r["day"] for r in window["items"]] == ["2026-10-02"]
    other_agent = (await seller.get(
        f"/api/usage/provider-agents?provider_agent_id={uuid.uuid4()}")).json()
    other_org = (await seller.get(f"/api/usage/provider-agents?org_id={buyer.org_id}")).json()
    assert other_agent["items"] == [] and other_org["items"] == []
