"""Key attacks and tenant isolation at the gateway, on the real stack."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import time
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cmp.apikeys import issue_key, revoke_key
from cmp.registry import load_instance, publish_entry, save_instance
from cmp.signing import SigningKey
from devstack.seed import DEMO_FLOW_ID
from devstack.stack import Stack
from tests.e2e.conftest import (
    AuditReader,
    MakeTenant,
    Tenant,
    UsageReader,
    auth,
    scripted_runtime,
)

BODY = {"message": "Hello"}


def claims_for(tenant: Tenant, **override: Any) -> dict[str, Any]:
    claims = {
        "iss": "sitekit-cmp", "aud": "gateway", "jti": tenant.secret_key_id,
        "tid": tenant.tenant_id, "aid": tenant.agent_id, "kty": "secret",
        "iat": int(time.time()),
    }
    claims.update(override)
    return {k: v for k, v in claims.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def refused(gateway: httpx.AsyncClient, tenant: Tenant, token: str) -> httpx.Response:
    response = await gateway.post(tenant.chat_path, json=BODY, headers=auth(token))
    assert response.headers["x-request-id"]
    return response


async def assert_invalid_key(
    gateway: httpx.AsyncClient, tenant: Tenant, token: str, audit: AuditReader
) -> None:
    response = await refused(gateway, tenant, token)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_key"
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["message"]
    events = await audit.events(error["request_id"])
    assert [e["kind"] for e in events] == ["invalid_key"]


async def test_a_valid_secret_key_gets_an_answer(
    gateway: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await gateway.post(tenant.chat_path, json=BODY, headers=auth(tenant.secret_key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] and body["request_id"] == response.headers["x-request-id"]
    assert body["usage"]["output_tokens"] > 0
    for name in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"):
        assert response.headers[name].isdigit()


@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer", "Bearer not-a-jwt"])
async def test_missing_or_malformed_key(
    gateway: httpx.AsyncClient, tenant: Tenant, audit: AuditReader, header: str | None
) -> None:
    headers = {} if header is None else {"authorization": header}
    response = await gateway.post(tenant.chat_path, json=BODY, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_key"
    assert await audit.events(response.headers["x-request-id"])


async def test_alg_none_is_refused(
    gateway: httpx.AsyncClient, tenant: Tenant, signing_key: SigningKey, audit: AuditReader
) -> None:
    header = b64(orjson.dumps({"alg": "none", "typ": "JWT", "kid": signing_key.kid}))
    token = f"{header}.{b64(orjson.dumps(claims_for(tenant)))}."
    await assert_invalid_key(gateway, tenant, token, audit)


async def test_hs256_signed_with_the_public_key_is_refused(
    gateway: httpx.AsyncClient, tenant: Tenant, signing_key: SigningKey, audit: AuditReader
) -> None:
    public = signing_key.private_key.public_key()
    from cryptography.hazmat.primitives import serialization

    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": signing_key.kid}))
    payload = b64(orjson.dumps(claims_for(tenant)))
    import hashlib
    import hmac

    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    await assert_invalid_key(gateway, tenant, f"{header}.{payload}.{b64(signature)}", audit)


async def test_unknown_kid_is_refused(
    gateway: httpx.AsyncClient, tenant: Tenant, audit: AuditReader
) -> None:
    stranger = SigningKey("k_not_ours", Ed25519PrivateKey.generate())
    await assert_invalid_key(gateway, tenant, stranger.sign(claims_for(tenant)), audit)


async def test_right_kid_wrong_key_is_refused(
    gateway: httpx.AsyncClient, tenant: Tenant, signing_key: SigningKey, audit: AuditReader
) -> None:
    forger = SigningKey(signing_key.kid, Ed25519PrivateKey.generate())
    await assert_invalid_key(gateway, tenant, forger.sign(claims_for(tenant)), audit)


async def test_tampered_payload_is_refused(
    gateway: httpx.AsyncClient, make_tenant: MakeTenant, audit: AuditReader
) -> None:
    victim, attacker = await make_tenant(), await make_tenant()
    header, payload, signature = attacker.secret_key.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    claims.update(tid=victim.tenant_id, aid=victim.agent_id)
    token = f"{header}.{b64(orjson.dumps(claims))}.{signature}"
    await assert_invalid_key(gateway, victim, token, audit)


@pytest.mark.parametrize("override", [
    {"exp": int(time.time()) - 10},
    {"aud": "someone-else"},
    {"iss": "evil-issuer"},
    {"aud": None},
    {"jti": None},
    {"kty": "admin"},
])
async def test_bad_claims_are_refused(
    gateway: httpx.AsyncClient, tenant: Tenant, signing_key: SigningKey, audit: AuditReader,
    override: dict[str, Any],
) -> None:
    await assert_invalid_key(gateway, tenant, signing_key.sign(claims_for(tenant, **override)),
                             audit)


async def test_a_key_is_refused_after_its_expiry_though_verified_before(
    stack: Stack, tenant: Tenant, db: asyncpg.Connection, audit: AuditReader
) -> None:
    issued = await issue_key(db, issuer=stack.settings.issuer, tenant_id=tenant.tenant_id,
                             agent_id=tenant.agent_id, kind="secret",
                             expires_in=dt.timedelta(seconds=2))
    assert issued.key.expires_at is not None
    # One connection, so one worker: the one that verified the key and keeps it verified.
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        ok = await client.post(tenant.chat_path, json=BODY, headers=auth(issued.token))
        assert ok.status_code == 200, ok.text
        await asyncio.sleep(issued.key.expires_at.timestamp() - time.time() + 0.1)
        expired = await client.post(tenant.chat_path, json=BODY, headers=auth(issued.token))
    assert expired.status_code == 401, expired.text
    error = expired.json()["error"]
    assert error["code"] == "invalid_key" and "expired" in error["message"]
    assert [e["kind"] for e in await audit.events(error["request_id"])] == ["invalid_key"]


async def test_revoked_while_in_use_is_refused_within_a_second(
    gateway: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Connection,
    stack_redis: aioredis.Redis, audit: AuditReader,
) -> None:
    ok = await gateway.post(tenant.chat_path, json=BODY, headers=auth(tenant.secret_key))
    assert ok.status_code == 200
    await revoke_key(db, stack_redis, tenant_id=tenant.tenant_id, key_id=tenant.secret_key_id)
    statuses = []
    await asyncio.sleep(1.0)
    # Both workers must refuse it: fresh connections spread the requests over them.
    for _ in range(6):
        async with httpx.AsyncClient(base_url=str(gateway.base_url)) as fresh:
            response = await fresh.post(tenant.chat_path, json=BODY,
                                        headers=auth(tenant.secret_key))
        statuses.append(response.status_code)
    assert statuses == [401] * 6
    assert "revoked" in response.json()["error"]["message"]
    assert await audit.events(response.headers["x-request-id"])


async def test_a_tenants_key_on_another_tenants_agent_is_forbidden(
    gateway: httpx.AsyncClient, make_tenant: MakeTenant, audit: AuditReader
) -> None:
    a, b = await make_tenant(), await make_tenant()
    response = await gateway.post(b.chat_path, json=BODY, headers=auth(a.secret_key))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    events = await audit.events(response.headers["x-request-id"])
    assert events[0]["kind"] == "cross_tenant"
    assert events[0]["key_tenant_id"] == a.tenant_id and events[0]["agent_id"] == b.agent_id


async def test_unknown_agent_is_forbidden(gateway: httpx.AsyncClient, tenant: Tenant) -> None:
    response = await gateway.post(
        "/v1/agents/00000000-0000-0000-0000-000000000000/chat", json=BODY,
        headers=auth(tenant.secret_key),
    )
    assert response.status_code == 403


async def test_client_supplied_tenant_flow_and_collection_change_nothing(
    gateway: httpx.AsyncClient, make_tenant: MakeTenant, usage: UsageReader
) -> None:
    """The runtime is asked to run what the registry entry names, whatever the body says."""
    b = await make_tenant()
    answer = (b'event: token\ndata: {"text": "Hi"}\n\n'
              b'event: end\ndata: {"text": "Hi", "usage": {"input_tokens": 2, "output_tokens": 1}}'
              b"\n\n")
    async with scripted_runtime(answer) as runtime:
        a = await make_tenant(runtime_url=runtime.url(""))
        asked = {"message": "Same question", "session_id": "visitor-1"}
        plain = await gateway.post(a.chat_path, json=asked, headers=auth(a.secret_key))
        meddled = await gateway.post(a.chat_path, headers=auth(a.secret_key), json={
            **asked, "tenant_id": b.tenant_id, "agent_id": b.agent_id, "flow_id": "other-flow",
            "collection": f"tenant_{b.tenant_id}_agent_{b.agent_id}", "input_value": "Other",
            "variables": {"tenant_id": b.tenant_id, "collection": "tenant_x_agent_y"},
        })
    assert plain.status_code == meddled.status_code == 200, meddled.text
    runs = runtime.runs
    assert len(runs) == 2
    for run, response in zip(runs, (plain, meddled), strict=True):
        assert run == {
            "_path": f"/flows/{DEMO_FLOW_ID}/stream",
            "input_value": "Same question",
            "session_id": f"{a.agent_id}:visitor-1",
            "variables": {
                "tenant_id": a.tenant_id, "agent_id": a.agent_id,
                "collection": f"tenant_{a.tenant_id}_agent_{a.agent_id}",
                "request_id": response.json()["request_id"],
            },
        }
    assert b.tenant_id.encode() not in b"".join(runtime.requests)
    events = await usage.collect({meddled.json()["request_id"]})
    data = events[meddled.json()["request_id"]][0]["data"]
    assert data["tenant_id"] == a.tenant_id and data["agent_id"] == a.agent_id


async def test_publishable_key_only_from_its_origin(
    gateway: httpx.AsyncClient, tenant: Tenant, audit: AuditReader
) -> None:
    key = auth(tenant.publishable_key)
    ok = await gateway.post(tenant.chat_path, json=BODY,
                            headers={**key, "origin": tenant.allowed_origin})
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == tenant.allowed_origin
    assert "RateLimit-Remaining" in ok.headers["access-control-expose-headers"]
    foreign = await gateway.post(tenant.chat_path, json=BODY,
                                 headers={**key, "origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert "access-control-allow-origin" not in foreign.headers
    events = await audit.events(foreign.headers["x-request-id"])
    assert events[0]["kind"] == "foreign_origin"
    assert events[0]["origin"] == "https://evil.example"
    missing = await gateway.post(tenant.chat_path, json=BODY, headers=key)
    assert missing.status_code == 403
    assert (await audit.events(missing.headers["x-request-id"]))[0]["kind"] == "foreign_origin"


@pytest.mark.parametrize("endpoint", ["chat", "config"])
async def test_a_publishable_key_works_only_from_origins_on_both_the_key_and_the_agent(
    gateway: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Connection,
    stack_redis: aioredis.Redis, stack: Stack, audit: AuditReader, endpoint: str,
) -> None:
    own, key_only, agent_only = (tenant.allowed_origin, "https://key-only.example",
                                 "https://agent-only.example")
    wide = await issue_key(db, issuer=stack.settings.issuer, tenant_id=tenant.tenant_id,
                           agent_id=tenant.agent_id, kind="publishable", origins=[own, key_only])
    instance = await load_instance(db, tenant.agent_id, tenant.tenant_id)
    await publish_entry(stack_redis, await save_instance(
        db, dataclasses.replace(instance, allowed_origins=(own, agent_only))))

    async def call(key: str, origin: str) -> httpx.Response:
        headers = {**auth(key), "origin": origin}
        if endpoint == "chat":
            return await gateway.post(tenant.chat_path, json=BODY, headers=headers)
        return await gateway.get(f"/v1/agents/{tenant.agent_id}/config", headers=headers)

    for key in (wide.token, tenant.publishable_key):
        assert (await call(key, own)).status_code == 200
    for key, key_id, origin in ((wide.token, wide.key.key_id, key_only),
                                (tenant.publishable_key, tenant.publishable_key_id, agent_only)):
        response = await call(key, origin)
        assert response.status_code == 403, (origin, response.text)
        error = response.json()["error"]
        assert error["code"] == "forbidden"
        assert error["request_id"] == response.headers["x-request-id"]
        events = await audit.events(error["request_id"])
        assert [(e["kind"], e["origin"], e["key_id"]) for e in events] == [
            ("foreign_origin", origin, key_id)]
        # The widget on one of the agent's own origins may read why; another origin may not.
        readable = response.headers.get("access-control-allow-origin")
        assert readable == (origin if origin == agent_only else None)


async def test_preflight_answered_per_agent(
    gateway: httpx.AsyncClient, tenant: Tenant, audit: AuditReader
) -> None:
    asks = {"access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"}
    ok = await gateway.options(tenant.chat_path,
                               headers={**asks, "origin": tenant.allowed_origin})
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == tenant.allowed_origin
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    bad = await gateway.options(tenant.chat_path,
                                headers={**asks, "origin": "https://evil.example"})
    assert bad.status_code == 403
    assert "access-control-allow-origin" not in bad.headers
    assert await audit.events(bad.headers["x-request-id"])


async def test_widget_config_needs_the_publishable_key_and_origin(
    gateway: httpx.AsyncClient, tenant: Tenant
) -> None:
    path = f"/v1/agents/{tenant.agent_id}/config"
    ok = await gateway.get(path, headers={**auth(tenant.publishable_key),
                                          "origin": tenant.allowed_origin})
    assert ok.status_code == 200
    settings = ok.json()
    assert settings["greeting"] and settings["name"] and settings["starter_prompts"]
    assert "tenant_id" not in settings and "flow_id" not in settings
    secret = await gateway.get(path, headers=auth(tenant.secret_key))
    assert secret.status_code == 403
    foreign = await gateway.get(path, headers={**auth(tenant.publishable_key),
                                               "origin": "https://evil.example"})
    assert foreign.status_code == 403
