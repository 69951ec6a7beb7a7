"""The whole marketplace on the running stack, through the CMP's API as its users use it: the
demo seeding (a seller publishes, two buyers order, the webhook approves, the CMP provisions),
then a visitor's chat through the gateway, and a revoked key refused within a second."""

from __future__ import annotations

import asyncio
import time

import httpx

from devstack.marketplace import CmpClient
from devstack.seed import seed_demo
from devstack.stack import Stack
from tests.e2e.conftest import auth, sse_events


async def test_seeded_buyers_chat_through_the_gateway_until_their_key_is_revoked(
    stack: Stack, gateway: httpx.AsyncClient,
) -> None:
    demo = await seed_demo(stack)
    assert set(demo) == {"gateway_url", "cmp_url", "jwks_url", "provider", "tenants"}
    assert demo["provider"]["cmp_token"].startswith("skt_")
    first, second = demo["tenants"]
    assert first["tenant_id"] != second["tenant_id"]
    assert {"tenant_id", "agent_id", "secret_key", "publishable_key", "allowed_origin",
            "cmp_token"} <= set(first)
    assert await seed_demo(stack) == demo  # a second `make up` reuses it

    answer = await gateway.post(
        f"/v1/agents/{first['agent_id']}/chat", json={"message": "Hello there"},
        headers={**auth(first["secret_key"]), "accept": "text/event-stream"})
    assert answer.status_code == 200, answer.text
    events = sse_events(answer.text)
    assert [name for name, _ in events][-1] == "end"
    assert any(name == "token" for name, _ in events)

    config = await gateway.get(f"/v1/agents/{first['agent_id']}/config", headers={
        **auth(first["publishable_key"]), "origin": first["allowed_origin"]})
    assert config.status_code == 200, config.text
    assert config.json()["name"] == "Acme Outdoor assistant"
    assert config.json()["greeting"].startswith("Hi! I am the Acme Outdoor assistant")

    crossed = await gateway.post(f"/v1/agents/{first['agent_id']}/chat",
                                 json={"message": "hi"}, headers=auth(second["secret_key"]))
    assert crossed.status_code == 403

    async with CmpClient(stack.cmp_url, first["cmp_token"]) as buyer:
        other = await buyer.call("GET", f"/api/customer-agent-configs/{second['agent_id']}",
                                 expect=404)
        assert other["error"]["code"] == "not_found"
        await buyer.call("POST", f"/api/agent-api-keys/{first['secret_key_id']}/revoke")
    revoked_at = time.monotonic()
    while True:
        refused = await gateway.post(f"/v1/agents/{first['agent_id']}/chat",
                                     json={"message": "still there?"},
                                     headers=auth(first["secret_key"]))
        if refused.status_code == 401 or time.monotonic() - revoked_at > 1.0:
            break
        await asyncio.sleep(0.05)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "invalid_key"
