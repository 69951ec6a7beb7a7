"""Keyset pages over several organisations: walking `next_cursor` visits every object once, in
id order, and a bad cursor or limit is named."""

from __future__ import annotations

from typing import Any

import asyncpg

from tests.cmp.api.test_usage import instance_for
from tests.cmp.conftest import MakeUser, PublishedAgent, User


async def walk(user: User, path: str, limit: int, key: str = "agent_id") -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        query = f"{path}?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page: dict[str, Any] = (await user.client.get(query)).json()
        assert len(page["items"]) <= limit
        seen += [item[key] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


async def test_pages_merge_the_callers_organisations_in_id_order(
    make_user: MakeUser, published_agent: PublishedAgent, cmp_config: Any,
) -> None:
    buyer = await make_user("customer")
    second_org = (await buyer.client.post("/api/organisations",
                                          json={"name": "Second", "kind": "customer"})).json()
    other = await make_user("customer")
    conn = await asyncpg.connect(cmp_config.database_url)
    mine = [await instance_for(conn, buyer, published_agent) for _ in range(3)]
    buyer.org_id = second_org["org_id"]
    mine += [await instance_for(conn, buyer, published_agent) for _ in range(4)]
    await instance_for(conn, other, published_agent)
    await conn.close()

    expected = sorted(str(agent_id) for agent_id in mine)
    for limit in (1, 2, 3, 100):
        assert await walk(buyer, "/api/customer-agent-configs", limit) == expected
    orders = await walk(buyer, "/api/orders", 2, key="order_id")
    assert len(orders) == 7 and orders == sorted(orders)
    only_second = (await buyer.client.get(
        f"/api/customer-agent-configs?org_id={second_org['org_id']}")).json()["items"]
    assert len(only_second) == 4

    bad = await buyer.client.get("/api/customer-agent-configs?limit=101&cursor=bm9wZQ")
    assert bad.status_code == 422
    assert set(bad.json()["error"]["fields"]) == {"limit", "cursor"}


async def test_a_forged_cursor_outside_the_column_type_is_refused(make_user: MakeUser) -> None:
    import base64

    owner = await make_user()
    for text in (b"[1000000000000000000000000000000]", b'["12"]', b"[true]"):
        cursor = base64.urlsafe_b64encode(text).decode().rstrip("=")
        response = await owner.client.get(f"/api/audit-log?cursor={cursor}")
        assert response.status_code == 422, response.text
        assert list(response.json()["error"]["fields"]) == ["cursor"]
