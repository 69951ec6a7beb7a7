"""The demo marketplace: a seller with the demo flow published, and two buyers (tenants), each
with a provisioned instance, a secret key and a publishable key for its demo page's origin.
Written to `.stack/demo.json`. `create_tenant_agent` is the tests' shortcut to a tenant."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from cmp.apikeys import issue_key
from cmp.errors import NotFound
from cmp.redis_clients import AnyRedis
from cmp.registry import AgentInstance, load_instance, publish_entry, save_instance
from devstack.marketplace import CmpClient, approve_order, create_owner
from devstack.stack import Stack
from runtime.client import RuntimeClient

DEMO_FLOW = Path(__file__).resolve().parent.parent / "runtime" / "flows" / "demo.json"
DEMO_FLOW_ID = "demo-assistant"
DEMO_TENANTS = (
    ("Acme Outdoor", "http://127.0.0.1:8082"),
    ("Globex Books", "http://127.0.0.1:8083"),
)


async def deploy_flow(runtime_url: str, token: str, flow_id: str, flow: Any, version: int) -> None:
    async with RuntimeClient(runtime_url, token) as runtime:
        await runtime.deploy(flow_id, version, flow)


async def create_tenant_agent(
    conn: asyncpg.Connection, redis: AnyRedis, stack: Stack, *, name: str, origin: str,
    flow_id: str = DEMO_FLOW_ID, limits: Any = None,
) -> dict[str, Any]:
    """A tenant with one active agent instance and both kinds of key."""
    tenant_id, agent_id = str(uuid.uuid4()), str(uuid.uuid4())
    kwargs: dict[str, Any] = {} if limits is None else {"limits": limits}
    instance = await save_instance(conn, AgentInstance(
        agent_id=agent_id, tenant_id=tenant_id, name=f"{name} assistant",
        runtime_url=stack.runtime_url, flow_id=flow_id, flow_version=1,
        allowed_origins=(origin,),
        widget={"greeting": f"Hi! I am the {name} assistant. How can I help?",
                "starter_prompts": ["What can you do?", "Tell me about your products"],
                "theme": {"accent": "#2563eb"}},
        **kwargs,
    ))
    await publish_entry(redis, instance)
    issuer = stack.settings.issuer
    secret = await issue_key(conn, issuer=issuer, tenant_id=tenant_id, agent_id=agent_id,
                             kind="secret")
    publishable = await issue_key(conn, issuer=issuer, tenant_id=tenant_id, agent_id=agent_id,
                                  kind="publishable", origins=[origin])
    return {
        "tenant_id": tenant_id, "agent_id": agent_id, "name": name,
        "secret_key": secret.token, "secret_key_id": secret.key.key_id,
        "publishable_key": publishable.token, "publishable_key_id": publishable.key.key_id,
        "allowed_origin": origin,
    }


async def point_agents_at_runtime(stack: Stack) -> int:
    """Move every agent to this stack's runtime; answers how many moved.

    The CMP records where it deployed each agent, so agents of an earlier `make up` on another
    runtime port would stay on that port. The embedded stack has one runtime, and it serves
    their flows (kept in the same data folder), so all of them move: the configs, so that a
    later change publishes the new URL, and the registry's copies, published again."""
    url = stack.runtime_url
    conn = await asyncpg.connect(stack.database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "UPDATE customer_agent_configs SET runtime_url = $1, updated_at = now()"
                " WHERE runtime_url <> $1", url,
            )
            moved = [
                await save_instance(conn, dataclasses.replace(
                    await load_instance(conn, row["agent_id"]), runtime_url=url))
                for row in await conn.fetch(
                    "SELECT agent_id::text FROM agent_instances WHERE runtime_url <> $1", url)
            ]
    finally:
        await conn.close()
    redis = aioredis.from_url(stack.redis_url)
    try:
        for instance in moved:
            await publish_entry(redis, instance)
    finally:
        await redis.aclose()
    return len(moved)


def _urls(stack: Stack) -> dict[str, str]:
    return {"gateway_url": stack.gateway_url, "cmp_url": stack.cmp_url,
            "jwks_url": stack.jwks_url}


async def _demo_is_there(stack: Stack, demo: dict[str, Any]) -> bool:
    """The demo of an earlier `make up` on the same data: reuse it."""
    if "provider" not in demo:
        return False
    conn = await asyncpg.connect(stack.database_url)
    try:
        for tenant in demo["tenants"]:
            await load_instance(conn, tenant["agent_id"], tenant["tenant_id"])
    except NotFound:
        return False
    finally:
        await conn.close()
    return True


async def seed_demo(stack: Stack) -> dict[str, Any]:
    """Seed through the CMP's API as its users would: a seller publishes the demo flow; two
    buyers order it, the marketplace approves, the CMP provisions, the buyers set their
    origins and create keys. A second `make up` finds the same demo and reuses it, with the
    URLs of this run (its ports may differ) and its agents on this run's runtime."""
    moved = await point_agents_at_runtime(stack)
    if moved:
        stack.progress(f"  {moved} agent(s) moved to the runtime at {stack.runtime_url}")
    demo_path = stack.root / "demo.json"
    if demo_path.exists():
        earlier: dict[str, Any] = orjson.loads(demo_path.read_bytes())
        if await _demo_is_there(stack, earlier):
            current = {**earlier, **_urls(stack)}
            if current != earlier:
                demo_path.write_bytes(orjson.dumps(current, option=orjson.OPT_INDENT_2))
            return current
    run = uuid.uuid4().hex[:6]
    provider = await create_owner(stack.database_url, f"seller-{run}@demo.sitekit.test",
                                  "Demo Agents Ltd", "provider")
    async with CmpClient(stack.cmp_url, provider["cmp_token"]) as seller:
        agent = await seller.publish_agent(
            provider["org_id"], "Site assistant", orjson.loads(DEMO_FLOW.read_bytes()),
            description="Answers your visitors' questions, day and night.",
        )
    tenants = []
    for name, origin in DEMO_TENANTS:
        slug = name.split()[0].lower()
        owner = await create_owner(stack.database_url, f"owner-{run}@{slug}.demo.sitekit.test",
                                   name, "customer")
        async with CmpClient(stack.cmp_url, owner["cmp_token"]) as buyer:
            placed = await buyer.order(owner["org_id"], agent["provider_agent_id"])
            approved = await approve_order(stack.cmp_url, stack.secrets.webhook_secret,
                                           placed["order_id"])
            agent_id = approved["agent_id"]
            await buyer.wait_active(agent_id)
            await buyer.configure(
                agent_id, display_name=f"{name} assistant", allowed_origins=[origin],
                greeting=f"Hi! I am the {name} assistant. How can I help?",
                starter_prompts=["What can you do?", "Tell me about your products"],
                theme={"accent": "#2563eb"},
            )
            secret = await buyer.create_key(agent_id, "secret")
            publishable = await buyer.create_key(agent_id, "publishable", [origin])
        tenants.append({
            "tenant_id": owner["org_id"], "agent_id": agent_id, "name": name,
            "secret_key": secret["token"], "secret_key_id": secret["key_id"],
            "publishable_key": publishable["token"], "publishable_key_id": publishable["key_id"],
            "allowed_origin": origin, "cmp_token": owner["cmp_token"],
        })
    demo = {
        **_urls(stack),
        "provider": {"org_id": provider["org_id"], "email": provider["email"],
                     "provider_agent_id": agent["provider_agent_id"],
                     "cmp_token": provider["cmp_token"]},
        "tenants": tenants,
    }
    demo_path.write_bytes(orjson.dumps(demo, option=orjson.OPT_INDENT_2))
    return demo
