"""What a browser on the agent's own origin may read of the gateway's answers: the widget needs
the bodies and the headers of refusals and limits, not only of successes."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import redis.asyncio as aioredis

from cmp.apikeys import revoke_key
from cmp.registry import BucketLimit, Limits
from tests.e2e.conftest import MakeTenant, Tenant, auth

BODY = {"message": "hi"}


def readable(response: httpx.Response, origin: str, *headers: str) -> bool:
    exposed = response.headers.get("access-control-expose-headers", "").lower()
    return response.headers.get("access-control-allow-origin") == origin and all(
        name.lower() in exposed for name in headers)


async def test_a_refusal_is_readable_from_the_agents_origin_only(
    gateway: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Connection,
    stack_redis: aioredis.Redis,
) -> None:
    await revoke_key(db, stack_redis, tenant_id=tenant.tenant_id,
                     key_id=tenant.publishable_key_id)
    config = f"/v1/agents/{tenant.agent_id}/config"
    own = {**auth(tenant.publishable_key), "origin": tenant.allowed_origin}
    for _ in range(50):  # revocations reach the gateways within a second
        chat = await gateway.post(tenant.chat_path, json=BODY, headers=own)
        if chat.status_code == 401:
            break
        await asyncio.sleep(0.1)
    assert chat.status_code == 401
    assert readable(chat, tenant.allowed_origin, "X-Request-Id")
    settings = await gateway.get(config, headers=own)
    assert settings.status_code == 401
    assert readable(settings, tenant.allowed_origin, "X-Request-Id")
    foreign = {**auth(tenant.publishable_key), "origin": "https://evil.example"}
    for refused in (await gateway.post(tenant.chat_path, json=BODY, headers=foreign),
                    await gateway.get(config, headers=foreign)):
        assert refused.status_code == 401
        assert "access-control-allow-origin" not in refused.headers


async def test_a_rate_limited_answer_exposes_retry_after(
    gateway: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant(Limits(tenant=BucketLimit(100, 100), key=BucketLimit(0.01, 1)))
    own = {**auth(tenant.publishable_key), "origin": tenant.allowed_origin}
    assert (await gateway.post(tenant.chat_path, json=BODY, headers=own)).status_code == 200
    limited = await gateway.post(tenant.chat_path, json=BODY, headers=own)
    assert limited.status_code == 429
    assert readable(limited, tenant.allowed_origin, "Retry-After", "RateLimit-Limit",
                    "RateLimit-Remaining", "RateLimit-Reset", "X-Request-Id")


async def test_the_widgets_settings_are_readable_from_its_origin(
    gateway: httpx.AsyncClient, tenant: Tenant
) -> None:
    settings = await gateway.get(f"/v1/agents/{tenant.agent_id}/config", headers={
        **auth(tenant.publishable_key), "origin": tenant.allowed_origin})
    assert settings.status_code == 200
    assert readable(settings, tenant.allowed_origin, "X-Request-Id")
