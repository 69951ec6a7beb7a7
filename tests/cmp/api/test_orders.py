"""Orders, the signed order-approved webhook, provisioning from the outbox, the buyer's agent
configs and keys: in process on a real Postgres and Redis, deploying to the session's runtime."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import jwt
import orjson
import pytest
import redis.asyncio as aioredis

from cmp import wire
from cmp.api.webhook_signature import sign
from devstack.stack import Stack
from tests.cmp.conftest import WEBHOOK_SECRET, MakeUser, PublishedAgent, User

pytestmark = pytest.mark.provisions


async def deliver(api: httpx.AsyncClient, order_id: Any, delivery_id: str | None = None,
                  *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None,
                  ) -> httpx.Response:
    body = orjson.dumps({"id": delivery_id or f"evt_{uuid.uuid4().hex}",
                         "type": "order.approved", "order_id": str(order_id)})
    return await api.post("/api/webhooks/order-approved", content=body, headers={
        "content-type": "application/json",
        "sitekit-signature": sign(secret, body, timestamp),
    })


async def wait_status(
    buyer: User, agent_id: str, wanted: str, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        config: dict[str, Any] = (await buyer.client.get(
            f"/api/customer-agent-configs/{agent_id}")).json()
        if config["status"] == wanted or time.monotonic() > deadline:
            return config
        await asyncio.sleep(0.1)


async def order(buyer: User, agent: PublishedAgent) -> dict[str, Any]:
    response = await buyer.client.post("/api/orders", json={
        "org_id": str(buyer.org_id), "provider_agent_id": str(agent.provider_agent_id)})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def provisioned(api: httpx.AsyncClient, buyer: User, agent: PublishedAgent) -> str:
    placed = await order(buyer, agent)
    approved = await deliver(api, placed["order_id"])
    assert approved.status_code == 200, approved.text
    agent_id: str = approved.json()["agent_id"]
    config = await wait_status(buyer, agent_id, "active")
    assert config["status"] == "active", config
    return agent_id


async def test_order_webhook_provisions_and_publishes_the_registry_entry(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent,
    redis_url: str, stack: Stack,
) -> None:
    buyer = await make_user("customer")
    placed = await order(buyer, published_agent)
    assert placed["status"] == "pending" and placed["agent_id"] is None
    approved = await deliver(api, placed["order_id"])
    assert approved.status_code == 200, approved.text
    agent_id = approved.json()["agent_id"]
    assert approved.json()["duplicate"] is False

    config = await wait_status(buyer, agent_id, "active")
    assert config["status"] == "active", config
    assert config["tenant_id"] == str(buyer.org_id)
    assert config["display_name"] == "Demo helper"

    redis = aioredis.from_url(redis_url)
    entry = orjson.loads(await redis.get(wire.registry_key(agent_id)))
    await redis.aclose()
    assert entry["tenant_id"] == str(buyer.org_id)
    assert entry["flow_id"] == f"pa-{published_agent.provider_agent_id}-v1"
    assert entry["runtime_url"] == stack.runtime_url
    assert entry["collection"] == f"tenant_{buyer.org_id}_agent_{agent_id}"
    fetched = (await buyer.client.get(f"/api/orders/{placed['order_id']}")).json()
    assert fetched["status"] == "approved" and fetched["agent_id"] == agent_id


async def test_a_replayed_webhook_creates_nothing_twice(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent,
) -> None:
    buyer = await make_user("customer")
    placed = await order(buyer, published_agent)
    first = await deliver(api, placed["order_id"], "evt_same")
    again = await deliver(api, placed["order_id"], "evt_same")
    other_delivery = await deliver(api, placed["order_id"], "evt_other")
    assert first.status_code == again.status_code == other_delivery.status_code == 200
    assert again.json() == {**first.json(), "duplicate": True}
    assert other_delivery.json()["agent_id"] == first.json()["agent_id"]
    listed = (await buyer.client.get("/api/customer-agent-configs")).json()["items"]
    assert [c["agent_id"] for c in listed] == [first.json()["agent_id"]]


@pytest.mark.parametrize("problem", ["wrong secret", "old timestamp", "no header", "tampered"])
async def test_a_webhook_without_a_valid_fresh_signature_is_refused(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent, problem: str,
) -> None:
    buyer = await make_user("customer")
    placed = await order(buyer, published_agent)
    body = orjson.dumps({"id": "evt_x", "type": "order.approved", "order_id": placed["order_id"]})
    signature = sign(WEBHOOK_SECRET, body)
    if problem == "wrong secret":
        signature = sign("not-the-secret", body)
    elif problem == "old timestamp":
        signature = sign(WEBHOOK_SECRET, body, int(time.time()) - 3600)
    headers = {"content-type": "application/json", "sitekit-signature": signature}
    if problem == "no header":
        del headers["sitekit-signature"]
    if problem == "tampered":
        body = body.replace(b"evt_x", b"evt_y")
    response = await api.post("/api/webhooks/order-approved", content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthenticated"
    assert (await buyer.client.get("/api/customer-agent-configs")).json()["items"] == []


async def test_an_unpublished_agent_cannot_be_ordered(
    make_user: MakeUser, published_agent: PublishedAgent, cmp_config: Any,
) -> None:
    import asyncpg
    conn = await asyncpg.connect(cmp_config.database_url)
    await conn.execute("UPDATE provider_agents SET published = false")
    await conn.close()
    buyer = await make_user("customer")
    response = await buyer.client.post("/api/orders", json={
        "org_id": str(buyer.org_id),
        "provider_agent_id": str(published_agent.provider_agent_id)})
    assert response.status_code == 404
    assert "no published agent" in response.json()["error"]["message"]


async def test_config_changes_reach_the_registry_and_keys_work(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent,
    redis_url: str, cmp_config: Any,
) -> None:
    buyer = await make_user("customer")
    agent_id = await provisioned(api, buyer, published_agent)
    redis = aioredis.from_url(redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(wire.REGISTRY_CHANNEL)

    patched = await buyer.client.patch(f"/api/customer-agent-configs/{agent_id}", json={
        "display_name": "Boutique ‘Ωmega’ '; DROP TABLE x; --",
        "greeting": "Hallo 👋",
        "theme": {"accent": "#10b981", "mode": "dark"},
        "starter_prompts": ["Où est ma commande ?"],
        "allowed_origins": ["https://Shop.Example:443/", "http://127.0.0.1:8082"],
        "plan": "pro",
    })
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["display_name"] == "Boutique ‘Ωmega’ '; DROP TABLE x; --"
    assert body["allowed_origins"] == ["https://shop.example", "http://127.0.0.1:8082"]
    assert body["limits"]["tenant"] == {"rate": 200.0, "burst": 400}

    entry = orjson.loads(await redis.get(wire.registry_key(agent_id)))
    assert entry["widget"]["name"] == body["display_name"]
    assert entry["widget"]["greeting"] == "Hallo 👋"
    assert entry["allowed_origins"] == body["allowed_origins"]
    assert entry["limits"]["tenant"]["burst"] == 400
    announced = None
    for _ in range(20):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            announced = message["data"].decode()
            break
    assert announced == agent_id

    outside = await buyer.client.post("/api/agent-api-keys", json={
        "agent_id": agent_id, "kind": "publishable", "origins": ["https://elsewhere.example"]})
    assert outside.status_code == 422
    assert "allowed origins" in outside.json()["error"]["message"]

    created = await buyer.client.post("/api/agent-api-keys", json={
        "agent_id": agent_id, "kind": "publishable", "origins": ["https://shop.example"]})
    assert created.status_code == 201, created.text
    key = created.json()
    claims = jwt.decode(key["token"], options={"verify_signature": False})
    assert claims["tid"] == str(buyer.org_id) and claims["aid"] == agent_id
    assert claims["origins"] == ["https://shop.example"] and claims["kty"] == "publishable"
    listed = (await buyer.client.get(f"/api/agent-api-keys?agent_id={agent_id}")).json()
    assert [k["key_id"] for k in listed["items"]] == [key["key_id"]]
    assert "token" not in listed["items"][0]
    assert listed["items"][0]["masked"].endswith(key["token"][-6:])

    rotated = await buyer.client.post(f"/api/agent-api-keys/{key['key_id']}/rotate")
    assert rotated.status_code == 201, rotated.text
    assert rotated.json()["origins"] == ["https://shop.example"]
    assert await redis.sismember(wire.REVOKED_SET, key["key_id"])
    old = (await buyer.client.get(f"/api/agent-api-keys/{key['key_id']}")).json()
    assert old["revoked_at"] is not None
    again = await buyer.client.post(f"/api/agent-api-keys/{key['key_id']}/rotate")
    assert again.status_code == 409

    revoked = await buyer.client.post(f"/api/agent-api-keys/{rotated.json()['key_id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert await redis.sismember(wire.REVOKED_SET, rotated.json()["key_id"])

    suspended = await buyer.client.patch(f"/api/customer-agent-configs/{agent_id}",
                                         json={"suspended": True})
    assert suspended.json()["status"] == "suspended"
    entry = orjson.loads(await redis.get(wire.registry_key(agent_id)))
    assert entry["status"] == "suspended"
    await pubsub.aclose()
    await redis.aclose()


async def test_invalid_config_changes_name_each_field(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent,
) -> None:
    buyer = await make_user("customer")
    agent_id = await provisioned(api, buyer, published_agent)
    response = await buyer.client.patch(f"/api/customer-agent-configs/{agent_id}", json={
        "theme": {"accent": "red"}, "starter_prompts": ["x"] * 7, "plan": "gold",
        "display_name": "", "colour": "blue",
    })
    assert response.status_code == 422
    fields = response.json()["error"]["fields"]
    assert set(fields) == {"theme.accent", "starter_prompts", "plan", "display_name", "colour"}
    bad_origin = await buyer.client.patch(f"/api/customer-agent-configs/{agent_id}",
                                          json={"allowed_origins": ["ftp://x", "https://ok.example"]})
    assert bad_origin.status_code == 422
    assert list(bad_origin.json()["error"]["fields"]) == ["allowed_origins.0"]


async def test_keys_wait_for_provisioning_and_members_cannot_write(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent,
) -> None:
    buyer = await make_user("customer")
    member = await make_user(org_id=buyer.org_id, role="member")
    agent_id = await provisioned(api, buyer, published_agent)
    assert (await member.client.get(f"/api/customer-agent-configs/{agent_id}")).status_code == 200
    denied = await member.client.patch(f"/api/customer-agent-configs/{agent_id}",
                                       json={"greeting": "hi"})
    assert denied.status_code == 403
    assert "admin" in denied.json()["error"]["message"]
    denied_key = await member.client.post("/api/agent-api-keys",
                                          json={"agent_id": agent_id, "kind": "secret"})
    assert denied_key.status_code == 403


@pytest.mark.parametrize("cmp_overrides", [{"provision_attempts": 1000,
                                              "provision_max_backoff_s": 0.5}])
async def test_provisioning_waits_out_a_runtime_outage(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent, stack: Stack,
) -> None:
    buyer = await make_user("customer")
    stack.process("runtime").stop()
    try:
        placed = await order(buyer, published_agent)
        agent_id = (await deliver(api, placed["order_id"])).json()["agent_id"]
        await asyncio.sleep(1.5)
        waiting = (await buyer.client.get(f"/api/customer-agent-configs/{agent_id}")).json()
        assert waiting["status"] == "provisioning", waiting
        assert "attempt" in waiting["failure_reason"], waiting
        stack.start_process("runtime")
        config = await wait_status(buyer, agent_id, "active", timeout=60)
        assert config["status"] == "active", config
        assert config["failure_reason"] is None
    finally:
        if not stack.process("runtime").running:
            stack.start_process("runtime")


@pytest.mark.parametrize("cmp_overrides", [{"provision_attempts": 2,
                                              "runtime_url": "http://127.0.0.1:9"}])
async def test_provisioning_that_runs_out_of_attempts_is_failed_with_its_reason(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent,
) -> None:
    buyer = await make_user("customer")
    placed = await order(buyer, published_agent)
    agent_id = (await deliver(api, placed["order_id"])).json()["agent_id"]
    config = await wait_status(buyer, agent_id, "failed", timeout=30)
    assert config["status"] == "failed", config
    assert config["failure_reason"].startswith("attempt 2:")
    retried = await buyer.client.post(f"/api/customer-agent-configs/{agent_id}/retry-provisioning")
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "pending"
    config = await wait_status(buyer, agent_id, "failed", timeout=30)
    assert config["status"] == "failed" and config["failure_reason"].startswith("attempt 2:")
