"""The isolation matrix: for every operation that names an object, a user of organisation A
acting on organisation B's object gets 404, and no table changes."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from cmp.api.routes import OPERATIONS
from cmp.config import CmpConfig
from devstack.seed import DEMO_FLOW
from devstack.stack import Stack
from tests.cmp.api.test_orders import provisioned
from tests.cmp.conftest import MakeUser, PublishedAgent

# A valid body per operation, so a refusal cannot come from validation instead of isolation.
BODIES: dict[str, dict[str, Any]] = {
    "add_member": {"email": "{email}", "role": "member"},
    "update_config": {"greeting": "taken over"},
    "create_order": {"org_id": "{org_id}", "provider_agent_id": "{provider_agent_id}"},
    "create_key": {"agent_id": "{agent_id}", "kind": "secret"},
    "update_provider_agent": {"name": "taken over"},
    "create_version": {"flow": orjson.loads(DEMO_FLOW.read_bytes())},
    "search_training_documents": {"agent_id": "{agent_id}", "query": "refunds"},
}
# Published agents are the marketplace's shop window: every signed-in user may see them.
PUBLIC_BY_DESIGN = {"get_marketplace_agent"}
# Operations whose object is named in the body rather than the path.
BODY_SCOPED = {"create_key": "agent_id", "search_training_documents": "agent_id"}


@pytest.fixture
def cmp_overrides(stack: Stack) -> dict[str, Any]:
    return {"embeddings_url": stack.llm_url}


pytestmark = pytest.mark.provisions


async def snapshot(database_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        return {
            table: await conn.fetchval(
                f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), ''))"
                f" FROM {table} t")
            for table in tables
        }
    finally:
        await conn.close()


async def test_another_organisations_objects_answer_404_and_nothing_changes(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent,
    cmp_config: CmpConfig,
) -> None:
    victim = await make_user("both")
    agent_id = await provisioned(api, victim, published_agent)
    key = (await victim.client.post("/api/agent-api-keys",
                                     json={"agent_id": agent_id, "kind": "secret"})).json()
    token = (await victim.client.post("/api/tokens", json={"name": "victim"})).json()
    document = (await victim.client.post(
        "/api/training-documents", params={"agent_id": agent_id, "filename": "faq.md"},
        content=b"Refunds take fourteen days.", headers={"content-type": "text/markdown"},
    )).json()
    order = (await victim.client.get("/api/orders")).json()["items"][0]
    ids = {
        "org_id": str(victim.org_id), "user_id": str(victim.user_id),
        "token_id": token["token_id"], "agent_id": agent_id, "key_id": key["key_id"],
        "order_id": order["order_id"],
        "provider_agent_id": str(published_agent.provider_agent_id), "version": "1",
        "email": victim.email, "document_id": document["document_id"],
    }
    attacker = await make_user("both")
    before = await snapshot(cmp_config.database_url)

    checked = []
    for op in OPERATIONS:
        names = re.findall(r"{(\w+)}", op.path)
        if (not names and op.operation_id not in BODY_SCOPED) or \
                op.operation_id in PUBLIC_BY_DESIGN:
            continue
        unknown = [name for name in names if name not in ids]
        assert not unknown, f"{op.operation_id}: add an object for {unknown} to this matrix"
        path = op.path.format(**{name: ids[name] for name in names})
        body = None
        if op.body is not None:
            assert op.operation_id in BODIES, f"{op.operation_id}: add a valid body here"
            body = {k: v.format(**ids) if isinstance(v, str) else v
                    for k, v in BODIES[op.operation_id].items()}
        response = await attacker.client.request(op.method, path, json=body)
        checked.append(op.operation_id)
        assert response.status_code == 404, (op.method, path, response.status_code,
                                              response.text)
        assert response.json()["error"]["code"] == "not_found"
    assert await snapshot(cmp_config.database_url) == before
    assert len(checked) >= 10

    # Lists and filters never show the victim's objects either.
    for path in ("/api/customer-agent-configs", "/api/agent-api-keys", "/api/orders",
                 "/api/training-documents", f"/api/training-documents?agent_id={agent_id}",
                 f"/api/customer-agent-configs?org_id={victim.org_id}",
                 f"/api/agent-api-keys?agent_id={agent_id}", "/api/usage/agent-instances",
                 f"/api/usage/agent-instances?org_id={victim.org_id}", "/api/audit-log"):
        listed = await attacker.client.get(path)
        assert listed.status_code == 200, listed.text
        assert listed.json()["items"] == [], path
