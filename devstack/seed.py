"""The demo marketplace: two tenants, each with one agent instance of the demo flow, a secret
key and a publishable key for its demo page's origin. Written to `.stack/demo.json`."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from cmp.apikeys import issue_key
from cmp.errors import NotFound
from cmp.registry import AgentInstance, load_instance, publish_entry, save_instance
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
    conn: asyncpg.Connection, redis: aioredis.Redis, stack: Stack, *, name: str, origin: str,
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


async def seed_demo(stack: Stack) -> dict[str, Any]:
    """Seed once; a second `make up` finds the same demo in the same data and reuses it."""
    demo_path = stack.root / "demo.json"
    await deploy_flow(stack.runtime_url, stack.secrets.runtime_token, DEMO_FLOW_ID,
                      orjson.loads(DEMO_FLOW.read_bytes()), 1)
    conn = await asyncpg.connect(stack.database_url)
    redis = aioredis.from_url(stack.redis_url)
    try:
        if demo_path.exists():
            demo: dict[str, Any] = orjson.loads(demo_path.read_bytes())
            try:
                for tenant in demo["tenants"]:
                    await load_instance(conn, tenant["agent_id"], tenant["tenant_id"])
                return demo
            except NotFound:
                pass
        tenants = [
            await create_tenant_agent(conn, redis, stack, name=name, origin=origin)
            for name, origin in DEMO_TENANTS
        ]
    finally:
        await redis.aclose()
        await conn.close()
    demo = {
        "gateway_url": stack.gateway_url,
        "cmp_url": stack.cmp_url,
        "jwks_url": stack.jwks_url,
        "tenants": tenants,
    }
    demo_path.write_bytes(orjson.dumps(demo, option=orjson.OPT_INDENT_2))
    return demo
