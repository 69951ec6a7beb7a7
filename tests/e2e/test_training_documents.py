"""Training documents on the running stack: a seller publishes the retrieval flow, two buyers
are provisioned and each uploads a document; a chat through the gateway is answered from the
buyer's own collection, which the gateway names from the registry entry."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from devstack.marketplace import CmpClient, approve_order, create_owner
from devstack.stack import Stack
from tests.e2e.conftest import auth, sse_events
from tests.runtime.conftest import ROOT


async def buyer_with_document(
    stack: Stack, provider_agent_id: str, text: str
) -> tuple[str, str]:
    owner = await create_owner(stack.database_url, f"buyer-{uuid.uuid4().hex[:8]}@example.test",
                               "Buyer", "customer")
    async with CmpClient(stack.cmp_url, owner["cmp_token"]) as cmp:
        order = await cmp.order(owner["org_id"], provider_agent_id)
        approved = await approve_order(stack.cmp_url, stack.secrets.webhook_secret,
                                       order["order_id"])
        agent_id = str(approved["agent_id"])
        await cmp.wait_active(agent_id)
        document = await cmp.call(
            "POST", "/api/training-documents", 201, content=text.encode(),
            params={"agent_id": agent_id, "filename": "policy.md"},
            headers={"content-type": "text/markdown"},
        )
        assert document["status"] == "ready"
        key = await cmp.create_key(agent_id, "secret")
    return agent_id, str(key["token"])


async def test_each_buyer_is_answered_from_its_own_documents(
    stack: Stack, gateway: httpx.AsyncClient
) -> None:
    seller = await create_owner(stack.database_url, f"seller-{uuid.uuid4().hex[:8]}@example.test",
                                "Seller", "provider")
    flow: dict[str, Any] = json.loads((ROOT / "runtime/flows/retrieval.json").read_text())
    async with CmpClient(stack.cmp_url, seller["cmp_token"]) as cmp:
        published = await cmp.publish_agent(seller["org_id"], "Shop helper with documents", flow)
    agent_a, key_a = await buyer_with_document(
        stack, published["provider_agent_id"], "Refunds are paid within fourteen days. Marigold.")
    agent_b, key_b = await buyer_with_document(
        stack, published["provider_agent_id"], "Refunds are paid within thirty days. Zebulon.")

    for agent_id, key, own, other in ((agent_a, key_a, "fourteen", "thirty"),
                                      (agent_b, key_b, "thirty", "fourteen")):
        answer = await gateway.post(
            f"/v1/agents/{agent_id}/chat", headers=auth(key),
            json={"message": "#echo When are refunds paid?"})
        assert answer.status_code == 200, answer.text
        text = answer.json()["text"]  # the mock echoes the prompt the flow built
        assert f"Refunds are paid within {own} days." in text
        assert other not in text
    streamed = await gateway.post(
        f"/v1/agents/{agent_a}/chat", json={"message": "#echo refunds"},
        headers={**auth(key_a), "accept": "text/event-stream"})
    assert [name for name, _ in sse_events(streamed.text)][-1] == "end"
